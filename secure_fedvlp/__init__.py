"""secure_fedvlp: privacy-hardened federated medical vision-language pre-training on Flower."""

__version__ = "0.1.0"
