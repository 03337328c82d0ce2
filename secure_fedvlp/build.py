"""Everything a party builds from the resolved config: the model, the federation's data, the device.

Every party builds the model identically (seeded), so frozen parts never travel; data are built
once per process and cached.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from secure_fedvlp.config import ExperimentConfig, config_hash
from secure_fedvlp.data import Federation, load_federation
from secure_fedvlp.errors import ConfigError

__all__ = ["build_federation", "build_model", "resolve_device", "seeded", "configure_threads", "expected_num_nodes"]

_CACHE_LOCK = threading.Lock()
_FED_CACHE: dict[str, Federation] = {}


def build_federation(cfg: ExperimentConfig) -> Federation:
    """The federation's data as configured (cached per process and on disk)."""
    key = config_hash(cfg.data)
    with _CACHE_LOCK:
        if key not in _FED_CACHE:
            d = cfg.data
            _FED_CACHE[key] = load_federation(
                d.source,
                image_size=d.synthetic.image_size,
                synthetic=d.synthetic,
                cache_dir=d.cache_dir,
                manifest_path=d.manifest_path,
                image_root=d.image_root,
                root=d.root,
                reports_root=d.reports_root,
                heldout_site=d.heldout_site,
                public_site=d.public_site,
                uncertain=d.uncertain,
                num_sites=d.num_sites,
                limit=d.limit,
            )
        return _FED_CACHE[key]


def expected_num_nodes(cfg: ExperimentConfig) -> int:
    """How many SuperNodes the server waits for in discovery (training sites + held-out site)."""
    if cfg.data.source == "synthetic":
        spec = cfg.data.synthetic
        return spec.num_sites + (1 if spec.heldout_site else 0)
    return max(1, cfg.federation.min_train_clients)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("'run.device' = 'cuda' but no CUDA device is available (use 'auto' or 'cpu').")
    return torch.device(name)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed torch seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(cfg: ExperimentConfig) -> torch.nn.Module:
    """The model every party builds identically (seeded), so frozen parts need not travel."""
    from secure_fedvlp.models import create_model

    with seeded(cfg.run.seed):
        model = create_model(cfg.model.name, text_weights_dir=cfg.model.text_weights_dir or None)
    model.restrict_trainable(cfg.model.trainable)
    return model


def configure_threads(n: int) -> None:
    """Limit torch intra-op threads in a client process (avoids oversubscribing small machines)."""
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
