"""FedAvg (McMahan et al., 2017): the base strategy and trainer, unchanged."""

from secure_fedvlp.methods.registry import register_method
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer

register_method("fedavg", VLPStrategy, LocalTrainer, "Example-weighted average of local models.")
