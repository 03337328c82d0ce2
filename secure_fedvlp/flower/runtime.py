"""Shared plumbing of the Flower apps: config at the edge, data and model per process.

Both apps are built by factories that take a *config provider*: a function of the Flower
``Context`` returning the resolved :class:`ExperimentConfig` and the run directory.  The
CLI passes a closure over the config it parsed; ``flwr run .`` uses
:func:`config_from_run_config`, which reads ``context.run_config`` (the
``[tool.flwr.app.config]`` table) once.  Nothing below reads raw config dicts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context

from secure_fedvlp.config import ExperimentConfig, config_hash, load_config
from secure_fedvlp.data import Federation, SiteData, generate_federation
from secure_fedvlp.errors import ConfigError

logger = logging.getLogger(__name__)

ConfigProvider = Callable[[Context], "RunSetup"]

__all__ = ["RunSetup", "ConfigProvider", "config_from_run_config", "build_federation", "resolve_device",
           "resolve_site", "build_model", "seeded", "expected_num_nodes"]


@dataclass(frozen=True)
class RunSetup:
    """What every party needs to know about the run: the resolved config and where to write."""

    cfg: ExperimentConfig
    run_dir: Path


_CACHE_LOCK = threading.Lock()
_FED_CACHE: dict[str, Federation] = {}


def config_from_run_config(context: Context) -> RunSetup:
    """Read ``config-path``, ``overrides`` and ``run-dir`` from ``context.run_config`` (``flwr run .``)."""
    rc = context.run_config
    path = str(rc.get("config-path", "configs/demo.toml"))
    overrides = [o for o in str(rc.get("overrides", "")).split(";") if o.strip()]
    cfg = load_config(path, overrides)
    run_dir = str(rc.get("run-dir", "")) or str(Path(cfg.run.output_dir) / f"{cfg.run.name}-{config_hash(cfg)}")
    return RunSetup(cfg, Path(run_dir))


def build_federation(cfg: ExperimentConfig) -> Federation:
    """The federation's data as configured (cached per process and on disk)."""
    key = config_hash(cfg.data)
    with _CACHE_LOCK:
        if key not in _FED_CACHE:
            if cfg.data.source == "synthetic":
                _FED_CACHE[key] = generate_federation(cfg.data.synthetic, cache_dir=cfg.data.cache_dir)
            else:
                from secure_fedvlp.data.manifest import load_manifest_federation

                _FED_CACHE[key] = load_manifest_federation(
                    cfg.data.manifest_path, image_root=cfg.data.image_root or None,
                    image_size=cfg.data.synthetic.image_size, heldout_site=cfg.data.heldout_site or None)
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


def resolve_site(context: Context, federation: Federation) -> SiteData:
    """The site this node serves: ``node_config['site']`` (deployment) or ``partition-id`` (simulation)."""
    nc = context.node_config
    if "site" in nc:
        return federation.site(str(nc["site"]))
    if "partition-id" not in nc:
        raise ConfigError("node_config has neither 'site' nor 'partition-id'; start the SuperNode with "
                          "--node-config \"site='<name>'\".")
    pid = int(nc["partition-id"])
    sites = federation.all_sites()
    if not 0 <= pid < len(sites):
        raise ConfigError(f"partition-id {pid} is out of range: the federation has {len(sites)} sites "
                          f"({', '.join(s.name for s in sites)}); run with that many SuperNodes.")
    return sites[pid]


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
