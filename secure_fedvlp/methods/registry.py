"""Registry of federated methods: name -> (server strategy class, client trainer class).

Built-in methods register themselves when :mod:`secure_fedvlp.methods` is imported (use
``get_method``/``list_methods`` from there); third-party methods are found through the
``secure_fedvlp.methods`` entry-point group (each entry point names a module that calls
:func:`register_method` when imported).  Registering a name also
declares it to the config layer (:func:`secure_fedvlp.config.declare_method`), so a config
naming it validates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from secure_fedvlp.config import ExperimentConfig, declare_method
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.privacy.plan import ReleasePlan

__all__ = [
    "MethodSpec",
    "register_method",
    "get_method",
    "method_model",
    "list_methods",
    "load_entry_points",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "secure_fedvlp.methods"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its strategy and trainer classes."""

    name: str
    strategy: type
    trainer: type
    description: str = ""
    #: Builds the model the method federates from the config (None: the VLP model, ``build.build_model``).
    model_builder: Callable[[ExperimentConfig], Any] | None = None

    def plan(self, cfg: ExperimentConfig) -> ReleasePlan:
        """What a training site releases per round under this method (the strategy's declaration)."""
        return self.strategy.release_plan(cfg)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str, strategy: type, trainer: type, description: str = "", model_builder: Callable | None = None
) -> MethodSpec:
    """Register a method under ``name`` (names are unique); ``model_builder`` if it federates another model."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered.")
    spec = MethodSpec(name, strategy, trainer, description, model_builder)
    _REGISTRY[name] = spec
    declare_method(name)
    return spec


def load_entry_points() -> None:
    """Import every method module listed in the ``secure_fedvlp.methods`` entry-point group (third-party methods)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            try:
                ep.load()
            except ModuleNotFoundError as exc:
                if exc.name != ep.value:  # the method's module exists and failed on an import of its own: raise
                    raise
                # installed metadata naming a module this source tree lacks (an editable install built from
                # another checkout): that method is unavailable here, the others still work
                logger.warning("method %r: its module %s is not installed; skipped", ep.name, ep.value)


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; :class:`ConfigError` listing valid names otherwise."""
    if name not in _REGISTRY:
        load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"'federation.method' = {name!r} is not a known method (known: {', '.join(sorted(_REGISTRY))})."
        ) from None


def method_model(cfg: ExperimentConfig) -> Any:
    """The model the configured method federates, built identically by every party (the VLP model by default)."""
    builder = get_method(cfg.federation.method).model_builder
    if builder is None:
        from secure_fedvlp.build import build_model

        return build_model(cfg)
    return builder(cfg)


def list_methods() -> list[str]:
    """Names of all registered methods (built-in and entry points)."""
    load_entry_points()
    return sorted(_REGISTRY)
