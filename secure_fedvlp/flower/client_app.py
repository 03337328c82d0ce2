"""The Flower ClientApp: one client per site, running the configured method's trainer.

``app`` (module level) is the entry point for ``flwr run .``; the CLI builds its own with
:func:`make_client_app` and a closure over the config it parsed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from secure_fedvlp.config import config_hash
from secure_fedvlp.errors import PrivacyBudgetExhausted
from secure_fedvlp.data import SiteData
from secure_fedvlp.evaluation.metrics import evaluate_split
from secure_fedvlp.flower.runtime import (
    ConfigProvider,
    RunSetup,
    build_federation,
    build_model,
    config_from_run_config,
    configure_threads,
    resolve_device,
    resolve_site,
)
from secure_fedvlp.methods import get_method
from secure_fedvlp.privacy.anchors import ANCHOR_QUERY, ANCHORS_KEY
from secure_fedvlp.methods.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    INFO_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    LocalTrainer,
    TrainTask,
    arrays_to_numpy,
    federated_state,
    load_federated_state,
    numpy_to_arrays,
)

logger = logging.getLogger(__name__)

__all__ = ["ClientRuntime", "make_client_app", "app", "ledger_path"]

BUDGET_EXHAUSTED = "budget-exhausted"


def ledger_path(run_dir, site: str):
    """Where a site's privacy ledger lives (in deployment: on the site's own disk)."""
    from pathlib import Path

    return Path(run_dir) / "clients" / site / "privacy_ledger.jsonl"


@dataclass
class ClientRuntime:
    """Per-process state of one site's client: its data, model and trainer, built once."""

    setup: RunSetup
    site: SiteData
    model: torch.nn.Module
    trainer: LocalTrainer
    device: torch.device
    secagg: Any = None  # ClientSecAgg when encryption is on

    @classmethod
    def create(cls, setup: RunSetup, context: Context) -> ClientRuntime:
        cfg = setup.cfg
        configure_threads(cfg.run.threads_per_client)
        federation = build_federation(cfg)
        site = resolve_site(context, federation)
        if cfg.audit.canaries:  # the canary site adds the canaries the auditor gave it
            from secure_fedvlp.data.canaries import insert_canaries

            site = insert_canaries(cfg, setup.run_dir, site, [s.name for s in federation.sites])
        device = resolve_device(cfg.run.device)
        model = build_model(cfg).to(device)
        trainer = get_method(cfg.federation.method).trainer(cfg, device, federation.public)
        if cfg.privacy.enabled and site.role == "train":  # a held-out site releases no DP output
            from secure_fedvlp.privacy.dpsgd import DPTrainer, client_noise_multiplier, make_ledger

            path = ledger_path(setup.run_dir, site.name)
            make_ledger(path, site.name, cfg.privacy)  # create (or resume and verify) it now
            z, q = client_noise_multiplier(cfg, len(trainer.training_subset(site.train)))
            logger.info("site %s: DP-SGD noise multiplier %.4f, sample rate %.4f, budget eps=%g delta=%g",
                        site.name, z, q, cfg.privacy.target_epsilon, cfg.privacy.delta)
            trainer = DPTrainer(trainer, path, site.name, z, q, cfg.privacy)
        secagg = None
        if cfg.encryption.enabled:
            from secure_fedvlp.flower.secagg import ClientSecAgg

            secagg = ClientSecAgg.load(cfg, setup.run_dir, site.name, federated_state(model))
        logger.info("Client for site %s (%s) ready on %s%s", site.name, site.role, device,
                    " (CKKS encryption on)" if secagg is not None else "")
        return cls(setup, site, model, trainer, device, secagg)

    # -- handlers ------------------------------------------------------------------
    def info(self) -> ConfigRecord:
        return ConfigRecord({"site": self.site.name, "role": self.site.role, "num-train": len(self.site.train)})

    def _exhausted(self, exc: Exception) -> RecordDict:
        logger.warning("site %s stops: %s", self.site.name, exc)
        return RecordDict({METRICS_KEY: MetricRecord({BUDGET_EXHAUSTED: 1.0, "epsilon": self.trainer.ledger.epsilon()}),
                           CONFIG_KEY: ConfigRecord({"reason": str(exc)}), INFO_KEY: self.info()})

    def train(self, msg: Message) -> RecordDict:
        try:
            return self._train(msg)
        except PrivacyBudgetExhausted as exc:
            return self._exhausted(exc)

    def _train(self, msg: Message) -> RecordDict:
        if self.site.role != "train":
            raise RuntimeError(f"site {self.site.name!r} is a held-out site and never trains.")
        cfg = msg.content[CONFIG_KEY]
        reserved = {"server-round", "stage", "local-steps"}
        task = TrainTask(server_round=int(cfg["server-round"]), stage=str(cfg.get("stage", "full")),
                         steps=int(cfg.get("local-steps", self.setup.cfg.train.local_steps)),
                         options={k: float(v) for k, v in cfg.items()
                                  if k not in reserved and isinstance(v, (int, float))})
        if ANCHORS_KEY in msg.content.array_records:
            from dataclasses import replace

            from secure_fedvlp.data.types import FINDINGS
            from secure_fedvlp.privacy.anchors import bank_from_record

            task = replace(task, anchors=bank_from_record(msg.content[ANCHORS_KEY], len(FINDINGS),
                                                          int(self.model.spec.embed_dim), self.setup.cfg))
        global_state = arrays_to_numpy(msg.content[ARRAYS_KEY])
        load_federated_state(self.model, global_state)
        seed = _job_seed(self.setup.cfg.run.seed, self.site.name, task)
        gen = torch.Generator().manual_seed(seed)
        # Dropout and other layers draw from torch's global generator: seed it per job too, so a
        # run is reproducible whichever process handles the message.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            metrics = self.trainer.fit(self.model, self.site.train, task, gen, global_state)
        return RecordDict({ARRAYS_KEY: numpy_to_arrays(federated_state(self.model)),
                           METRICS_KEY: MetricRecord(metrics), INFO_KEY: self.info()})

    def query(self, msg: Message) -> RecordDict:
        """Answer a query: ``site-info`` here, anything else by the method's trainer."""
        cfg = msg.content[CONFIG_KEY]
        kind = str(cfg.get("query", "site-info"))
        if kind == "site-info":
            return RecordDict({INFO_KEY: self.info()})
        if kind == ANCHOR_QUERY:
            try:
                return self.anchor_contribution(msg)
            except PrivacyBudgetExhausted as exc:
                return self._exhausted(exc)
        if ARRAYS_KEY in msg.content.array_records:
            load_federated_state(self.model, arrays_to_numpy(msg.content[ARRAYS_KEY]))
        try:
            metrics = self.trainer.answer_query(kind, self.model, self.site, cfg)
        except PrivacyBudgetExhausted as exc:
            return self._exhausted(exc)
        return RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: self.info()})

    def anchor_contribution(self, msg: Message) -> RecordDict:
        """This site's clipped anchor sum (privacy/anchors.py), recorded in its ledger first."""
        from flwr.app import Array, ArrayRecord

        from secure_fedvlp.privacy.anchors import ANCHORS_KEY, SUM_KEY, anchor_event, site_contribution

        if self.site.role != "train":
            raise RuntimeError(f"site {self.site.name!r} is a held-out site and contributes no anchors.")
        cfg = self.setup.cfg
        if not cfg.anchors.enabled:
            raise RuntimeError("the server asked for anchors but anchors.enabled is false in this site's config.")
        rnd = int(msg.content[CONFIG_KEY]["server-round"])
        load_federated_state(self.model, arrays_to_numpy(msg.content[ARRAYS_KEY]))
        metrics: dict[str, float] = {}
        if cfg.privacy.enabled:
            ledger = self.trainer.ledger
            ledger.record(anchor_event(cfg, rnd))  # before the release: refused if over budget, nothing sent
            metrics["epsilon"] = ledger.epsilon()
        data = self.trainer.training_subset(self.site.train)
        vec = site_contribution(self.model, data, cfg, self.device,
                                fixed_point_bits=self.secagg.fixed_point_bits if self.secagg is not None else None)
        metrics[NUM_EXAMPLES] = float(len(data))
        return RecordDict({ANCHORS_KEY: ArrayRecord({SUM_KEY: Array(vec.astype(np.float64))}),
                           METRICS_KEY: MetricRecord(metrics), CONFIG_KEY: ConfigRecord({"server-round": rnd}),
                           INFO_KEY: self.info()})

    def evaluate(self, msg: Message) -> RecordDict:
        load_federated_state(self.model, arrays_to_numpy(msg.content[ARRAYS_KEY]))
        ev = self.setup.cfg.eval
        split = self.site.test if ev.split == "test" else self.site.val
        metrics = evaluate_split(self.model, split, ks=ev.recall_ks, batch_size=ev.batch_size, device=self.device)
        return RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: self.info()})


def _job_seed(seed: int, site: str, task: TrainTask) -> int:
    """Deterministic, distinct seed per (run seed, site, round, stage)."""
    digest = hashlib.sha256(f"{seed}/{site}/{task.server_round}/{task.stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


_RUNTIMES: dict[tuple[str, str, int], ClientRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()


def get_runtime(provider: ConfigProvider, context: Context) -> ClientRuntime:
    """The process-wide runtime of the node in ``context`` (built on first use).

    Module level on purpose: Ray pickles the ClientApp's closures by value, and this
    function (with the lock and the cache it uses) must travel by reference.
    """
    setup = provider(context)
    key = (config_hash(setup.cfg), str(setup.run_dir), context.node_id)
    with _RUNTIMES_LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES[key] = ClientRuntime.create(setup, context)
        return _RUNTIMES[key]


def make_client_app(provider: ConfigProvider = config_from_run_config) -> ClientApp:
    """A ClientApp whose config comes from ``provider(context)``.

    The secure-aggregation mod is always installed; it passes messages through untouched
    unless the run's config turns encryption on.
    """
    from secure_fedvlp.flower.secagg import make_secagg_mod

    def runtime(context: Context) -> ClientRuntime:
        return get_runtime(provider, context)

    client_app = ClientApp(mods=[make_secagg_mod(runtime)])

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(runtime(context).query(msg), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(runtime(context).train(msg), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(runtime(context).evaluate(msg), reply_to=msg)

    return client_app


app = make_client_app()
