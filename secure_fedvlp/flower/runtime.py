"""Shared plumbing of the Flower apps: config at the edge, data and model per process.

Both apps are built by factories that take a *config provider*: a function of the Flower
``Context`` returning the resolved :class:`ExperimentConfig` and the run directory.  The
CLI passes a closure over the config it parsed; ``flwr run .`` uses
:func:`config_from_run_config`, which reads ``context.run_config`` (the
``[tool.flwr.app.config]`` table) once.  Nothing below reads raw config dicts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from secure_fedvlp.config import ExperimentConfig, config_hash, load_config
from secure_fedvlp.data import Federation, SiteData
from secure_fedvlp.errors import ConfigError

logger = logging.getLogger(__name__)

ConfigProvider = Callable[[Context], "RunSetup"]

__all__ = ["RunSetup", "ConfigProvider", "config_from_run_config", "resolve_app_path", "resolve_site"]


@dataclass(frozen=True)
class RunSetup:
    """What every party needs to know about the run: the resolved config and where to write.

    ``resume``: continue from the run directory's last checkpoint (``secure-fedvlp run --resume``).
    ``node_binding``: in deployment, which authenticated node key serves which site
    (:mod:`secure_fedvlp.flower.nodes`); None in simulation.
    """

    cfg: ExperimentConfig
    run_dir: Path
    resume: bool = False
    node_binding: Path | None = None


def resolve_app_path(value: str, key: str) -> Path:
    """A path from the run config, robust to the directory the app was launched in.

    Flower starts the ServerApp and ClientApps in the launching process's working directory, which
    need not be the project's: an absolute path is taken as it is; a relative one is looked up in the
    working directory, then beside the installed package (where the FAB keeps ``configs/``).
    Raises :class:`~secure_fedvlp.errors.ConfigError` naming the key and every place looked in.
    """
    p = Path(value).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        import secure_fedvlp

        candidates = [Path.cwd() / p, Path(secure_fedvlp.__file__).resolve().parent.parent / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    raise ConfigError(f"run config {key} = {value!r} not found (looked in {', '.join(map(str, candidates))}).")


def config_from_run_config(context: Context) -> RunSetup:
    """Read ``config-path``, ``overrides``, ``run-dir`` and ``node-binding`` from ``context.run_config``
    (``flwr run``): paths are resolved with :func:`resolve_app_path`, a relative ``run-dir`` against the
    working directory.

    ``model.init_checkpoint`` is resolved the same way and made absolute, so the server and every client
    read the same file whatever their working directory.
    """
    rc = context.run_config
    path = resolve_app_path(str(rc.get("config-path", "configs/demo.toml")), "config-path")
    overrides = [o for o in str(rc.get("overrides", "")).split(";") if o.strip()]
    cfg = load_config(path, overrides)
    if cfg.model.init_checkpoint:
        ckpt = resolve_app_path(cfg.model.init_checkpoint, "model.init_checkpoint")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=str(ckpt)))
    run_dir = str(rc.get("run-dir", "")) or str(Path(cfg.run.output_dir) / f"{cfg.run.name}-{config_hash(cfg)}")
    binding = str(rc.get("node-binding", ""))
    return RunSetup(
        cfg,
        Path(run_dir).expanduser().resolve(),
        node_binding=resolve_app_path(binding, "node-binding") if binding else None,
    )


def resolve_site(context: Context, federation: Federation) -> SiteData:
    """The site this node serves: ``node_config['site']`` (deployment) or ``partition-id`` (simulation)."""
    nc = context.node_config
    if "site" in nc:
        return federation.site(str(nc["site"]))
    if "partition-id" not in nc:
        raise ConfigError(
            "node_config has neither 'site' nor 'partition-id'; start the SuperNode with "
            "--node-config \"site='<name>'\"."
        )
    pid = int(nc["partition-id"])
    sites = federation.all_sites()
    if not 0 <= pid < len(sites):
        raise ConfigError(
            f"partition-id {pid} is out of range: the federation has {len(sites)} sites "
            f"({', '.join(s.name for s in sites)}); run with that many SuperNodes."
        )
    return sites[pid]
