"""secure_fedvlp.methods."""
