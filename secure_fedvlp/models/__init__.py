"""secure_fedvlp.models."""
