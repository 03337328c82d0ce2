"""secure_fedvlp.evaluation."""
