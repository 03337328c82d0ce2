"""Every path of a run directory, named once.

A run directory holds what the server writes (the resolved config, per-round metrics with the
ledger heads the sites reported, the report and its plots, the model or its ciphertext, encryption
statistics) and, in simulation, each site's own directory (``clients/<site>/``: its privacy ledger,
local-only training metrics, the rounds it evaluated and, with ``eval.release = "local"``, its
evaluation metrics; in deployment these live on the site's disk), and the auditor's directory
(``audit/``).
Nothing else in the package spells these names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_fedvlp.config import ExperimentConfig, load_config
from secure_fedvlp.errors import DataError

logger = logging.getLogger(__name__)

_LEDGER = "privacy_ledger.jsonl"

__all__ = ["RunLayout", "FinishedRun", "load_run", "read_metrics", "SITE_FILE_MODE", "open_site_file"]

#: The mode of a site's own files (its ledger, local metrics, evaluation guard): its owner only.
SITE_FILE_MODE = 0o600


def open_site_file(path: str | os.PathLike, mode: str = "a"):  # noqa: ANN201 - a text file object
    """Open a file of a site's own (``"a"`` append or ``"w"`` write, text) created mode 0600, its directory
    0700 when it is created here; a file that exists is brought to 0600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(p, flags, SITE_FILE_MODE)
    os.fchmod(fd, SITE_FILE_MODE)
    return os.fdopen(fd, mode, encoding="utf-8")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created or read here)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- the server's files ------------------------------------------------------------
    @property
    def config(self) -> Path:
        """The resolved config of the run (TOML)."""
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        """One JSON record per round, phase and site."""
        return self.root / "metrics.jsonl"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def model_params(self) -> Path:
        """The plaintext federated parameters (a run without encryption, or a key holder's export)."""
        return self.model_dir / "federated_params.npz"

    @property
    def encrypted_model(self) -> Path:
        """The final encrypted global model (encryption on)."""
        return self.model_dir / "global_model.ckks"

    @property
    def export_info(self) -> Path:
        """What a key holder's export released."""
        return self.model_dir / "export.json"

    @property
    def public_start(self) -> Path:
        """The run's public start (``model.init_checkpoint`` of the run): every parameter and buffer of its
        round-0 model (a hard link to the cache, or a copy)."""
        return self.model_dir / "public_start.npz"

    @property
    def public_start_info(self) -> Path:
        """What the public start is: public, epsilon spent 0, source, steps, corpus size, hash, wall time."""
        return self.model_dir / "public_start.json"

    @property
    def model_readme(self) -> Path:
        return self.model_dir / "README.txt"

    @property
    def checkpoint(self) -> Path:
        """The last adopted global model and its round (what ``secure-fedvlp run --resume`` continues from)."""
        return self.model_dir / "checkpoint.json"

    @property
    def checkpoint_arrays(self) -> Path:
        """The arrays of :attr:`checkpoint` (parameters, or the ciphertext of an encrypted run)."""
        return self.model_dir / "checkpoint.npz"

    @property
    def downstream_results(self) -> Path:
        """The downstream-evaluation metrics the sites released (``secure-fedvlp evaluate``)."""
        return self.root / "downstream.json"

    @property
    def encryption_rounds(self) -> Path:
        """Per-round statistics of the encrypted aggregation."""
        return self.root / "encryption_rounds.json"

    @property
    def keys(self) -> Path:
        """Where runs before the key directory moved out kept their keys (read only, for old runs)."""
        return self.root / "keys"

    @property
    def default_key_dir(self) -> Path:
        """The key directory of a simulation run that names none: ``<run_dir>.keys``, beside the run and
        outside it, so that archiving or handing over the run directory hands over no key."""
        return self.root.parent / f"{self.root.name}.keys"

    @property
    def log(self) -> Path:
        """The run's log file (every logger, Flower's and Ray's included)."""
        return self.root / "log.txt"

    @property
    def flwr_home(self) -> Path:
        """Flower's state directory (``FLWR_HOME``) for a run the CLI starts, kept inside the run."""
        return self.root / ".flwr"

    # -- each site's directory (its own disk in deployment) ------------------------------
    @property
    def clients(self) -> Path:
        return self.root / "clients"

    def client_dir(self, site: str) -> Path:
        return self.clients / site

    def ledger(self, site: str) -> Path:
        """A site's privacy ledger."""
        return self.client_dir(site) / _LEDGER

    def ledgers(self) -> dict[str, Path]:
        """Every site ledger present, by site name."""
        return {p.parent.name: p for p in sorted(self.clients.glob(f"*/{_LEDGER}"))}

    def local_train_metrics(self, site: str) -> Path:
        """Un-noised training statistics a DP site keeps for itself."""
        return self.local_train_metrics_beside(self.ledger(site))

    @staticmethod
    def local_train_metrics_beside(ledger: str | os.PathLike) -> Path:
        """The local training statistics file in the same site directory as the ledger ``ledger``
        (for a trainer that knows its ledger, wherever the site keeps it, but not the run directory)."""
        return Path(ledger).parent / "local_train_metrics.jsonl"

    def site_key(self, site: str) -> Path:
        """A site's secret selection key (keyed record selections such as FedDRA's DRO slice; never sent)."""
        return self.client_dir(site) / "selection.key"

    def local_eval_metrics(self, site: str) -> Path:
        """A site's evaluation metrics when they stay at the site (``eval.release = "local"``)."""
        return self.client_dir(site) / "local_eval_metrics.jsonl"

    def evaluation_guard(self, site: str) -> Path:
        """A site's record of the rounds and models it evaluated (once per round; see the client app)."""
        return self.client_dir(site) / "evaluation_guard.json"

    def key_holder_export(self, site: str) -> Path:
        """Where the CLI, playing key holder ``site`` in simulation, writes the decrypted final model (0600)."""
        return self.client_dir(site) / "federated_params.npz"

    def site_downstream(self, site: str) -> Path:
        """Every downstream-evaluation result a site computed, with the model it evaluated (kept at the site)."""
        return self.client_dir(site) / "downstream_metrics.jsonl"

    def downstream_guard(self, site: str) -> Path:
        """Which models a site ran downstream evaluation on (see :mod:`secure_fedvlp.evaluation.downstream_run`)."""
        return self.client_dir(site) / "downstream_guard.json"

    def site_canaries(self, site: str) -> Path:
        """The canary records the auditor hands the canary site."""
        return self.client_dir(site) / "canaries.json"

    # -- the auditor's files ---------------------------------------------------------------
    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def canary_coins(self) -> Path:
        """Which canaries were inserted (the auditor's secret)."""
        return self.audit_dir / "canary_coins.json"

    @property
    def empirical_audit(self) -> Path:
        """The auditor's one-run empirical audit, written after training."""
        return self.root / "empirical_audit.json"

    def relative(self, path: str | os.PathLike) -> str:
        """``path`` relative to the run directory, as written in reports (``/`` separators)."""
        return Path(path).relative_to(self.root).as_posix()


@dataclass(frozen=True)
class FinishedRun:
    """A run directory as the report, the audit, the export and the empirical audit read it.

    Built by :func:`load_run`, the only place that reads a finished run's ``config.toml``, or
    directly from a config already resolved in memory (the server writing its report).
    """

    layout: RunLayout
    cfg: ExperimentConfig

    @property
    def root(self) -> Path:
        return self.layout.root

    def ledgers(self) -> dict[str, Path]:
        """Every site ledger present, by site name."""
        return self.layout.ledgers()

    def report(self) -> dict[str, Any] | None:
        """``report.json`` parsed, or ``None`` when the run has none yet."""
        path = self.layout.report_json
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}.") from None

    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (see :func:`read_metrics`)."""
        return read_metrics(self.layout.metrics)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a torn last line, from a crash mid-write, is ignored with a warning)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                logger.warning("%s: ignoring a torn last line %d", path, i)
            else:
                raise DataError(f"{path}, line {i}: not a JSON record.") from None
    return out


def load_run(run_dir: str | os.PathLike | FinishedRun) -> FinishedRun:
    """Open a run directory: its layout and its resolved config, validated.

    A :class:`FinishedRun` is returned as it is, so a caller that already holds one passes it on.
    Raises :class:`~secure_fedvlp.errors.DataError` naming the path when ``run_dir`` is not a run
    directory, and :class:`~secure_fedvlp.errors.ConfigError` when its config is invalid.
    """
    if isinstance(run_dir, FinishedRun):
        return run_dir
    layout = RunLayout(run_dir)
    if not layout.root.is_dir():
        raise DataError(f"{layout.root} is not a directory: give the run directory that `secure-fedvlp run` wrote.")
    if not layout.config.exists():
        raise DataError(f"{layout.config} is missing: {layout.root} is not a run directory.")
    cfg = load_config(layout.config)
    own = layout.public_start
    if cfg.model.init_checkpoint and not Path(cfg.model.init_checkpoint).exists() and own.is_file():
        # A moved or copied run directory: its config names the public start where the run wrote it; the
        # run's own copy is the same file.
        logger.info(
            "%s: model.init_checkpoint %s is gone; using the run's own %s",
            layout.config,
            cfg.model.init_checkpoint,
            own,
        )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=str(own.resolve())))
    return FinishedRun(layout, cfg)
