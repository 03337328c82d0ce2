"""The Flower ClientApp: one client per site, running the configured method's trainer.

``app`` (module level) is the entry point for ``flwr run .``; the CLI builds its own with
:func:`make_client_app` and a closure over the config it parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from secure_fedvlp.build import build_federation, build_model, configure_threads, resolve_device
from secure_fedvlp.config import config_hash, config_to_dict
from secure_fedvlp.data import SiteData
from secure_fedvlp.errors import PrivacyBudgetExhausted, ProtocolError
from secure_fedvlp.evaluation.metrics import evaluate_split
from secure_fedvlp.flower.eval_guard import EvaluationGuard, model_hash
from secure_fedvlp.flower.runtime import ConfigProvider, RunSetup, config_from_run_config, resolve_site
from secure_fedvlp.layout import RunLayout, open_site_file
from secure_fedvlp.methods.registry import get_method
from secure_fedvlp.methods.trainer import TrainTask
from secure_fedvlp.models.feature_cache import PersistentFeatures
from secure_fedvlp.models.state import federated_state, load_federated_state
from secure_fedvlp.privacy.ledger import repair_ledger, verify_ledger
from secure_fedvlp.wire import (
    ARRAYS_KEY,
    BUDGET_EXHAUSTED,
    CONFIG_KEY,
    EPSILON,
    INFO_KEY,
    LEDGER_HEAD,
    LEDGER_KEY,
    LEDGER_SEQ,
    LOCAL_STEPS,
    METRICS_KEY,
    QUERY,
    REFERENCE,
    SERVER_ROUND,
    SITE_INFO_QUERY,
    STAGE,
    UNTRAINED_REFERENCE,
    arrays_to_numpy,
    numpy_to_arrays,
)
from secure_fedvlp.wrappers.compose import client_parts, method_model

logger = logging.getLogger(__name__)

__all__ = ["ClientRuntime", "make_client_app", "app", "generic_errors_mod", "GENERIC_ERROR_REASON"]


@dataclass
class ClientRuntime:
    """Per-process state of one site's client: its data, model, trainer and extensions, built once.

    The wrappers the config asks for (DP-SGD around the trainer, the encryption state of the client
    mod, the anchor client) come composed from :func:`~secure_fedvlp.wrappers.compose.client_parts`;
    the handlers below treat them alike.

    Under DP every reply carries the head of the site's ledger after the releases it answers
    (:data:`~secure_fedvlp.wire.LEDGER_KEY`): the server logs it, and the audit checks the ledger
    against it, so the site cannot later rewrite its history consistently. Evaluation is refused
    unless it is the current round's global model, once (:mod:`secure_fedvlp.flower.eval_guard`);
    with ``eval.release = "local"`` its metrics stay in the site's directory.
    """

    setup: RunSetup
    site: SiteData
    model: torch.nn.Module
    trainer: Any  # the method's LocalTrainer, or DPTrainer around it
    device: torch.device
    encryption: Any = None  # ClientEncryption when encryption is on (used by the client mod)
    extensions: list[Any] = field(default_factory=list)  # answer extra queries, extend train tasks
    guard: EvaluationGuard | None = None  # which rounds and models the site evaluated
    ledger_path: Path | None = None  # the site's privacy ledger (DP on, training site)
    features: PersistentFeatures | None = None  # locked-tower features kept on disk (data.cache_features)
    public_loaded: int = 0  # entries read from the public set's features file (prepare_public_features)

    @classmethod
    def create(cls, setup: RunSetup, context: Context) -> ClientRuntime:
        cfg = setup.cfg
        configure_threads(cfg.run.threads_per_client)
        federation = build_federation(cfg)
        site = resolve_site(context, federation)
        if cfg.audit.canaries:  # the canary site adds the canaries the auditor gave it
            from secure_fedvlp.evaluation.canary_files import insert_canaries

            site = insert_canaries(cfg, setup.run_dir, site, [s.name for s in federation.sites])
        device = resolve_device(cfg.run.device)
        model = method_model(cfg).to(device)
        initial = federated_state(model)
        parts = client_parts(cfg, setup.run_dir, site, initial, device, federation.public)
        guard = EvaluationGuard(
            RunLayout(setup.run_dir).evaluation_guard(site.name),
            site.name,
            cfg.federation.num_rounds,
            model_hash(initial),  # with model.init_checkpoint: the public start's hash
            references=(UNTRAINED_REFERENCE,) if cfg.model.init_checkpoint else (),
        )
        features, public_loaded = None, 0
        if cfg.data.cache_features:
            stem = feature_file_stem(cfg, site.name)
            features = PersistentFeatures(model, Path(cfg.data.cache_dir) / "features", stem)
            features.load()
            if uses_public_features(cfg):
                # the public set's features, computed once by the operator (prepare_public_features); read only
                public_loaded = PersistentFeatures(model, *public_features_file(cfg)).load()
        logger.info(
            "Client for site %s (%s) ready on %s%s",
            site.name,
            site.role,
            device,
            " (CKKS encryption on)" if parts.encryption is not None else "",
        )
        return cls(
            setup,
            site,
            model,
            parts.trainer,
            device,
            parts.encryption,
            parts.extensions,
            guard,
            parts.ledger_path,
            features,
            public_loaded,
        )

    # -- handlers ------------------------------------------------------------------
    def info(self) -> ConfigRecord:
        """Name, role, training-split size (under DP the declared public size, never the count held) and modality."""
        size = self.trainer.released_site_size(self.site.train)
        return ConfigRecord(
            {"site": self.site.name, "role": self.site.role, "num-train": int(size), "modality": self.site.modality}
        )

    def with_ledger_head(self, content: RecordDict) -> RecordDict:
        """``content`` with the site's ledger head (hash and sequence number of its last entry), under DP.

        The ledger is read back and verified from disk, after the releases this reply answers were recorded.
        """
        if self.ledger_path is not None:
            # a write torn by another process of this site that died is dropped if never committed (logged)
            repair_ledger(self.ledger_path, client_id=self.site.name)
            head = verify_ledger(self.ledger_path, client_id=self.site.name)
            content[LEDGER_KEY] = ConfigRecord({LEDGER_HEAD: str(head.hash), LEDGER_SEQ: head.count - 1})
        return content

    def _exhausted(self, exc: Exception) -> RecordDict:
        logger.warning("site %s stops: %s", self.site.name, exc)
        return RecordDict(
            {
                METRICS_KEY: MetricRecord({BUDGET_EXHAUSTED: 1.0, EPSILON: self.trainer.ledger.epsilon()}),
                CONFIG_KEY: ConfigRecord({"reason": str(exc)}),
                INFO_KEY: self.info(),
            }
        )

    def train(self, msg: Message) -> RecordDict:
        try:
            content = self._train(msg)
        except PrivacyBudgetExhausted as exc:
            content = self._exhausted(exc)
        self.keep_features()
        return self.with_ledger_head(content)

    def fresh_features(self) -> None:
        """Read what other processes of this site added to the features file since (never fails a reply)."""
        self._features_io("refresh", "read from")

    def keep_features(self) -> None:
        """Write the locked towers' outputs computed so far to the site's cache, if they grew (never fails a reply)."""
        self._features_io("sync", "written to")

    def _features_io(self, action: str, what: str) -> None:
        if self.features is None:
            return
        try:
            getattr(self.features, action)()
        except OSError as e:
            logger.warning("site %s: locked-tower features not %s the cache (%s)", self.site.name, what, e)

    def _train(self, msg: Message) -> RecordDict:
        if self.site.role != "train":
            raise RuntimeError(f"site {self.site.name!r} is a held-out site and never trains.")
        cfg = msg.content[CONFIG_KEY]
        reserved = {SERVER_ROUND, STAGE, LOCAL_STEPS}
        task = TrainTask(
            server_round=int(cfg[SERVER_ROUND]),
            stage=str(cfg.get(STAGE, "full")),
            steps=int(cfg.get(LOCAL_STEPS, self.setup.cfg.train.local_steps)),
            options={k: float(v) for k, v in cfg.items() if k not in reserved and isinstance(v, (int, float))},
            records={k: arrays_to_numpy(r) for k, r in msg.content.array_records.items() if k != ARRAYS_KEY},
            strings={k: v for k, v in cfg.items() if isinstance(v, str)},
        )
        global_state = arrays_to_numpy(msg.content[ARRAYS_KEY])
        if self.guard is not None:  # the first model of a round must be the one evaluated for the round before
            self.guard.train(task.server_round, model_hash(global_state))
        for ext in self.extensions:
            task = ext.extend_task(self, msg, task)
        load_federated_state(self.model, global_state)
        self.fresh_features()
        seed = _job_seed(self.setup.cfg.run.seed, self.site.name, task)
        gen = torch.Generator().manual_seed(seed)
        # Dropout and other layers draw from torch's global generator: seed it per job too, so a
        # run is reproducible whichever process handles the message.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            metrics = self.trainer.fit(self.model, self.site.train, task, gen, global_state)
        content = RecordDict({k: numpy_to_arrays(v) for k, v in self.trainer.reply_arrays(self.model).items()})
        content[METRICS_KEY] = MetricRecord(metrics)
        content[INFO_KEY] = self.info()
        return content

    def query(self, msg: Message) -> RecordDict:
        """Answer a query: ``site-info`` here, an extension's kind by the extension, anything else by the trainer."""
        cfg = msg.content[CONFIG_KEY]
        kind = str(cfg.get(QUERY, SITE_INFO_QUERY))
        if kind == SITE_INFO_QUERY:
            return RecordDict({INFO_KEY: self.info()})
        if self.guard is not None and SERVER_ROUND in cfg:
            self.guard.seen(int(cfg[SERVER_ROUND]))
        try:
            content = self._answer(kind, msg, cfg)
        except PrivacyBudgetExhausted as exc:
            content = self._exhausted(exc)
        return self.with_ledger_head(content)

    def _answer(self, kind: str, msg: Message, cfg: ConfigRecord) -> RecordDict:
        for ext in self.extensions:
            if kind in ext.queries:
                return ext.answer(self, msg)
        if ARRAYS_KEY in msg.content.array_records:
            load_federated_state(self.model, arrays_to_numpy(msg.content[ARRAYS_KEY]))
        metrics = self.trainer.answer_query(kind, self.model, self.site, cfg)
        return RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: self.info()})

    def evaluate(self, msg: Message) -> RecordDict:
        """Evaluate the round's global model on the site's split, once per round (see :mod:`.eval_guard`).

        ``eval.release = "clear"``: the metrics go to the server. ``"local"``: they are appended to the
        site's own file (:meth:`RunLayout.local_eval_metrics`) and the reply carries none.

        A request naming a ``reference`` (:data:`~secure_fedvlp.wire.UNTRAINED_REFERENCE`, when the
        round-0 model is a public start) carries no model: the site builds the untrained (seeded) model
        itself from the config and evaluates it once, before round 1.
        """
        cfg = msg.content[CONFIG_KEY] if CONFIG_KEY in msg.content.config_records else ConfigRecord()
        if SERVER_ROUND not in cfg:
            raise ProtocolError(f"site {self.site.name}: an evaluate message must name its round; refused.")
        rnd = int(cfg[SERVER_ROUND])
        reference = str(cfg[REFERENCE]) if REFERENCE in cfg else None
        if reference is not None:
            if self.guard is not None:
                self.guard.evaluate_reference(reference)  # recorded before anything is evaluated
            if get_method(self.setup.cfg.federation.method).model_builder is None:
                model = build_model(self.setup.cfg, untrained=True).to(self.device)
            else:  # a method with a model of its own (FedSM) builds its seeded one
                model = method_model(self.setup.cfg).to(self.device)
        else:
            state = arrays_to_numpy(msg.content[ARRAYS_KEY])
            if self.guard is not None:
                self.guard.evaluate(rnd, model_hash(state))  # recorded before anything is evaluated
            load_federated_state(self.model, state)
            model = self.model
            self.fresh_features()
        ev = self.setup.cfg.eval
        split = self.site.test if ev.split == "test" else self.site.val
        evaluate = getattr(self.trainer, "evaluate_model", None)  # a method with its own metrics (FedSM: Dice)
        if evaluate is not None:
            metrics = evaluate(model, split, ev, self.device)
        else:
            metrics = evaluate_split(model, split, ks=ev.recall_ks, batch_size=ev.batch_size, device=self.device)
        if model is self.model:
            self.keep_features()
        if ev.release == "local":
            path = RunLayout(self.setup.run_dir).local_eval_metrics(self.site.name)
            row = {"round": rnd, **({"reference": reference} if reference is not None else {}), **metrics}
            with open_site_file(path) as fh:  # 0600: the site's own record
                fh.write(json.dumps(row, sort_keys=True) + "\n")
            logger.info("site %s round %d: evaluation kept at the site (%s)", self.site.name, rnd, path)
            return self.with_ledger_head(RecordDict({INFO_KEY: self.info()}))
        return self.with_ledger_head(RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: self.info()}))


def public_features_file(cfg) -> tuple[Path, str]:  # noqa: ANN001 - ExperimentConfig
    """(directory, stem) of the public set's features file: beside the sites' ``features/``, never one of its files."""
    return Path(cfg.data.cache_dir) / "public_features", feature_file_stem(cfg, "public")


def uses_public_features(cfg) -> bool:  # noqa: ANN001 - ExperimentConfig
    """Whether local training embeds the public set through the locked towers at the start of every site's job.

    That is the decomposable objective with ``train.bank = "current"``
    (:class:`~secure_fedvlp.methods.trainer.CurrentBank`), when the towers are locked
    (``model.trainable = "heads"`` or ``"image_head"``).
    """
    return (
        cfg.model.trainable in ("heads", "image_head")
        and cfg.train.objective == "decomposable"
        and cfg.train.bank == "current"
    )


def prepare_public_features(cfg, public) -> int:  # noqa: ANN001 - ExperimentConfig, VLPDataset
    """Compute the locked towers' outputs for the public set once, before any site trains; return the entries.

    Every training site embeds the same public reference set with the same locked towers at the start
    of its first job (:class:`~secure_fedvlp.methods.trainer.CurrentBank`): on the DP demo that is
    1,024 reports through MiniLM, about 14 s of a core per site.  The operator, who holds the public
    set and the public start, computes them here into ``<data.cache_dir>/public_features/public-<data
    config>-<towers digest>.npz`` and each client reads that file when it starts (a site whose towers differ, or that
    finds no file, computes them itself: the file is only a cache, and holds public data only).
    Returns 0 when there is nothing to do (features not cached, the public set unused or empty, the
    towers not locked), or the number of entries the file held or now holds.
    """
    if not (cfg.data.cache_features and uses_public_features(cfg)) or public is None or len(public) == 0:
        return 0
    from secure_fedvlp.methods.trainer import CurrentBank

    model = method_model(cfg)
    store = PersistentFeatures(model, *public_features_file(cfg))
    if store.path is None:
        return 0
    if store.load():
        return store.loaded
    CurrentBank(model, public, cfg.eval.batch_size, torch.device("cpu"))  # fills the towers' caches
    try:
        store.sync()
    except OSError as e:  # only a cache: each site then computes the features itself
        logger.warning("the public set's locked-tower features could not be written to %s (%s)", store.path, e)
        return 0
    return store.held


def feature_file_stem(cfg, site: str) -> str:
    """Name of a site's locked-tower feature file (the towers' digest is appended): the site and its data config."""
    data = json.dumps(config_to_dict(cfg.data), sort_keys=True, default=str)
    return f"{site}-{hashlib.sha256(data.encode()).hexdigest()[:12]}"


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


#: The only error text a site sends: what went wrong stays in the site's own log, because an error message
#: can carry private information (which records overflowed under a crafted model, a file name, a count).
GENERIC_ERROR_REASON = "the site could not process this request; the details are in the site's own log"


def generic_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost client mod: any exception becomes a generic error reply; details go to the site's log only."""
    try:
        return call_next(msg, context)
    except Exception:  # noqa: BLE001 - every failure is answered alike
        logger.exception(
            "site (node %s) failed on a %s message of run %s",
            context.node_id,
            msg.metadata.message_type,
            msg.metadata.run_id,
        )
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=GENERIC_ERROR_REASON), reply_to=msg)


def make_client_app(provider: ConfigProvider = config_from_run_config) -> ClientApp:
    """A ClientApp whose config comes from ``provider(context)``.

    The encryption mod is always installed; it passes messages through untouched
    unless the run's config turns encryption on.
    """
    from secure_fedvlp.wrappers.encryption import make_encryption_mod

    def runtime(context: Context) -> ClientRuntime:
        return get_runtime(provider, context)

    client_app = ClientApp(mods=[generic_errors_mod, make_encryption_mod(runtime)])

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
