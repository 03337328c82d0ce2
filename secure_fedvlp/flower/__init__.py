"""secure_fedvlp.flower."""
