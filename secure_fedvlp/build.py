"""Everything a party builds from the resolved config: the model, the federation's data, the device.

Every party builds the model identically (seeded, then ``model.init_checkpoint`` when one is
configured), so frozen parts never travel; data are built once per process and cached.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from secure_fedvlp.config import ExperimentConfig, config_hash
from secure_fedvlp.data import Federation, load_federation
from secure_fedvlp.errors import CheckpointError, ConfigError

__all__ = [
    "build_federation",
    "build_model",
    "checkpoint_path",
    "resolve_device",
    "seeded",
    "configure_threads",
    "expected_num_nodes",
]

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


def checkpoint_path(cfg: ExperimentConfig) -> Path | None:
    """``model.init_checkpoint`` as an absolute path (a relative one is read from the current directory), or None."""
    if not cfg.model.init_checkpoint:
        return None
    p = Path(cfg.model.init_checkpoint).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p)


def build_model(cfg: ExperimentConfig, *, untrained: bool = False) -> torch.nn.Module:
    """The model every party builds identically, so frozen parts need not travel.

    The architecture is built under ``run.seed``; then, unless ``untrained``, the checkpoint
    ``model.init_checkpoint`` (every parameter and buffer: a public start, or a user's checkpoint)
    is loaded over it, so the server, every site, the evaluation and the export all start from the
    same round-0 model, frozen parts included.  Last, ``model.trainable`` picks what is federated.
    ``untrained=True`` gives the seeded initialisation alone (the untrained reference).

    Raises
    ------
    CheckpointError
        The checkpoint is missing, unreadable or does not fit the model (the message names the file and key).
    ConfigError
        ``pretrain.enabled`` without ``model.init_checkpoint``: the public start is computed before the
        Flower apps start (``secure-fedvlp run`` does it; in deployment ``secure-fedvlp pretrain``).
    """
    from secure_fedvlp.models import create_model
    from secure_fedvlp.models.checkpoint import load_checkpoint

    if cfg.pretrain.enabled and not cfg.model.init_checkpoint and not untrained:
        raise ConfigError(
            "'pretrain.enabled' = true but 'model.init_checkpoint' is empty: the public start is computed before the "
            "Flower apps start. `secure-fedvlp run` computes it and sets model.init_checkpoint; for `flwr run` or a "
            "deployment, run `secure-fedvlp pretrain CONFIG --out FILE`, give every party FILE and set "
            "model.init_checkpoint = FILE."
        )
    with seeded(cfg.run.seed):
        model = create_model(cfg.model.name, text_weights_dir=cfg.model.text_weights_dir or None)
    if cfg.model.image_whitening:
        model.add_image_whitening()  # identity until the public start (or the checkpoint) sets it
    path = None if untrained else checkpoint_path(cfg)
    if path is not None:
        try:
            load_checkpoint(model, path, model_name=cfg.model.name)
        except CheckpointError as exc:
            raise CheckpointError(f"model.init_checkpoint: {exc}") from None
        model.text_encoder._cache.clear()  # locked-prefix states of the seeded tower, if any were cached
    model.restrict_trainable(cfg.model.trainable)
    return model


def configure_threads(n: int) -> None:
    """Limit torch intra-op threads in a client process (avoids oversubscribing small machines)."""
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
