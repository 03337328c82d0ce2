"""Federated methods: a strategy and a client trainer each, extending shared bases.

A method is one module that subclasses :class:`VLPStrategy` and/or :class:`LocalTrainer`,
overrides what differs (including its :meth:`~VLPStrategy.release_plan`) and calls
:func:`register_method`.  Built-in methods are listed as ``secure_fedvlp.methods`` entry points
in ``pyproject.toml``, which is how the config layer knows their names without importing them.
"""

from secure_fedvlp.methods import centralized, creamfl, fedavg, feddra, fedprox, fedsm  # noqa: F401  (register built-ins)
from secure_fedvlp.methods.registry import MethodSpec, get_method, list_methods, register_method
from secure_fedvlp.methods.strategy import RoundRecorder, SiteInfo, VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer, PlainSteps, StepEngine, TrainTask

__all__ = [
    "LocalTrainer",
    "PlainSteps",
    "StepEngine",
    "TrainTask",
    "RoundRecorder",
    "SiteInfo",
    "VLPStrategy",
    "MethodSpec",
    "get_method",
    "list_methods",
    "register_method",
]
