"""Shared bases of every method: the client trainer and the server strategy.

A method is a pair (strategy, trainer) registered under a name
(:mod:`secure_fedvlp.methods.registry`).  Variants override only what differs
(STYLE.md item 1): FedProx overrides :meth:`LocalTrainer.regularizer`; FedDRA overrides
:meth:`VLPStrategy.train_round` and :meth:`VLPStrategy.aggregation_weights`.

Privacy and encryption wrap these classes (client mods, strategy wrappers, trainer
wrappers); nothing here knows about them.

Wire format
-----------
* Only the *federated* parameters travel: those with ``requires_grad`` in the model
  (frozen pretrained layers and seeded frozen init are identical at every party).
* ``train`` messages carry ``arrays`` (global federated parameters) and ``config``
  (``server-round``, ``stage``, ``local-steps``); replies carry ``arrays`` (the new local
  parameters), ``metrics`` (``num-examples``, loss terms) and ``info`` (site name).
* ``query`` messages ask a node which site it serves and its role (train / heldout).
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.result import Result
from torch import nn
from torch.utils.data import DataLoader

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.objectives import DecomposableContrastiveLoss, InfoNCELoss

logger = logging.getLogger(__name__)

__all__ = [
    "SiteInfo",
    "TrainTask",
    "LocalTrainer",
    "VLPStrategy",
    "federated_state",
    "load_federated_state",
    "make_collate",
    "RoundRecorder",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
INFO_KEY = "info"
NUM_EXAMPLES = "num-examples"
BUDGET_EXHAUSTED = "budget-exhausted"


# --------------------------------------------------------------------------- parameters


def federated_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The parameters that travel: every parameter with ``requires_grad``, as float32 numpy."""
    return {n: p.detach().cpu().float().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


def load_federated_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load federated parameters into ``model`` in place; names and shapes must match exactly."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    got = set(arrays)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ValueError(f"federated state mismatch: missing {missing[:5]}, unexpected {extra[:5]}.")
    with torch.no_grad():
        for name, value in arrays.items():
            p = params[name]
            t = torch.as_tensor(np.asarray(value))
            if t.numel() == p.numel() == 1:  # Flower's Array stores 0-d scalars as shape (1,)
                t = t.reshape(p.shape)
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"parameter {name!r}: shape {tuple(t.shape)} != model shape {tuple(p.shape)}.")
            p.copy_(t.to(dtype=p.dtype, device=p.device))


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> ordered dict of numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Ordered dict of numpy arrays -> ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class TrainTask:
    """One local training job, as sent by the server."""

    server_round: int
    stage: str  # "full": every federated parameter; "align": alignment layers and heads only
    steps: int
    options: Mapping[str, float] = field(default_factory=dict)  # method-specific scalars from the server
    anchors: Any = None  # the round's noised anchor bank (privacy.anchors.AnchorBank), when anchors are on


def make_collate(model: nn.Module) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Collate dataset items into a batch, tokenising reports with the model's tokenizer."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        reports = [it["report"] for it in items]
        tok = model.tokenize(reports)
        return {
            "images": torch.stack([it["image"] for it in items]),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "labels": torch.stack([it["labels"] for it in items]),
            "index": torch.as_tensor([it["index"] for it in items]),
        }

    return collate


class LocalTrainer:
    """Local training at one client: the FedAvg trainer, and the base of every method's trainer.

    The loop is split into hooks so that methods and privacy wrappers override one piece:
    :meth:`trainable_names` (which parameters a stage trains), :meth:`make_optimizer`,
    :meth:`make_loader`, :meth:`compute_loss` and :meth:`extra_terms`.
    """

    name = "fedavg"

    def __init__(self, cfg: ExperimentConfig, device: torch.device, public=None) -> None:
        self.cfg = cfg
        self.device = device
        self.public = public  # public reference set (negatives of the decomposable objective)
        self.objective = self.make_objective()

    # -- hooks ---------------------------------------------------------------------
    def make_objective(self) -> nn.Module:
        """In-batch InfoNCE, or the per-sample decomposable loss with public negatives."""
        if self.cfg.train.objective == "decomposable":
            return DecomposableContrastiveLoss()
        return InfoNCELoss()

    @torch.no_grad()
    def negative_banks(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Public reference set embedded by the (global) model: privacy-free negatives."""
        if self.public is None or len(self.public) == 0:
            raise ValueError("the decomposable objective needs a public reference set; none was given.")
        from secure_fedvlp.evaluation.metrics import embed_images, embed_texts

        was = model.training
        model.eval()
        try:
            bs = self.cfg.eval.batch_size
            imgs = embed_images(model, self.public.images, bs, self.device).to(self.device)
            txts = embed_texts(model, [r for r in self.public.reports if r], bs, self.device).to(self.device)
        finally:
            model.train(was)
        return imgs, txts

    def trainable_names(self, model: nn.Module, stage: str) -> list[str]:
        """Federated parameters trained in ``stage``."""
        fed = [n for n, p in model.named_parameters() if p.requires_grad]
        if stage == "full":
            return fed
        if stage == "align":
            align = set(model.parameter_groups()["alignment"])
            return [n for n in fed if n in align]
        raise ValueError(f"unknown training stage {stage!r}; expected 'full' or 'align'.")

    def make_optimizer(self, model: nn.Module, names: list[str]) -> torch.optim.Optimizer:
        """AdamW (or SGD) with a smaller learning rate for the pretrained text tower."""
        params = dict(model.named_parameters())
        text = [params[n] for n in names if n.startswith("text_encoder.")]
        other = [params[n] for n in names if not n.startswith("text_encoder.")]
        t = self.cfg.train
        groups = [g for g in ({"params": other, "lr": t.lr}, {"params": text, "lr": t.text_lr or t.lr}) if g["params"]]
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)

    def make_loader(self, dataset, model: nn.Module, generator: torch.Generator) -> DataLoader:
        """Shuffled mini-batches of paired records."""
        bs = min(self.cfg.train.batch_size, len(dataset))
        return DataLoader(dataset, batch_size=bs, shuffle=True, drop_last=len(dataset) > bs,
                          generator=generator, collate_fn=make_collate(model))

    def training_subset(self, dataset):
        """Records usable by the objective (paired image and report)."""
        keep = np.flatnonzero(np.asarray(dataset.has_image, bool) & np.asarray(dataset.has_text, bool))
        return dataset if keep.size == len(dataset) else dataset.subset(keep)

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], state: dict[str, Any],
                     reduction: str = "mean") -> dict[str, torch.Tensor]:
        """Named loss terms for one batch; ``loss`` is their total.

        Every term here must be a mean over records of a function of each record alone
        (or of the whole batch for the coupled in-batch objective, which DP refuses).
        ``reduction="none"`` returns the per-record terms ``[B]`` instead of their batch means
        (DP-SGD's ghost clipping rescales each record's loss; the coupled objective has no
        per-record loss and refuses it).  Data-independent terms belong in :meth:`regularizer`.
        """
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        terms = dict(self.objective_terms(model, out, state, reduction=reduction, batch=batch))
        for name, value in self.extra_terms(model, batch, out, state, reduction=reduction).items():
            terms[name] = value
            terms["loss"] = terms["loss"] + value
        return terms

    def objective_terms(self, model: nn.Module, out: dict[str, torch.Tensor], state: dict[str, Any],
                        reduction: str = "mean", batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The contrastive objective's named terms.

        The decomposable objective's positives are the global model's views of the batch's
        records (``state["pos_image"]``/``["pos_text"]``, indexed by ``batch["index"]``; see
        :class:`~secure_fedvlp.objectives.DecomposableContrastiveLoss` for why).
        """
        if self.objective.couples_samples:
            return self.objective(out["image_emb"], out["text_emb"], model.logit_scale, reduction=reduction)
        if "pos_image" not in state or batch is None:
            raise ValueError("the decomposable objective takes each record's positive from the global model's view "
                             "of it: call begin(model, task, global_state, dataset=<the training records>) and pass "
                             "the batch.")
        idx = batch["index"].to(state["pos_image"].device)
        return self.objective(out["image_emb"], out["text_emb"], model.logit_scale,
                              state["neg_image"], state["neg_text"], reduction=reduction,
                              pos_image=state["pos_image"][idx], pos_text=state["pos_text"][idx])

    def extra_terms(self, model: nn.Module, batch: dict[str, Any], out: dict[str, torch.Tensor],
                    state: dict[str, Any], reduction: str = "mean") -> dict[str, torch.Tensor]:
        """Additional per-sample loss terms (anchor guidance, ...), reduced like :meth:`compute_loss`. None by default."""
        return {}

    def regularizer(self, model: nn.Module, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Data-independent loss terms (FedProx's proximal term, ...). None by default.

        They depend on no record, so under DP-SGD their gradient is added to the noised
        gradient (post-processing) instead of going through per-sample clipping.
        """
        return {}

    @torch.no_grad()
    def global_views(self, model: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The (global) model's image and report embeddings of every record of ``dataset``, by position.

        Computed once per job, before the first step, in eval mode; they never leave the client.
        """
        from secure_fedvlp.evaluation.metrics import embed_images, embed_texts

        was = model.training
        model.eval()
        try:
            bs = self.cfg.eval.batch_size
            imgs = embed_images(model, dataset.images, bs, self.device).to(self.device)
            txts = embed_texts(model, list(dataset.reports), bs, self.device).to(self.device)
        finally:
            model.train(was)
        return imgs, txts

    def begin(self, model: nn.Module, task: TrainTask, global_state: Mapping[str, np.ndarray],
              dataset=None) -> dict[str, Any]:
        """Per-job state (negative banks, the global model's views of ``dataset``, ...); called before training.

        ``dataset`` is the job's training records (the positions ``batch["index"]`` refers to);
        the decomposable objective needs it.
        """
        state: dict[str, Any] = {}
        if not self.objective.couples_samples:
            state["neg_image"], state["neg_text"] = self.negative_banks(model)
            bank = task.anchors
            if bank is not None and len(bank) and self.cfg.anchors.use_as_negatives:
                # DP-released anchors (post-processing): extra negatives that hold no record of this batch
                state["neg_image"] = torch.cat([state["neg_image"], bank.image.to(self.device)])
                state["neg_text"] = torch.cat([state["neg_text"], bank.text.to(self.device)])
            if dataset is not None:
                state["pos_image"], state["pos_text"] = self.global_views(model, dataset)
        if task.anchors is not None and len(task.anchors):
            state["anchor_bank"] = task.anchors
        return state

    def report_values(self, kind: str, model: nn.Module, site, config: Mapping[str, Any]) -> torch.Tensor | None:
        """Per-record values of a scalar report the server asked for (None: not a report of this method).

        The report released is their mean.  Keeping the per-record values visible lets the
        DP wrapper clip each record's value and noise the sum before anything is released.
        """
        return None

    def answer_query(self, kind: str, model: nn.Module, site, config: Mapping[str, Any]) -> dict[str, float]:
        """Answer a method-specific ``query`` message (the model holds the arrays it carried)."""
        values = self.report_values(kind, model, site, config)
        if values is None:
            raise ValueError(f"method {self.name!r} does not answer query {kind!r}.")
        return {kind: float(values.mean()) if len(values) else 0.0, NUM_EXAMPLES: float(len(values))}

    # -- loop ----------------------------------------------------------------------
    def fit(self, model: nn.Module, dataset, task: TrainTask, generator: torch.Generator,
            global_state: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Run ``task.steps`` optimisation steps; return mean loss terms and ``num-examples``."""
        dataset = self.training_subset(dataset)
        if len(dataset) < 2:
            raise ValueError(f"site has {len(dataset)} paired training records; at least 2 are needed.")
        federated = {n for n, p in model.named_parameters() if p.requires_grad}
        names = set(self.trainable_names(model, task.stage))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        try:
            model.train()
            optimizer = self.make_optimizer(model, [n for n, _ in model.named_parameters() if n in names])
            loader = self.make_loader(dataset, model, generator)
            state = self.begin(model, task, global_state, dataset=dataset)
            sums: dict[str, float] = {}
            steps = 0
            t0 = time.perf_counter()
            while steps < task.steps:
                for batch in loader:
                    batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                    optimizer.zero_grad(set_to_none=True)
                    terms = self.compute_loss(model, batch, state)
                    reg = self.regularizer(model, state)
                    total = terms["loss"] + sum(reg.values()) if reg else terms["loss"]
                    terms.update(reg)
                    total.backward()
                    if self.cfg.train.grad_clip > 0:
                        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                 self.cfg.train.grad_clip)
                    optimizer.step()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    steps += 1
                    if steps >= task.steps:
                        break
            metrics = {f"train_{k}": v / max(steps, 1) for k, v in sums.items()}
            metrics["steps"] = float(steps)
            metrics["train_seconds"] = time.perf_counter() - t0
            metrics[NUM_EXAMPLES] = float(len(dataset))
            return metrics
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(n in federated)


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class SiteInfo:
    """What a node said about itself in discovery."""

    node_id: int
    site: str
    role: str  # "train" or "heldout"
    num_train: int


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
    * **round-0 evaluation** of the untrained model, as the reference;
    * **robust aggregation**: each reply is validated on its own (keys, shapes, finite
      values, positive weight) and a bad one is dropped with its reason, never the round;
    * per-site records of every train and evaluate reply to a :class:`RoundRecorder`.
    """

    method_name = "fedavg"

    def __init__(self, cfg: ExperimentConfig, recorder: RoundRecorder | None = None) -> None:
        fed = cfg.federation
        super().__init__(fraction_train=fed.fraction_train, fraction_evaluate=1.0,
                         min_train_nodes=fed.min_train_clients, min_evaluate_nodes=1, min_available_nodes=1,
                         weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY)
        self.cfg = cfg
        self.recorder = recorder or RoundRecorder()
        self.sites: dict[int, SiteInfo] = {}
        self.stopped: dict[str, int] = {}  # site -> round at which its privacy budget ran out
        self._rng = random.Random(cfg.run.seed)
        # Anchors (issue 6): the current round's noised bank, sent with every train message.
        self.current_anchors: ArrayRecord | None = None
        self.anchor_contributors: list[str] = []
        self.anchor_rng = np.random.default_rng(secrets.randbits(128))  # noise must not be reproducible

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
            logger.warning("Only %d of the %d expected sites connected within %.0fs; starting without the others "
                           "(with `flwr run`, pass --federation-config 'num-supernodes=%d').", len(node_ids),
                           expected_nodes, self.cfg.federation.discovery_timeout_s, expected_nodes)
        msgs = [Message(RecordDict({CONFIG_KEY: ConfigRecord({"query": "site-info"})}), dst_node_id=nid,
                        message_type=MessageType.QUERY) for nid in node_ids]
        sites: dict[int, SiteInfo] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("Node %s did not answer discovery: %s", nid, reply.error.reason)
                continue
            info = reply.content[INFO_KEY]
            sites[nid] = SiteInfo(nid, str(info["site"]), str(info["role"]), int(info["num-train"]))
        if not any(s.role == "train" for s in sites.values()):
            raise RuntimeError("no training site answered discovery; cannot start federated training.")
        self.sites = dict(sorted(sites.items(), key=lambda kv: kv[1].site))
        logger.info("Discovered sites: %s", ", ".join(f"{s.site}({s.role})" for s in self.sites.values()))
        return self.sites

    def train_nodes(self) -> list[int]:
        """Training sites still able to train (not held out, budget not exhausted)."""
        return [nid for nid, s in self.sites.items() if s.role == "train" and s.site not in self.stopped]

    def note_budget_exhausted(self, server_round: int, msg: Message, phase: str) -> bool:
        """If ``msg`` says its site's privacy budget is spent, stop training it; return True if so."""
        if msg.has_error() or METRICS_KEY not in msg.content.metric_records:
            return False
        if float(msg.content[METRICS_KEY].get(BUDGET_EXHAUSTED, 0.0)) < 1.0:
            return False
        site = self.site_name(msg)
        reason = str(msg.content[CONFIG_KEY]["reason"]) if CONFIG_KEY in msg.content.config_records else ""
        self.stopped.setdefault(site, server_round)
        logger.warning("Round %d: site %s stopped training: privacy budget exhausted (%s)", server_round, site,
                       reason)
        self.recorder.record({"round": server_round, "phase": phase, "site": site, "status": "budget_exhausted",
                              "reason": reason, "epsilon": float(msg.content[METRICS_KEY].get("epsilon", 0.0))})
        return True

    # -- configure -----------------------------------------------------------------
    def sample_train_nodes(self, server_round: int) -> list[int]:
        """Seeded sample of training nodes (all of them with fraction_train = 1)."""
        nodes = self.train_nodes()
        k = max(self.min_train_nodes, int(math.ceil(len(nodes) * self.fraction_train)))
        k = min(k, len(nodes))
        return sorted(self._rng.sample(nodes, k))

    def stage_config(self, server_round: int, stage: str) -> ConfigRecord:
        """Config sent with a train message of ``stage`` (override to add method keys)."""
        return ConfigRecord({"server-round": server_round, "stage": stage,
                             "local-steps": self.cfg.train.local_steps})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self.sample_train_nodes(server_round)
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
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

    def combine_updates(self, server_round: int, stage: str,
                        accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
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

    def aggregate_train(self, server_round: int, replies: Iterable[Message], *, stage: str = "full",
                        reference: ArrayRecord | None = None) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ref = self.reference_state(reference)
        accepted: list[Message] = []
        for msg in replies:
            site = self.site_name(msg)
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
        if not accepted:
            return None, None
        arrays, metrics, rejected = self.combine_updates(server_round, stage, accepted)
        for msg in accepted:
            site = self.site_name(msg)
            if site in rejected:
                self._drop(server_round, stage, site, rejected[site])
                continue
            values = {k: float(v) for k, v in msg.content[METRICS_KEY].items()}
            self.recorder.record({"round": server_round, "stage": stage, "phase": "train", "site": site,
                                  "status": "ok", **values})
        return arrays, metrics

    def _drop(self, server_round: int, stage: str, site: str, reason: str) -> None:
        logger.warning("Round %d (%s): dropped reply from %s: %s", server_round, stage, site, reason)
        self.recorder.record({"round": server_round, "stage": stage, "phase": "train", "site": site,
                              "status": "dropped", "reason": reason})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rows = []
        for msg in replies:
            site = self.site_name(msg)
            if msg.has_error():
                logger.warning("Round %d: evaluation failed at %s: %s", server_round, site, msg.error.reason)
                self.recorder.record({"round": server_round, "phase": "evaluate", "site": site,
                                      "status": "error", "reason": msg.error.reason})
                continue
            role = self.sites[msg.metadata.src_node_id].role if msg.metadata.src_node_id in self.sites else "?"
            metrics = {k: float(v) for k, v in msg.content[METRICS_KEY].items()}
            self.recorder.record({"round": server_round, "phase": "evaluate", "site": site, "role": role,
                                  "status": "ok", **metrics})
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
    # -- anchors (issue 6; privacy/anchors.py) ----------------------------------------
    @property
    def anchor_dim(self) -> int:
        from secure_fedvlp.data.types import FINDINGS
        from secure_fedvlp.models.factory import get_model_spec
        from secure_fedvlp.privacy.anchors import anchor_dim

        return anchor_dim(len(FINDINGS), get_model_spec(self.cfg.model.name).embed_dim)

    def anchor_mode(self) -> str:
        """How the noise is added, in words for the report."""
        if self.cfg.anchors.noise == "distributed":
            return "distributed noise shares added by the sites"
        return "server noise, trusted aggregator (the server sees each site's un-noised sum)"

    def validate_anchor_reply(self, msg: Message, server_round: int) -> str | None:
        """Reason to drop an anchor contribution, or None."""
        from secure_fedvlp.privacy.anchors import ANCHORS_KEY, SUM_KEY

        content = msg.content
        if ANCHORS_KEY not in content.array_records or SUM_KEY not in content[ANCHORS_KEY]:
            return f"reply carries no '{ANCHORS_KEY}.{SUM_KEY}' array"
        a = content[ANCHORS_KEY][SUM_KEY].numpy()
        if a.shape != (self.anchor_dim,):
            return f"anchor contribution has shape {a.shape}, expected ({self.anchor_dim},)"
        if not _finite(a):
            return "anchor contribution holds non-finite values"
        if CONFIG_KEY not in content.config_records or int(content[CONFIG_KEY].get("server-round", -1)) != server_round:
            return f"anchor contribution is not for round {server_round}"
        return None

    def combine_anchors(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, dict[str, str]]:
        """Plaintext: the sum of the contributions plus the server's Gaussian (trusted-aggregator mode)."""
        from secure_fedvlp.privacy.anchors import ANCHORS_KEY, SUM_KEY, server_noise

        if len(accepted) < self.cfg.anchors.min_contributors:
            return None, {}
        total = np.zeros(self.anchor_dim)
        for msg in accepted:
            total += msg.content[ANCHORS_KEY][SUM_KEY].numpy().astype(np.float64)
        if self.cfg.anchors.noise == "server":
            total += server_noise(self.cfg, self.anchor_dim, self.anchor_rng)
        self.anchor_contributors = [self.site_name(m) for m in accepted]
        return ArrayRecord({SUM_KEY: Array(total)}), {}

    def anchor_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> None:
        """Collect the sites' clipped anchor sums and release the noised bank for this round's training."""
        from secure_fedvlp.privacy.anchors import ANCHOR_QUERY

        self.current_anchors = None
        self.anchor_contributors = []
        nodes = self.train_nodes()
        msgs = [Message(RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord(
            {"query": ANCHOR_QUERY, "server-round": server_round})}), dst_node_id=nid, message_type=MessageType.QUERY)
            for nid in nodes]
        accepted = []
        for msg in grid.send_and_receive(msgs, timeout=timeout):
            site = self.site_name(msg)
            if self.note_budget_exhausted(server_round, msg, "anchors"):
                continue
            reason = f"client error: {msg.error.reason}" if msg.has_error() else self.validate_anchor_reply(
                msg, server_round)
            if reason is not None:
                self._drop(server_round, "anchors", site, reason)
                continue
            accepted.append(msg)
        record, rejected = self.combine_anchors(server_round, accepted) if accepted else (None, {})
        for site, why in rejected.items():
            self._drop(server_round, "anchors", site, why)
        need = self.cfg.anchors.min_contributors
        if record is None:
            why = (f"{len(accepted) - len(rejected)} valid contribution(s), fewer than anchors.min_contributors = "
                   f"{need}" if len(accepted) - len(rejected) < need else "no valid contribution")
            logger.warning("Round %d: no anchors released (%s); sites train without them.", server_round, why)
            self.recorder.record({"round": server_round, "phase": "anchors", "status": "withheld", "reason": why})
            return
        from secure_fedvlp.privacy.anchors import anchor_event

        from secure_fedvlp.privacy.anchors import share_sigma, total_sigma

        ev = anchor_event(self.cfg, server_round)
        self.current_anchors = record
        n = len(self.anchor_contributors)
        # distributed: the shares actually summed (dropouts remove theirs; >= min_contributors remain)
        sigma = share_sigma(self.cfg) * math.sqrt(n) if self.cfg.anchors.noise == "distributed" else total_sigma(self.cfg)
        self.recorder.record({"round": server_round, "phase": "anchors", "status": "released",
                              "contributors": list(self.anchor_contributors), "mode": self.anchor_mode(),
                              "clip": float(self.cfg.anchors.clip), "sigma_total": float(sigma),
                              "sigma_accounted": float(ev.sigma)})

    def run_stage(self, server_round: int, stage: str, grid: Grid, arrays: ArrayRecord,
                  timeout: float) -> ArrayRecord:
        """Send one train stage, aggregate, and return the new global arrays (or the old on failure)."""
        messages = list(self.configure_train(server_round, arrays, self.stage_config(server_round, stage), grid))
        if self.current_anchors is not None:
            from secure_fedvlp.privacy.anchors import ANCHORS_KEY

            for m in messages:
                m.content[ANCHORS_KEY] = self.current_anchors
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        agg, metrics = self.aggregate_train(server_round, replies, stage=stage, reference=arrays)
        if agg is None:
            logger.warning("Round %d (%s): no valid update arrived; the global model is unchanged.",
                           server_round, stage)
            return arrays
        return agg

    def train_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        """One round of training (override for multi-stage methods)."""
        return self.run_stage(server_round, "full", grid, arrays, timeout)

    def evaluate_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> MetricRecord | None:
        replies = list(grid.send_and_receive(self.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                             timeout=timeout))
        return self.aggregate_evaluate(server_round, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              *, expected_nodes: int = 1) -> Result:
        """Discovery, round-0 reference evaluation, then ``num_rounds`` of train + evaluate."""
        result = Result()
        self.discover(grid, expected_nodes, timeout)
        t0 = time.perf_counter()
        m = self.evaluate_round(0, grid, initial_arrays, timeout)
        if m is not None:
            result.evaluate_metrics_clientapp[0] = m
        self.recorder.progress(f"round 0/{num_rounds} (untrained reference): {_fmt(m)}")
        arrays = initial_arrays
        for rnd in range(1, num_rounds + 1):
            t_round = time.perf_counter()
            if self.cfg.anchors.enabled:
                self.anchor_round(rnd, grid, arrays, timeout)
            arrays = self.train_round(rnd, grid, arrays, timeout)
            # Server-side wall time of the training round (configure -> replies -> new global model),
            # read by benchmarks/bench_secagg_round.py.
            self.recorder.record({"round": rnd, "phase": "round", "train_seconds": time.perf_counter() - t_round})
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


def _fmt(m: MetricRecord | None) -> str:
    if m is None:
        return "no evaluation replies"
    keys = ("zs_auroc_macro", "mean_R@5")
    return ", ".join(f"{k}={float(m[k]):.3f}" for k in keys if k in m) or json.dumps(dict(m))
