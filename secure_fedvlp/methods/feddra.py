"""FedDRA and FedAID (arXiv 2404.03854 v3 and v2): one implementation, two schedules.

Server (:class:`FedDRAStrategy`)
    * keeps robust client weights ``q`` in a chi-square ball around a centre (uniform or
      data-size), updated each round by mirror ascent on per-client losses measured on a
      held-out slice of each client's *training* split (as the authors do), and persisted
      across rounds (``mode = "robust"``);
    * aggregates with ``theta = sum_k q_k theta_k`` (renormalised over the clients that
      replied);
    * FedDRA: two train stages per round, each a Flower train message: stage 1 trains
      only alignment layers and heads, is aggregated, and becomes the anchor's heads;
      stage 2 trains the whole network (every federated parameter) and is aggregated
      again.  FedAID: one stage, same machinery.
    * ``mode = "faithful"`` reproduces the released code: q is reset to uniform before
      each update, used only to scale local losses, and aggregation is an unweighted mean.

Client (:class:`FedDRATrainer`)
    * anchor guidance: a frozen copy of the global model received with the message gives
      each record's anchor embeddings; the local loss adds
      ``lambda * (d(v, v_anchor) + d(t, t_anchor))`` (MSE on normalised embeddings, as the
      authors do, or 1 - cosine).  It compares a record only with the global model's view
      of the *same* record, so it is per-sample decomposable;
    * optional loss scaling by ``K * q_k``;
    * answers the server's ``dro-loss`` query with its mean loss on the held-out slice.  The
      slice is chosen record by record: a record belongs to it iff ``HMAC-SHA256(site key, record
      id)``, read as a number in ``[0, 1)``, is below ``feddra.holdout_fraction``
      (:func:`~secure_fedvlp.privacy.relation.keyed_fraction_mask`).  Adding or removing a record
      moves no other record between the slice and the training records, and the key, a secret in
      the site's own directory, never leaves it.  Its public (declared) size is
      ``feddra.slice_size(declared size)``, the report's denominator under DP.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.methods.dro import centre_weights, mirror_ascent_step
from secure_fedvlp.methods.registry import register_method
from secure_fedvlp.methods.strategy import RoundRecorder, VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models.state import make_collate
from secure_fedvlp.objectives import AnchorGuidanceLoss
from secure_fedvlp.privacy.anchors import guidance_targets
from secure_fedvlp.privacy.plan import ReleasePlan, StagePlan
from secure_fedvlp.privacy.relation import keyed_fraction_mask
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY

logger = logging.getLogger(__name__)

__all__ = ["FedDRAStrategy", "FedAIDStrategy", "FedDRATrainer", "DRO_LOSS_QUERY"]

DRO_LOSS_QUERY = "dro-loss"
LOSS_SCALE = "loss-scale"
#: Domain separation of the DRO slice's keyed hash (another keyed selection would use its own).
DRO_SLICE_PURPOSE = "feddra/dro-slice"


class FedDRATrainer(LocalTrainer):
    """Local trainer with anchor guidance, loss scaling and the DRO-loss report."""

    name = "feddra"

    def __init__(self, cfg: ExperimentConfig, device: torch.device, public=None) -> None:
        super().__init__(cfg, device, public)
        self.anchor_loss = AnchorGuidanceLoss(distance=cfg.feddra.anchor_distance)

    # -- the held-out slice of the training split -------------------------------------
    def slice_mask(self, dataset) -> np.ndarray:
        """Which records of ``dataset`` form the DRO slice: a keyed hash of each record's id alone."""
        return keyed_fraction_mask(
            self.site_key(), dataset.record_ids, self.cfg.feddra.holdout_fraction, DRO_SLICE_PURPOSE
        )

    def training_subset(self, dataset):
        return super().training_subset(dataset.subset(np.flatnonzero(~self.slice_mask(dataset))))

    def dro_subset(self, dataset):
        return super().training_subset(dataset.subset(np.flatnonzero(self.slice_mask(dataset))))

    def declared_training_size(self, declared: int) -> int:
        """The declared size less the declared DRO slice."""
        return max(1, int(declared) - self.cfg.feddra.slice_size(declared))

    def declared_report_count(self, kind: str, declared: int) -> int | None:
        if kind == DRO_LOSS_QUERY:
            return self.cfg.feddra.slice_size(declared)
        return super().declared_report_count(kind, declared)

    # -- local objective ----------------------------------------------------------------
    def begin(
        self, model: nn.Module, task: TrainTask, global_state: Mapping[str, np.ndarray], dataset=None
    ) -> dict[str, Any]:
        state = super().begin(model, task, global_state, dataset=dataset)
        state["loss_scale"] = float(task.options.get(LOSS_SCALE, 1.0))
        if self.cfg.feddra.anchor_weight > 0:
            anchor = copy.deepcopy(model)  # the model holds the global parameters when a job begins
            anchor.eval()
            for p in anchor.parameters():
                p.requires_grad_(False)
            state["anchor"] = anchor
        return state

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], state: dict[str, Any], reduction: str = "mean"
    ) -> dict[str, torch.Tensor]:
        terms = super().compute_loss(model, batch, state, reduction=reduction)
        scale = state.get("loss_scale", 1.0)
        if scale != 1.0:
            terms["loss"] = terms["loss"] * scale
        return terms

    def extra_terms(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        out: dict[str, torch.Tensor],
        state: dict[str, Any],
        reduction: str = "mean",
    ) -> dict[str, torch.Tensor]:
        extra: dict[str, torch.Tensor] = {}
        anchor = state.get("anchor")
        if anchor is not None:
            with torch.no_grad():
                a = anchor(batch["images"], batch["input_ids"], batch["attention_mask"])
            terms = self.anchor_loss(
                out["image_emb"], out["text_emb"], a["image_emb"], a["text_emb"], reduction=reduction
            )
            extra["anchor"] = self.cfg.feddra.anchor_weight * terms["loss"]
        bank = state.get("anchor_bank")
        if bank is not None and self.cfg.anchors.use_for_guidance and self.cfg.feddra.anchor_weight > 0:
            # Guidance by the noised global anchors: each record is pulled towards the anchors
            # of its own findings (a function of the record and of a DP release only: decomposable).
            img_t, txt_t, has = guidance_targets(batch["labels"], bank)
            per = ((out["image_emb"] - img_t) ** 2).mean(-1) + ((out["text_emb"] - txt_t) ** 2).mean(-1)
            per = self.cfg.feddra.anchor_weight * per * has.to(per.dtype)
            extra["anchor_bank"] = per if reduction == "none" else per.mean()
        return extra

    # -- the DRO loss report ------------------------------------------------------------
    @torch.no_grad()
    def record_losses(self, model: nn.Module, dataset) -> torch.Tensor:
        """Local objective of the (global) model on each record of the held-out slice.

        With the decomposable objective these are true per-record losses.  The in-batch
        objective has none (a record's loss depends on its batch); each record then carries
        its batch's mean loss, which is only used without DP (the DP config refuses it).
        """
        subset = self.dro_subset(dataset)
        model.eval()
        try:
            state = LocalTrainer.begin(self, model, TrainTask(0, "full", 0), {})
            collate = make_collate(model)
            bs = max(2, min(self.cfg.train.batch_size, len(subset)))
            values = []
            for start in range(0, len(subset), bs):
                items = [subset[i] for i in range(start, min(start + bs, len(subset)))]
                if len(items) < 2 and self.objective.couples_samples:
                    break
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in collate(items).items()}
                out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
                if self.objective.couples_samples:
                    loss = self.objective(out["image_emb"], out["text_emb"], model.logit_scale)["loss"]
                    values.append(loss.expand(len(items)))
                else:
                    values.append(
                        self.objective(
                            out["image_emb"],
                            out["text_emb"],
                            model.logit_scale,
                            state["neg_image"],
                            state["neg_text"],
                            reduction="none",
                        )["loss"]
                    )
        finally:
            model.train()
        return torch.cat(values).cpu() if values else torch.zeros(0)

    def report_values(self, kind: str, model: nn.Module, site, config: Mapping[str, Any]) -> torch.Tensor | None:
        if kind == DRO_LOSS_QUERY:
            return self.record_losses(model, site.train)
        return super().report_values(kind, model, site, config)


class FedDRAStrategy(VLPStrategy):
    """FedDRA: robust client weights + two-stage rounds (see module docstring)."""

    method_name = "feddra"
    two_stage = True

    def __init__(self, cfg: ExperimentConfig, recorder: RoundRecorder | None = None) -> None:
        super().__init__(cfg, recorder)
        self.dra = cfg.feddra
        self.q: dict[str, float] = {}
        self.centre: dict[str, float] = {}

    # -- weights ------------------------------------------------------------------------
    def init_weights(self) -> None:
        train = [s for s in self.sites.values() if s.role == "train"]
        c = centre_weights(self.dra.centre, [max(1, s.num_train) for s in train])
        self.centre = {s.site: float(ci) for s, ci in zip(train, c, strict=True)}
        self.q = dict(self.centre)
        self.recorder.record({"round": 0, "phase": "dro", "weights": dict(self.q), "centre": dict(self.centre)})

    def discover(self, grid: Grid, expected_nodes: int, timeout: float):
        sites = super().discover(grid, expected_nodes, timeout)
        self.init_weights()
        return sites

    def aggregation_weights(self, server_round: int, stage: str, replies: list[Message]) -> list[float]:
        if self.dra.mode == "faithful":
            return [1.0] * len(replies)
        return [self.q[self.site_name(m)] for m in replies]

    def planned_weight(self, site: str, stage: str) -> float | None:
        """``q_k`` times the total training-set size (the scale keeps fixed-point CKKS sums precise)."""
        total = float(sum(max(1, s.num_train) for s in self.sites.values() if s.role == "train"))
        if self.dra.mode == "faithful":
            return total / max(1, len(self.q))
        return self.q[site] * total

    def loss_scale(self, site: str) -> float:
        if self.dra.mode == "faithful" or self.dra.loss_scaling:
            return len(self.q) * self.q[site]
        return 1.0

    def update_weights(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Query DRO losses of the new global model and take one mirror-ascent step on q."""
        nodes = self.train_nodes()
        msgs = [
            Message(
                RecordDict(
                    {
                        ARRAYS_KEY: arrays,
                        CONFIG_KEY: ConfigRecord({"query": DRO_LOSS_QUERY, "server-round": server_round}),
                    }
                ),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in nodes
        ]
        losses: dict[str, float] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            site = self.site_name(reply)
            self.note_ledger_head(server_round, reply, DRO_LOSS_QUERY)
            if self.note_budget_exhausted(server_round, reply, "dro"):
                continue
            if reply.has_error():
                logger.warning("Round %d: no DRO loss from %s: %s", server_round, site, reply.error.reason)
                continue
            value = float(reply.content[METRICS_KEY][DRO_LOSS_QUERY])
            if not np.isfinite(value):
                logger.warning("Round %d: DRO loss from %s is not finite; ignored.", server_round, site)
                continue
            losses[site] = value
        if not losses:
            logger.warning("Round %d: no DRO losses arrived; weights unchanged.", server_round)
            return
        names = sorted(losses)
        prior = self.centre if self.dra.mode == "faithful" else self.q  # faithful: reset to centre each round
        mass = sum(prior[s] for s in names)
        q_sub = np.array([prior[s] for s in names]) / mass
        c_sub = np.array([self.centre[s] for s in names])
        c_sub = c_sub / c_sub.sum()
        new = mirror_ascent_step(q_sub, [losses[s] for s in names], self.dra.eta, self.dra.rho, c_sub)
        q = dict(prior)
        for s, v in zip(names, new, strict=True):
            q[s] = float(v * mass)
        total = sum(q.values())
        self.q = {s: v / total for s, v in q.items()}
        self.recorder.record({"round": server_round, "phase": "dro", "losses": losses, "weights": dict(self.q)})

    def checkpoint_state(self) -> dict[str, Any]:
        return {"q": dict(self.q)}

    def restore_state(self, state: dict[str, Any]) -> None:
        if "q" in state:
            self.q = {str(k): float(v) for k, v in state["q"].items()}

    # -- rounds -------------------------------------------------------------------------
    @classmethod
    def release_plan(cls, cfg: ExperimentConfig) -> ReleasePlan:
        """FedDRA: an ``align`` stage of ``feddra.stage1_steps`` then a ``full`` stage of
        ``feddra.stage2_steps`` (``train.local_steps`` when 0); FedAID: the ``full`` stage only.
        Both ask each site for one noised DRO-loss report per round."""
        full = StagePlan("full", cfg.feddra.stage2_steps or cfg.train.local_steps)
        stages = (StagePlan("align", cfg.feddra.stage1_steps), full) if cls.two_stage else (full,)
        return ReleasePlan(stages=stages, reports=(DRO_LOSS_QUERY,))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = []
        for nid in self.sample_train_nodes(server_round):
            node_cfg = ConfigRecord(dict(config))
            node_cfg[LOSS_SCALE] = float(self.loss_scale(self.sites[nid].site))
            messages.append(
                Message(
                    RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: node_cfg}),
                    dst_node_id=nid,
                    message_type=MessageType.TRAIN,
                )
            )
        return messages

    def train_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        arrays = super().train_round(server_round, grid, arrays, timeout)
        self.update_weights(server_round, grid, arrays, timeout)
        return arrays


class FedAIDStrategy(FedDRAStrategy):
    """FedAID: FedDRA's machinery without the two-stage schedule."""

    method_name = "fedaid"
    two_stage = False


register_method(
    "feddra",
    FedDRAStrategy,
    FedDRATrainer,
    "Distributionally robust alignment: chi-square DRO weights, anchor guidance, two-stage rounds.",
)
register_method(
    "fedaid",
    FedAIDStrategy,
    FedDRATrainer,
    "Align as Ideal: FedDRA's DRO weights and anchor guidance in one stage per round.",
)
