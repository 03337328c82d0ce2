"""Federated methods: a strategy and a client trainer each, extending shared bases."""

from secure_fedvlp.methods import fedavg, feddra, fedprox  # noqa: F401  (register built-ins)
from secure_fedvlp.methods.base import LocalTrainer, TrainTask, VLPStrategy
from secure_fedvlp.methods.registry import MethodSpec, get_method, list_methods, register_method

__all__ = ["LocalTrainer", "TrainTask", "VLPStrategy", "MethodSpec", "get_method", "list_methods",
           "register_method"]
