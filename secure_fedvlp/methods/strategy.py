"""The server side of every method: discovery, sampling, validated aggregation, the round loop.

:class:`VLPStrategy` extends Flower's Message-API ``FedAvg``; a method overrides only what
differs (FedDRA: :meth:`~VLPStrategy.release_plan`, :meth:`~VLPStrategy.aggregation_weights`,
:meth:`~VLPStrategy.train_round`).  Wrappers (anchors, encryption) subclass a method's strategy
and hook into :meth:`~VLPStrategy.prepare_round`, :meth:`~VLPStrategy.configure_train` and the
combine/validate hooks; nothing here knows about them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.errors import ProtocolError
from secure_fedvlp.privacy.plan import ReleasePlan, StagePlan
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
    NUM_EXAMPLES,
    QUERY,
    REFERENCE,
    SERVER_ROUND,
    SITE_INFO_QUERY,
    STAGE,
    UNTRAINED_REFERENCE,
    arrays_to_numpy,
    numpy_to_arrays,
)

logger = logging.getLogger(__name__)

__all__ = ["SiteInfo", "RoundRecorder", "VLPStrategy", "refuse_duplicate_sites", "round_participation"]


@dataclass(frozen=True)
class SiteInfo:
    """What a node said about itself in discovery."""

    node_id: int
    site: str
    role: str  # "train" or "heldout"
    num_train: int
    modality: str = "paired"  # what the site holds: "paired", "image" or "text"


class RoundRecorder:
    """Receives per-round, per-site records from a strategy (no-op base)."""

    def record(self, record: dict[str, Any]) -> None:  # noqa: D401
        """Store one record."""

    def progress(self, message: str) -> None:
        """Show progress to the user."""
        logger.info(message)


def _finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


class VLPStrategy(FedAvg):
    """Base server strategy: FedAvg over train sites, federated evaluation on every site.

    Extends :class:`flwr.serverapp.strategy.FedAvg` with what a federated medical VLP run
    needs and plain FedAvg lacks:

    * **discovery**: a ``query`` message asks each node which site it serves; held-out
      sites are evaluated but never trained;
    * **round-0 evaluation** of the round-0 model, as the reference: the untrained (seeded) model, or
      the public start (``model.init_checkpoint``), beside which every site then also evaluates the
      untrained model once (:meth:`evaluate_reference`; the site builds it itself);
    * **robust aggregation**: each reply is validated on its own (keys, shapes, finite
      values, positive weight) and a bad one is dropped with its reason, never the round;
    * per-site records of every train and evaluate reply to a :class:`RoundRecorder`.
    """

    method_name = "fedavg"
    #: The site modalities this method's trainer can learn from.  The shared objectives need
    #: image-report pairs, so an image-only or text-only site is never asked to train (it is still
    #: evaluated); a method that learns from single-modality sites (CreamFL) widens this.
    trains_on: tuple[str, ...] = ("paired",)

    def __init__(self, cfg: ExperimentConfig, recorder: RoundRecorder | None = None) -> None:
        fed = cfg.federation
        super().__init__(
            fraction_train=fed.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=fed.min_train_clients,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.cfg = cfg
        self.recorder = recorder or RoundRecorder()
        self.sites: dict[int, SiteInfo] = {}
        self.stopped: dict[str, int] = {}  # site -> round at which its privacy budget ran out
        self._rng = random.Random(cfg.run.seed)
        self.plan = self.release_plan(cfg)
        self.participation: list[dict[str, Any]] = []  # the current round's stages (see run_stage)
        self.site_binding: Callable[[int, str], str | None] | None = None  # see check_site_claim
        self.last_accepted: dict[str, list[str]] = {}  # stage -> sites whose update the latest aggregate holds

    # -- discovery -----------------------------------------------------------------
    def discover(self, grid: Grid, expected_nodes: int, timeout: float) -> dict[int, SiteInfo]:
        """Ask every connected node for its site.

        Waits up to ``federation.discovery_timeout_s`` for ``expected_nodes`` to connect, then
        goes on with those present (a warning names the shortfall); replies wait up to ``timeout``.
        """
        deadline = time.monotonic() + self.cfg.federation.discovery_timeout_s
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < expected_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = list(grid.get_node_ids())
        if len(node_ids) < expected_nodes:
            logger.warning(
                "Only %d of the %d expected sites connected within %.0fs; starting without the others "
                "(with `flwr run`, pass --federation-config 'num-supernodes=%d').",
                len(node_ids),
                expected_nodes,
                self.cfg.federation.discovery_timeout_s,
                expected_nodes,
            )
        msgs = [
            Message(
                RecordDict({CONFIG_KEY: ConfigRecord({QUERY: SITE_INFO_QUERY})}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in node_ids
        ]
        sites: dict[int, SiteInfo] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("Node %s did not answer discovery: %s", nid, reply.error.reason)
                continue
            info = reply.content[INFO_KEY]
            claimed = SiteInfo(
                nid, str(info["site"]), str(info["role"]), int(info["num-train"]), str(info.get("modality", "paired"))
            )
            refusal = self.check_site_claim(nid, claimed.site)
            if refusal is not None:
                logger.warning("Node %s refused at discovery: %s", nid, refusal)
                self.recorder.record(
                    {"round": 0, "phase": "discovery", "site": claimed.site, "status": "refused", "reason": refusal}
                )
                continue
            sites[nid] = claimed
        refuse_duplicate_sites(sites.values())
        if not any(s.role == "train" for s in sites.values()):
            raise RuntimeError("no training site answered discovery; cannot start federated training.")
        if not any(s.role == "train" and s.modality in self.trains_on for s in sites.values()):
            raise RuntimeError(
                f"no training site holds what federation.method = {self.method_name!r} learns from "
                f"({', '.join(self.trains_on)}); the sites hold {sorted({s.modality for s in sites.values()})}."
            )
        self.sites = dict(sorted(sites.items(), key=lambda kv: kv[1].site))
        logger.info("Discovered sites: %s", ", ".join(f"{s.site}({s.role})" for s in self.sites.values()))
        return self.sites

    def check_site_claim(self, node_id: int, site: str) -> str | None:
        """Reason to refuse node ``node_id``'s claim to serve ``site``, or None to accept it.

        Every claim is accepted unless :attr:`site_binding` is set: a deployment binds each site to its
        authenticated node (:mod:`secure_fedvlp.flower.nodes`) and refuses the rest.
        """
        return None if self.site_binding is None else self.site_binding(node_id, site)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a method carries from round to round besides the model (JSON), saved with each checkpoint."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`checkpoint_state` when a run resumes."""

    def train_nodes(self) -> list[int]:
        """Training sites able to train: not held out, budget left, holding what the method learns from."""
        return [
            nid
            for nid, s in self.sites.items()
            if s.role == "train" and s.site not in self.stopped and s.modality in self.trains_on
        ]

    def note_budget_exhausted(self, server_round: int, msg: Message, phase: str) -> bool:
        """If ``msg`` says its site's privacy budget is spent, stop training it; return True if so."""
        if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
            return False
        if float(msg.content[METRICS_KEY].get(BUDGET_EXHAUSTED, 0.0)) < 1.0:
            return False
        site = self.site_name(msg)
        reason = str(msg.content[CONFIG_KEY]["reason"]) if CONFIG_KEY in msg.content.config_records else ""
        self.stopped.setdefault(site, server_round)
        logger.warning("Round %d: site %s stopped training: privacy budget exhausted (%s)", server_round, site, reason)
        self.recorder.record(
            {
                "round": server_round,
                "phase": phase,
                "site": site,
                "status": "budget_exhausted",
                "reason": reason,
                "epsilon": float(msg.content[METRICS_KEY].get(EPSILON, 0.0)),
            }
        )
        return True

    def note_ledger_head(self, server_round: int, msg: Message, release: str, stage: str | None = None) -> None:
        """Log the ledger head a DP site's reply carries (the audit's external reference).

        ``release`` is what the reply answers (``"train"``, a query kind such as ``"anchors"`` or
        ``"dro-loss"``, or ``"evaluate"``).  One record per reply (``phase = "ledger"``), in the
        server's own metrics file, with the epsilon the site reported and whether it refused the
        release for its budget (then nothing was released).
        """
        if msg.has_error() or LEDGER_KEY not in msg.content.config_records:
            return
        led = msg.content[LEDGER_KEY]
        metrics = msg.content[METRICS_KEY] if METRICS_KEY in msg.content.metric_records else {}
        row: dict[str, Any] = {
            "round": server_round,
            "phase": "ledger",
            "release": release,
            "site": self.site_name(msg),
            "refused_for_budget": float(metrics.get(BUDGET_EXHAUSTED, 0.0)) >= 1.0,
            "ledger_head": str(led.get(LEDGER_HEAD, "")),
            "ledger_seq": int(led.get(LEDGER_SEQ, -1)),
        }
        if stage is not None:
            row["stage"] = stage
        if EPSILON in metrics:
            row["epsilon"] = float(metrics[EPSILON])
        self.recorder.record(row)

    # -- configure -----------------------------------------------------------------
    def sample_train_nodes(self, server_round: int) -> list[int]:
        """Seeded sample of training nodes (all of them with fraction_train = 1)."""
        nodes = self.train_nodes()
        k = max(self.min_train_nodes, int(math.ceil(len(nodes) * self.fraction_train)))
        k = min(k, len(nodes))
        return sorted(self._rng.sample(nodes, k))

    @classmethod
    def release_plan(cls, cfg: ExperimentConfig) -> ReleasePlan:
        """What a training site releases per round under this method: one full stage of ``train.local_steps``.

        The strategy executes this plan (:meth:`train_round` sends its stages with their step
        counts) and DP calibration consumes it, so the two cannot disagree.
        """
        return ReleasePlan(stages=(StagePlan("full", cfg.train.local_steps),))

    def stage_config(self, server_round: int, stage: str) -> ConfigRecord:
        """Config sent with a train message of ``stage`` (override to add method keys)."""
        return ConfigRecord({SERVER_ROUND: server_round, STAGE: stage, LOCAL_STEPS: self.plan.stage(stage).steps})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        node_ids = self.sample_train_nodes(server_round)
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[SERVER_ROUND] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._construct_messages(record, list(self.sites), MessageType.EVALUATE)

    # -- aggregate -----------------------------------------------------------------
    def site_name(self, msg: Message) -> str:
        s = self.sites.get(msg.metadata.src_node_id)
        return s.site if s else f"node-{msg.metadata.src_node_id}"

    def validate_reply(self, msg: Message, reference: Mapping[str, np.ndarray] | None) -> str | None:
        """Reason to drop a train reply, or None if it is well formed."""
        content = msg.content
        if ARRAYS_KEY not in content.array_records:
            return "reply carries no 'arrays' record"
        if METRICS_KEY not in content.metric_records or NUM_EXAMPLES not in content[METRICS_KEY]:
            return f"reply carries no '{METRICS_KEY}.{NUM_EXAMPLES}'"
        weight = float(content[METRICS_KEY][NUM_EXAMPLES])
        if not (weight > 0 and math.isfinite(weight)):
            return f"weight {NUM_EXAMPLES}={weight!r} is not a positive finite number"
        if reference is None:
            return None
        arrays = content[ARRAYS_KEY]
        if set(arrays.keys()) != set(reference):
            missing = sorted(set(reference) - set(arrays.keys()))[:3]
            extra = sorted(set(arrays.keys()) - set(reference))[:3]
            return f"parameter names differ from the global model (missing {missing}, unexpected {extra})"
        for k, ref in reference.items():
            a = arrays[k].numpy()
            if a.shape != ref.shape:
                return f"parameter {k!r} has shape {a.shape}, expected {ref.shape}"
            if not _finite(a):
                return f"parameter {k!r} holds non-finite values"
        return None

    def aggregation_weights(self, server_round: int, stage: str, replies: list[Message]) -> list[float]:
        """Weights of accepted replies (example counts for FedAvg); normalised by the caller."""
        return [float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in replies]

    def planned_weight(self, site: str, stage: str) -> float | None:
        """A site's aggregation weight fixed before training (``None``: its ``num-examples``).

        Encrypted aggregation needs weights before the updates exist (clients weight, then
        encrypt); methods whose weights are not example counts (FedDRA) override this so that
        plaintext and encrypted runs weight alike.
        """
        return None

    def reference_state(self, reference: ArrayRecord | None) -> Mapping[str, np.ndarray] | None:
        """The global state replies are checked against (None: no check)."""
        return arrays_to_numpy(reference) if reference is not None else None

    def combine_updates(
        self, server_round: int, stage: str, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
        """Weighted mean of the accepted replies' parameters: ``(arrays, metrics, {site: reason dropped})``."""
        weights = np.asarray(self.aggregation_weights(server_round, stage, accepted), dtype=np.float64)
        weights = weights / weights.sum()
        names = list(accepted[0].content[ARRAYS_KEY].keys())
        agg = {}
        for name in names:
            acc = None
            for w, msg in zip(weights, accepted, strict=True):
                a = msg.content[ARRAYS_KEY][name].numpy().astype(np.float64)
                acc = w * a if acc is None else acc + w * a
            agg[name] = acc.astype(np.float32)
        total = float(sum(float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in accepted))
        metrics = {NUM_EXAMPLES: total, "clients": float(len(accepted))}
        losses = [m.content[METRICS_KEY].get("train_loss") for m in accepted]
        if all(x is not None for x in losses):  # DP replies carry no training loss
            metrics["train_loss"] = float(np.average([float(x) for x in losses], weights=weights))
        return numpy_to_arrays(agg), MetricRecord(metrics), {}

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        stage: str = "full",
        reference: ArrayRecord | None = None,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ref = self.reference_state(reference)
        accepted: list[Message] = []
        for msg in replies:
            site = self.site_name(msg)
            self.note_ledger_head(server_round, msg, "train", stage)
            if self.note_budget_exhausted(server_round, msg, "train"):
                continue
            if msg.has_error():
                reason = f"client error: {msg.error.reason}"
            else:
                reason = self.validate_reply(msg, ref)
            if reason is not None:
                self._drop(server_round, stage, site, reason)
                continue
            accepted.append(msg)
        self.last_accepted[stage] = []
        if not accepted:
            return None, None
        arrays, metrics, rejected = self.combine_updates(server_round, stage, accepted)
        if arrays is not None:  # the sites whose update is in the new model (FedSM's SoftPull needs them)
            self.last_accepted[stage] = [self.site_name(m) for m in accepted if self.site_name(m) not in rejected]
        for msg in accepted:
            site = self.site_name(msg)
            if site in rejected:
                self._drop(server_round, stage, site, rejected[site])
                continue
            values = {k: float(v) for k, v in msg.content[METRICS_KEY].items()}
            self.recorder.record(
                {"round": server_round, "stage": stage, "phase": "train", "site": site, "status": "ok", **values}
            )
        return arrays, metrics

    def _drop(self, server_round: int, stage: str, site: str, reason: str) -> None:
        logger.warning("Round %d (%s): dropped reply from %s: %s", server_round, stage, site, reason)
        self.recorder.record(
            {
                "round": server_round,
                "stage": stage,
                "phase": "train",
                "site": site,
                "status": "dropped",
                "reason": reason,
            }
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message], *, reference: str | None = None
    ) -> MetricRecord | None:
        """Record every evaluate reply (``reference``: the reference model the replies evaluated, written into
        each record) and return the training sites' example-weighted mean metrics."""
        rows = []
        tag = {"reference": reference} if reference is not None else {}
        for msg in replies:
            site = self.site_name(msg)
            if msg.has_error():
                logger.warning("Round %d: evaluation failed at %s: %s", server_round, site, msg.error.reason)
                self.recorder.record(
                    {
                        "round": server_round,
                        "phase": "evaluate",
                        "site": site,
                        "status": "error",
                        "reason": msg.error.reason,
                        **tag,
                    }
                )
                continue
            role = self.sites[msg.metadata.src_node_id].role if msg.metadata.src_node_id in self.sites else "?"
            self.note_ledger_head(server_round, msg, "evaluate")
            if METRICS_KEY not in msg.content.metric_records:  # eval.release = "local": the site kept them
                self.recorder.record(
                    {
                        "round": server_round,
                        "phase": "evaluate",
                        "site": site,
                        "role": role,
                        "status": "kept_at_site",
                        **tag,
                    }
                )
                continue
            metrics = {k: float(v) for k, v in msg.content[METRICS_KEY].items()}
            self.recorder.record(
                {
                    "round": server_round,
                    "phase": "evaluate",
                    "site": site,
                    "role": role,
                    "status": "ok",
                    **tag,
                    **metrics,
                }
            )
            if role == "train":
                rows.append(metrics)
        if not rows:
            return None
        keys = set.intersection(*(set(r) for r in rows)) - {NUM_EXAMPLES}
        w = np.asarray([r[NUM_EXAMPLES] for r in rows])
        out = {k: float(np.average([r[k] for r in rows], weights=w)) for k in sorted(keys)}
        out[NUM_EXAMPLES] = float(w.sum())
        return MetricRecord(out)

    # -- the round loop --------------------------------------------------------------
    def run_stage(self, server_round: int, stage: str, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        """Send one train stage, aggregate, and return the new global arrays (or the old on failure).

        How many sites were asked and how many contributions the aggregate holds go to
        :attr:`participation` (the round's record, and the report's degraded rounds, read it).
        """
        messages = list(self.configure_train(server_round, arrays, self.stage_config(server_round, stage), grid))
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        agg, metrics = self.aggregate_train(server_round, replies, stage=stage, reference=arrays)
        accepted = 0 if agg is None else int(float((metrics or {}).get("clients", len(replies))))
        self.participation.append(
            {"stage": stage, "sampled": len(messages), "accepted": accepted, "adopted": agg is not None}
        )
        if agg is None:
            logger.warning(
                "Round %d (%s): no valid update arrived; the global model is unchanged.", server_round, stage
            )
            return arrays
        return agg

    def prepare_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Work before a round's training (wrappers hook in here: the anchor release). None by default."""

    def train_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        """One round of training: the plan's stages in order, each sent, aggregated and adopted."""
        for stage in self.plan.stages:
            arrays = self.run_stage(server_round, stage.stage, grid, arrays, timeout)
        return arrays

    def evaluate_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> MetricRecord | None:
        replies = list(
            grid.send_and_receive(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=timeout)
        )
        return self.aggregate_evaluate(server_round, replies)

    def evaluate_reference(self, kind: str, grid: Grid, timeout: float) -> MetricRecord | None:
        """Every site evaluates the reference model ``kind`` once, before round 1 (round 0 of the records,
        tagged ``reference``).  The request carries no arrays: a site builds the reference itself from the
        config (:data:`~secure_fedvlp.wire.UNTRAINED_REFERENCE`: the seeded model without the checkpoint)."""
        config = ConfigRecord({SERVER_ROUND: 0, REFERENCE: kind})
        messages = self._construct_messages(RecordDict({CONFIG_KEY: config}), list(self.sites), MessageType.EVALUATE)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        return self.aggregate_evaluate(0, replies, reference=kind)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        expected_nodes: int = 1,
        first_round: int = 1,
        resume_state: dict[str, Any] | None = None,
        on_round: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Discovery, the reference evaluations (round 0), then rounds ``first_round..num_rounds`` of train + evaluate.

        Round 0 evaluates ``initial_arrays``, the model every party builds from the config: the untrained
        model, or the public start when ``model.init_checkpoint`` is set; with a public start every site
        first evaluates the untrained model as well (:meth:`evaluate_reference`).

        ``first_round > 1`` resumes a run whose earlier rounds are done: ``initial_arrays`` is the
        model adopted at round ``first_round - 1`` and ``resume_state`` what :meth:`checkpoint_state`
        returned then (restored after discovery); the reference evaluations are not repeated.
        ``on_round(round, arrays)`` is called after each round's training (the server's checkpoint).
        Each round's record (``phase = "round"``) states whether it adopted an aggregate and how many
        of the sites asked contributed to it (``degraded`` when fewer).
        """
        result = Result()
        self.discover(grid, expected_nodes, timeout)
        t0 = time.perf_counter()
        if first_round <= 1:
            public_start = bool(self.cfg.model.init_checkpoint)
            if public_start:
                m = self.evaluate_reference(UNTRAINED_REFERENCE, grid, timeout)
                self.recorder.progress(f"untrained reference (seeded model, before the public start): {_fmt(m)}")
            m = self.evaluate_round(0, grid, initial_arrays, timeout)
            if m is not None:
                result.evaluate_metrics_clientapp[0] = m
            what = "public start reference" if public_start else "untrained reference"
            self.recorder.progress(f"round 0/{num_rounds} ({what}): {_fmt(m)}")
        else:
            self.restore_state(dict(resume_state or {}))
            self.recorder.record({"round": first_round - 1, "phase": "resume", "first_round": first_round})
            self.recorder.progress(f"resuming at round {first_round}/{num_rounds}")
        arrays = initial_arrays
        for rnd in range(max(1, first_round), num_rounds + 1):
            t_round = time.perf_counter()
            self.participation = []
            self.prepare_round(rnd, grid, arrays, timeout)
            arrays = self.train_round(rnd, grid, arrays, timeout)
            # Server-side wall time of the training round (configure -> replies -> new global model),
            # read by benchmarks/bench_encrypted_round.py.
            self.recorder.record(
                {
                    "round": rnd,
                    "phase": "round",
                    "train_seconds": time.perf_counter() - t_round,
                    **round_participation(self.participation),
                }
            )
            if on_round is not None:
                on_round(rnd, arrays)
            result.arrays = arrays
            if self.cfg.eval.every_round or rnd == num_rounds:
                m = self.evaluate_round(rnd, grid, arrays, timeout)
                if m is not None:
                    result.evaluate_metrics_clientapp[rnd] = m
                self.recorder.progress(f"round {rnd}/{num_rounds} [{time.perf_counter() - t0:.0f}s]: {_fmt(m)}")
            else:
                self.recorder.progress(f"round {rnd}/{num_rounds} trained [{time.perf_counter() - t0:.0f}s]")
        result.arrays = arrays
        return result


def round_participation(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """A round's participation from its stages' (see :meth:`VLPStrategy.run_stage`): whether any stage
    adopted an aggregate, the fewest contributions among the stages, and whether fewer sites contributed
    than were asked (``degraded``: a site crashed, timed out or was dropped)."""
    if not stages:
        return {"adopted": False, "sampled": 0, "accepted": 0, "degraded": True}
    return {
        "adopted": any(s["adopted"] for s in stages),
        "sampled": max(s["sampled"] for s in stages),
        "accepted": min(s["accepted"] for s in stages),
        "degraded": any(s["accepted"] < s["sampled"] for s in stages),
    }


def refuse_duplicate_sites(sites: Iterable[SiteInfo]) -> None:
    """Raise :class:`~secure_fedvlp.errors.ProtocolError` when two nodes claim the same site.

    Contributions, ledgers and weights are keyed by site name: a second node under an honest site's
    name would make one of the two updates silently vanish, so the run does not start.
    """
    by_site: dict[str, list[int]] = {}
    for s in sites:
        by_site.setdefault(s.site, []).append(s.node_id)
    dup = {site: nodes for site, nodes in sorted(by_site.items()) if len(nodes) > 1}
    if dup:
        which = "; ".join(f"site {site!r} by nodes {', '.join(map(str, nodes))}" for site, nodes in dup.items())
        raise ProtocolError(
            f"discovery refused: more than one node claims the same site ({which}); each site must be "
            "served by exactly one node (check each SuperNode's --node-config \"site='...'\")."
        )


def _fmt(m: MetricRecord | None) -> str:
    if m is None:
        return "no evaluation replies"
    keys = ("zs_auroc_macro", "mean_R@5")
    return ", ".join(f"{k}={float(m[k]):.3f}" for k in keys if k in m) or json.dumps(dict(m))
