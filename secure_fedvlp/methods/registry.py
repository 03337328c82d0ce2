"""Registry of federated methods: name -> (server strategy class, client trainer class)."""

from __future__ import annotations

from dataclasses import dataclass

from secure_fedvlp.errors import ConfigError

__all__ = ["MethodSpec", "register_method", "get_method", "list_methods"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its strategy and trainer classes."""

    name: str
    strategy: type
    trainer: type
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, strategy: type, trainer: type, description: str = "") -> MethodSpec:
    """Register a method under ``name`` (names are unique)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered.")
    spec = MethodSpec(name, strategy, trainer, description)
    _REGISTRY[name] = spec
    return spec


def _ensure_loaded() -> None:
    # Importing the package registers the built-in methods.
    import secure_fedvlp.methods  # noqa: F401


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``; :class:`ConfigError` listing valid names otherwise."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"'federation.method' = {name!r} is not a known method "
                          f"(known: {', '.join(sorted(_REGISTRY))}).") from None


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _ensure_loaded()
    return sorted(_REGISTRY)
