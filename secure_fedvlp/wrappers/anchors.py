"""Noised global anchors as a wrapper: a strategy mixin, a client extension and the plan they add.

The mechanism itself (per-record clipping, sensitivity, sigma, the event, decoding) is in
:mod:`secure_fedvlp.privacy.anchors`; this module makes any method anchored without the method
knowing:

* :func:`anchored_strategy` subclasses a method's strategy: before each round
  (:meth:`~AnchoredStrategyMixin.prepare_round`) it collects the sites' clipped anchor sums, adds
  the noise (trusted-aggregator mode without encryption; the encryption wrapper overrides
  :meth:`~AnchoredStrategyMixin.combine_anchors` to do it in the ciphertext domain), and attaches the
  released bank to every train message of the round;
* :class:`AnchorClient` is the site's side: it answers the anchor query, **recording the release in
  the site's ledger before the contribution leaves** (it is the component that makes the release),
  and hands each train job the decoded bank (:attr:`TrainTask.anchors
  <secure_fedvlp.methods.trainer.TrainTask.anchors>`);
* :func:`extend_plan` adds one anchor release per round to a method's release plan, so DP
  calibration plans for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.data.types import FINDINGS
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.methods.trainer import TrainTask
from secure_fedvlp.models.factory import get_model_spec
from secure_fedvlp.models.state import load_federated_state, make_collate
from secure_fedvlp.privacy.anchors import (
    ANCHOR_QUERY,
    ANCHORS_KEY,
    SUM_KEY,
    anchor_dim,
    anchor_event,
    bank_from_record,
    effective_clip,
    record_contributions,
    server_noise,
    share_noise,
    share_sigma,
    total_sigma,
)
from secure_fedvlp.privacy.ledger import PrivacyLedger
from secure_fedvlp.privacy.plan import ReleasePlan
from secure_fedvlp.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EPSILON,
    INFO_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    QUERY,
    SERVER_ROUND,
    arrays_to_numpy,
)

logger = logging.getLogger(__name__)

__all__ = ["AnchoredStrategyMixin", "anchored_strategy", "AnchorClient", "extend_plan", "site_contribution"]


def extend_plan(plan: ReleasePlan, cfg: ExperimentConfig) -> ReleasePlan:
    """``plan`` plus one anchor release per round (the event each site records before contributing)."""
    return plan.with_release(anchor_event(cfg, 0))


@torch.no_grad()
def site_contribution(
    model: nn.Module,
    dataset,
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    fixed_point_bits: int | None = None,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """A site's contribution ``S_k`` (float64): clipped per record, summed, plus its share in distributed mode."""
    labels_all = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.float32)
    emb_dim = int(model.spec.embed_dim)
    dim = anchor_dim(labels_all.shape[1], emb_dim)
    clip = effective_clip(cfg, dim, fixed_point_bits)
    was = model.training
    model.eval()
    total = torch.zeros(dim, dtype=torch.float64)
    try:
        collate = make_collate(model)
        bs = cfg.eval.batch_size
        for start in range(0, len(dataset), bs):
            items = [dataset[i] for i in range(start, min(start + bs, len(dataset)))]
            b = collate(items)
            out = model(b["images"].to(device), b["input_ids"].to(device), b["attention_mask"].to(device))
            c = record_contributions(out["image_emb"].float().cpu(), out["text_emb"].float().cpu(), b["labels"], clip)
            total += c.double().sum(0)
    finally:
        model.train(was)
    if cfg.anchors.noise == "distributed":
        gen = generator if generator is not None else torch.Generator().manual_seed(secrets.randbits(62))
        total += share_noise(cfg, dim, gen)
    return total.numpy()


# ------------------------------------------------------------------------------------ server side
class AnchoredStrategyMixin:
    """Adds the anchor round to a :class:`~secure_fedvlp.methods.strategy.VLPStrategy`.

    Use :func:`anchored_strategy` to build the class.
    """

    def __init__(self, cfg: ExperimentConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(cfg, *args, **kwargs)  # type: ignore[call-arg]
        self.current_anchors: ArrayRecord | None = None  # the round's noised bank, sent with every train message
        self.anchor_contributors: list[str] = []
        self.anchor_rng = np.random.default_rng(secrets.randbits(128))  # noise must not be reproducible

    @property
    def anchor_dim(self) -> int:
        return anchor_dim(len(FINDINGS), get_model_spec(self.cfg.model.name).embed_dim)

    def anchor_mode(self) -> str:
        """How the noise is added, in words for the report."""
        if self.cfg.anchors.noise == "distributed":
            return "distributed noise shares added by the sites"
        return "server noise, trusted aggregator (the server sees each site's un-noised sum)"

    def validate_anchor_reply(self, msg: Message, server_round: int) -> str | None:
        """Reason to drop an anchor contribution, or None."""
        content = msg.content
        if ANCHORS_KEY not in content.array_records or SUM_KEY not in content[ANCHORS_KEY]:
            return f"reply carries no '{ANCHORS_KEY}.{SUM_KEY}' array"
        a = content[ANCHORS_KEY][SUM_KEY].numpy()
        if a.shape != (self.anchor_dim,):
            return f"anchor contribution has shape {a.shape}, expected ({self.anchor_dim},)"
        if not np.isfinite(a).all():
            return "anchor contribution holds non-finite values"
        if CONFIG_KEY not in content.config_records or int(content[CONFIG_KEY].get(SERVER_ROUND, -1)) != server_round:
            return f"anchor contribution is not for round {server_round}"
        return None

    def combine_anchors(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, dict[str, str]]:
        """Plaintext: the sum of the contributions plus the server's Gaussian (trusted-aggregator mode)."""
        if len(accepted) < self.cfg.anchors.min_contributors:
            return None, {}
        total = np.zeros(self.anchor_dim)
        for msg in accepted:
            total += msg.content[ANCHORS_KEY][SUM_KEY].numpy().astype(np.float64)
        if self.cfg.anchors.noise == "server":
            total += server_noise(self.cfg, self.anchor_dim, self.anchor_rng)
        self.anchor_contributors = [self.site_name(m) for m in accepted]
        return ArrayRecord({SUM_KEY: Array(total)}), {}

    def prepare_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        super().prepare_round(server_round, grid, arrays, timeout)
        self.anchor_round(server_round, grid, arrays, timeout)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The method's train messages, each carrying the round's released bank (when one was released)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.current_anchors is not None:
            for m in messages:
                m.content[ANCHORS_KEY] = self.current_anchors
        return messages

    def anchor_query_config(self, server_round: int, node_id: int) -> ConfigRecord:
        """Config of the anchor query sent to ``node_id`` (the encryption wrapper adds its nonce)."""
        return ConfigRecord({QUERY: ANCHOR_QUERY, SERVER_ROUND: server_round})

    def anchor_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Collect the sites' clipped anchor sums and release the noised bank for this round's training."""
        self.current_anchors = None
        self.anchor_contributors = []
        nodes = self.train_nodes()
        msgs = [
            Message(
                RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: self.anchor_query_config(server_round, nid)}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in nodes
        ]
        accepted = []
        for msg in grid.send_and_receive(msgs, timeout=timeout):
            site = self.site_name(msg)
            self.note_ledger_head(server_round, msg, ANCHOR_QUERY)
            if self.note_budget_exhausted(server_round, msg, "anchors"):
                continue
            reason = (
                f"client error: {msg.error.reason}"
                if msg.has_error()
                else self.validate_anchor_reply(msg, server_round)
            )
            if reason is not None:
                self._drop(server_round, "anchors", site, reason)
                continue
            accepted.append(msg)
        record, rejected = self.combine_anchors(server_round, accepted) if accepted else (None, {})
        for site, why in rejected.items():
            self._drop(server_round, "anchors", site, why)
        need = self.cfg.anchors.min_contributors
        if record is None:
            why = (
                f"{len(accepted) - len(rejected)} valid contribution(s), fewer than anchors.min_contributors = {need}"
                if len(accepted) - len(rejected) < need
                else "no valid contribution"
            )
            logger.warning("Round %d: no anchors released (%s); sites train without them.", server_round, why)
            self.recorder.record({"round": server_round, "phase": "anchors", "status": "withheld", "reason": why})
            return
        ev = anchor_event(self.cfg, server_round)
        self.current_anchors = record
        n = len(self.anchor_contributors)
        # distributed: the shares actually summed (dropouts remove theirs; >= min_contributors remain)
        sigma = (
            share_sigma(self.cfg) * math.sqrt(n) if self.cfg.anchors.noise == "distributed" else total_sigma(self.cfg)
        )
        self.recorder.record(
            {
                "round": server_round,
                "phase": "anchors",
                "status": "released",
                "contributors": list(self.anchor_contributors),
                "mode": self.anchor_mode(),
                "clip": float(self.cfg.anchors.clip),
                "sigma_total": float(sigma),
                "sigma_accounted": float(ev.sigma),
            }
        )


def anchored_strategy(strategy_cls: type[VLPStrategy]) -> type[VLPStrategy]:
    """The anchored version of a method's strategy class (same constructor)."""
    return type(
        f"Anchored{strategy_cls.__name__}",
        (AnchoredStrategyMixin, strategy_cls),
        {"__doc__": f"{strategy_cls.__name__} with noised global anchors ({__name__})."},
    )


# ------------------------------------------------------------------------------------ client side
class AnchorClient:
    """A site's side of the anchors (a client extension of the Flower client runtime).

    ``ledger`` opens the site's privacy ledger (``None`` without DP); ``fixed_point_bits`` is the
    encryption grid when contributions are encrypted (the clip is tightened by the rounding slack).
    """

    queries = (ANCHOR_QUERY,)

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        ledger: Callable[[], PrivacyLedger] | None = None,
        fixed_point_bits: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.fixed_point_bits = fixed_point_bits

    def answer(self, rt: Any, msg: Message) -> RecordDict:
        """This site's clipped anchor sum, recorded in its ledger first (refused there if over budget)."""
        if rt.site.role != "train":
            raise RuntimeError(f"site {rt.site.name!r} is a held-out site and contributes no anchors.")
        rnd = int(msg.content[CONFIG_KEY][SERVER_ROUND])
        load_federated_state(rt.model, arrays_to_numpy(msg.content[ARRAYS_KEY]))
        metrics: dict[str, float] = {}
        if self.ledger is not None:
            ledger = self.ledger()
            ledger.record(anchor_event(self.cfg, rnd))  # before the release: refused if over budget, nothing sent
            metrics[EPSILON] = ledger.epsilon()
        data = rt.trainer.training_subset(rt.site.train)
        vec = site_contribution(rt.model, data, self.cfg, rt.device, fixed_point_bits=self.fixed_point_bits)
        metrics[NUM_EXAMPLES] = float(rt.trainer.released_train_count(rt.site.train))  # declared under DP
        return RecordDict(
            {
                ANCHORS_KEY: ArrayRecord({SUM_KEY: Array(vec.astype(np.float64))}),
                METRICS_KEY: MetricRecord(metrics),
                CONFIG_KEY: ConfigRecord({SERVER_ROUND: rnd}),
                INFO_KEY: rt.info(),
            }
        )

    def extend_task(self, rt: Any, msg: Message, task: TrainTask) -> TrainTask:
        """The job's task with the released bank decoded from the message (unchanged if none came)."""
        if ANCHORS_KEY not in msg.content.array_records:
            return task
        bank = bank_from_record(msg.content[ANCHORS_KEY], len(FINDINGS), int(rt.model.spec.embed_dim), self.cfg)
        return dataclasses.replace(task, anchors=bank)
