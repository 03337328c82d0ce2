"""secure_fedvlp.data."""
