"""secure_fedvlp.secagg."""
