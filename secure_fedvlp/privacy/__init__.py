"""secure_fedvlp.privacy."""
