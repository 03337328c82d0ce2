"""secure_fedvlp.objectives."""
