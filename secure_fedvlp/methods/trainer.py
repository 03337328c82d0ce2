"""The client side of every method: one local training loop with a seam for the private step.

:class:`LocalTrainer` is the FedAvg trainer and the base of every method's trainer.  Variants
override only what differs: FedProx adds a :meth:`~LocalTrainer.regularizer`; FedDRA adds
anchor guidance (:meth:`~LocalTrainer.extra_terms`) and a scalar report
(:meth:`~LocalTrainer.report_values`).

:meth:`LocalTrainer.fit` is the only training loop in the package.  What differs between
plain and private training (where a batch comes from, how the gradient is formed, how the
optimizer steps) is a :class:`StepEngine`: :class:`PlainSteps` draws shuffled mini-batches and
back-propagates the batch-mean loss; the DP-SGD wrapper
(:class:`secure_fedvlp.wrappers.dpsgd.PrivateSteps`) draws Poisson batches and forms the clipped,
noised gradient.  Nothing here knows about privacy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.models.embed import embed_images, embed_texts
from secure_fedvlp.models.state import federated_state, make_collate
from secure_fedvlp.objectives import (
    DecomposableContrastiveLoss,
    InfoNCELoss,
    ReportVariantsLoss,
    SiteCentroidLoss,
    report_variants,
)
from secure_fedvlp.privacy import site_centroids as centroid_release
from secure_fedvlp.privacy.relation import load_or_create_site_key, seeded_site_key
from secure_fedvlp.wire import ARRAYS_KEY, NUM_EXAMPLES

__all__ = ["TrainTask", "LocalTrainer", "StepEngine", "PlainSteps", "EngineFactory"]


@dataclass(frozen=True)
class TrainTask:
    """One local training job, as sent by the server."""

    server_round: int
    stage: str  # "full": every federated parameter; "align": alignment layers and heads only
    steps: int
    options: Mapping[str, float] = field(default_factory=dict)  # method-specific scalars from the server
    anchors: Any = None  # the round's noised anchor bank (privacy.anchors.AnchorBank), when anchors are on
    # Method-specific inputs the server sent beside the global model: its other array records (as
    # ``{record: {name: array}}``) and its string config values (CreamFL: the global representations
    # of the public set and the public set's fingerprint).
    records: Mapping[str, Mapping[str, np.ndarray]] = field(default_factory=dict)
    strings: Mapping[str, str] = field(default_factory=dict)


class LocalTrainer:
    """Local training at one client: the FedAvg trainer, and the base of every method's trainer.

    Methods override one hook each: :meth:`trainable_names` (which parameters a stage trains),
    :meth:`make_optimizer`, :meth:`make_loader`, :meth:`compute_loss`, :meth:`extra_terms`,
    :meth:`regularizer`, :meth:`begin`, :meth:`report_values`.  The loop itself
    (:meth:`fit`) is written once; how a step draws its batch, differentiates and updates is a
    :class:`StepEngine` (:class:`PlainSteps` here; DP-SGD supplies its own).
    """

    name = "fedavg"
    #: What a train reply releases besides the parameters' DP-SGD output, when it is a function of that
    #: output and public data only (CreamFL's public-set representations); the DP wrapper logs it as a
    #: post-processing release.  None: the reply carries the parameters.
    post_processing_release: str | None = None

    def __init__(self, cfg: ExperimentConfig, device: torch.device, public=None) -> None:
        self.cfg = cfg
        self.device = device
        self.public = public  # public reference set (negatives of the decomposable objective)
        self.objective = self.make_objective()
        # Where the site keeps its secret selection key (set by the client runtime; see site_key()).
        self.site_key_path = None
        self._site_key: bytes | None = None
        # The site's own directory (set by the client runtime): where released report centroids are kept.
        self.release_dir = None
        # Under DP-SGD, set by the DP wrapper for each job: records the centroid release in the ledger and
        # returns (sigma, noise generator). None: no DP, the centroids are computed without noise.
        self.centroid_release = None

    # -- the site's selection key and its public sizes ---------------------------------
    def set_site_key(self, key: bytes) -> None:
        """Use ``key`` for keyed record selections (instead of a key file)."""
        self._site_key = bytes(key)

    def site_key(self) -> bytes:
        """The site's key for keyed record selections (FedDRA's DRO slice); it never leaves the site.

        The client runtime sets it (:func:`~secure_fedvlp.wrappers.compose.client_parts`): under DP a
        random secret read from (or created in) :attr:`site_key_path`, the site's own directory;
        otherwise one derived from ``run.seed`` and the site's name.  A trainer built outside a client
        runtime (tests, benchmarks) derives one from ``run.seed`` alone.
        """
        if self._site_key is None:
            if self.site_key_path is not None:
                self._site_key = load_or_create_site_key(self.site_key_path)
            else:
                self._site_key = seeded_site_key(self.cfg.run.seed, "")
        return self._site_key

    def declared_training_size(self, declared: int) -> int:
        """The public size of what :meth:`training_subset` holds at a site whose declared size is ``declared``.

        Under DP the sample rate, the noisy mean's normaliser and the released ``num-examples`` derive
        from it, never from the data.  The whole training split by default.
        """
        return int(declared)

    def declared_report_count(self, kind: str, declared: int) -> int | None:
        """The public denominator of scalar report ``kind`` at a site of declared size ``declared`` (None: none)."""
        return None

    def released_site_size(self, dataset) -> int:
        """The training-split size this site states in clear (site information): exact without DP."""
        return len(dataset)

    def released_train_count(self, dataset) -> int:
        """The training-record count this site states in clear (``num-examples``): exact without DP."""
        return len(self.training_subset(dataset))

    def bind_site(self, site, site_dir) -> None:
        """Called once by the client runtime with the site's data (:class:`~secure_fedvlp.data.SiteData`) and its
        own directory, before any job.  Nothing by default (a method that keeps per-site state uses it)."""

    def reply_arrays(self, model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
        """The array records of a train reply, by record name: the federated parameters by default."""
        return {ARRAYS_KEY: federated_state(model)}

    # -- hooks ---------------------------------------------------------------------
    def make_objective(self) -> nn.Module:
        """In-batch InfoNCE, the per-sample decomposable loss with public negatives, or the per-record
        image-to-report loss against the record's own report variants."""
        if self.cfg.train.objective == "decomposable":
            return DecomposableContrastiveLoss()
        if self.cfg.train.objective == "report_variants":
            return ReportVariantsLoss()
        if self.cfg.train.objective == "site_centroids":
            return SiteCentroidLoss()
        return InfoNCELoss()

    @torch.no_grad()
    def negative_banks(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Public reference set embedded by the (global) model: privacy-free negatives."""
        if self.public is None or len(self.public) == 0:
            raise ValueError("the decomposable objective needs a public reference set; none was given.")
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
        return DataLoader(
            dataset,
            batch_size=bs,
            shuffle=True,
            drop_last=len(dataset) > bs,
            generator=generator,
            collate_fn=make_collate(model),
        )

    def training_subset(self, dataset):
        """Records usable by the objective (paired image and report)."""
        keep = np.flatnonzero(np.asarray(dataset.has_image, bool) & np.asarray(dataset.has_text, bool))
        return dataset if keep.size == len(dataset) else dataset.subset(keep)

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], state: dict[str, Any], reduction: str = "mean"
    ) -> dict[str, torch.Tensor]:
        """Named loss terms for one batch; ``loss`` is their total.

        Every term here must be a mean over records of a function of each record alone
        (or of the whole batch for the coupled in-batch objective, which DP refuses).
        ``reduction="none"`` returns the per-record terms ``[B]`` instead of their batch means
        (DP-SGD's ghost clipping rescales each record's loss; the coupled objective has no
        per-record loss and refuses it).  Data-independent terms belong in :meth:`regularizer`.
        """
        if isinstance(self.objective, ReportVariantsLoss):
            out = self._report_variants_forward(model, batch, state)
        else:
            out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        terms = dict(self.objective_terms(model, out, state, reduction=reduction, batch=batch))
        for name, value in self.extra_terms(model, batch, out, state, reduction=reduction).items():
            terms[name] = value
            terms["loss"] = terms["loss"] + value
        return terms

    def objective_terms(
        self,
        model: nn.Module,
        out: dict[str, torch.Tensor],
        state: dict[str, Any],
        reduction: str = "mean",
        batch: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The contrastive objective's named terms.

        The decomposable objective's positives are the global model's views of the batch's
        records (``state["pos_image"]``/``["pos_text"]``, indexed by ``batch["index"]``; see
        :class:`~secure_fedvlp.objectives.DecomposableContrastiveLoss` for why).
        """
        if self.objective.couples_samples:
            return self.objective(out["image_emb"], out["text_emb"], model.logit_scale, reduction=reduction)
        if isinstance(self.objective, ReportVariantsLoss):
            return self.objective(out["image_emb"], out["text_candidates"], model.logit_scale, reduction=reduction)
        if isinstance(self.objective, SiteCentroidLoss):
            return self.objective(
                out["image_emb"], out["text_emb"], model.logit_scale, state["site_centroids"], reduction=reduction
            )
        if "bank" in state:
            neg_image, neg_text = state["bank"].embed(model)
            own = None
            if "own_negatives" in state:
                if batch is None:
                    raise ValueError("train.report_negatives needs the batch (its records' positions).")
                own = state["own_negatives"].embed(model, batch["index"])
            return self.objective(
                out["image_emb"],
                out["text_emb"],
                model.logit_scale,
                neg_image,
                neg_text,
                reduction=reduction,
                own_text_negatives=own,
            )
        if "pos_image" not in state or batch is None:
            raise ValueError(
                "the decomposable objective takes each record's positive from the global model's view "
                "of it: call begin(model, task, global_state, dataset=<the training records>) and pass "
                "the batch."
            )
        idx = batch["index"].to(state["pos_image"].device)
        return self.objective(
            out["image_emb"],
            out["text_emb"],
            model.logit_scale,
            state["neg_image"],
            state["neg_text"],
            reduction=reduction,
            pos_image=state["pos_image"][idx],
            pos_text=state["pos_text"][idx],
        )

    @staticmethod
    def _report_variants_forward(model: nn.Module, batch: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """The forward pass of the report-variants objective: each trained module runs once.

        The image head embeds the batch's images; the text head embeds each record's report and its
        ``K`` variants in one call on ``[B, 1 + K, H]`` locked-tower features (Opacus' per-sample
        gradients and ghost-clipping norms take dimension 0 as the record, and a module called twice
        in one step would have its ghost norm overwritten by the second call's).  ``model`` may be
        Opacus' ``GradSampleModule``: the wrapped model's methods run the same hooked modules.
        """
        if "own_negatives" not in state or "index" not in batch:
            raise ValueError(
                "train.objective = 'report_variants' needs each record's report variants: call "
                "begin(model, task, global_state, dataset=<the training records>) and pass the batch."
            )
        inner = getattr(model, "_module", model)
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        image_emb = inner.encode_image(images)
        report = inner.text_features(ids, mask)
        variants = state["own_negatives"].features_of(batch["index"]).to(report.device)
        candidates = inner.project_text(torch.cat([report.unsqueeze(1), variants], dim=1))
        return {"image_emb": image_emb, "text_emb": candidates[:, 0], "text_candidates": candidates}

    def extra_terms(
        self,
        model: nn.Module,
        batch: dict[str, Any],
        out: dict[str, torch.Tensor],
        state: dict[str, Any],
        reduction: str = "mean",
    ) -> dict[str, torch.Tensor]:
        """Additional per-sample loss terms (anchor guidance, ...), reduced like :meth:`compute_loss`.

        None by default.
        """
        return {}

    def regularizer(self, model: nn.Module, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Data-independent loss terms (FedProx's proximal term, ...). None by default.

        They depend on no record, so under DP-SGD their gradient is added to the noised
        gradient (post-processing) instead of going through per-sample clipping.
        """
        return {}

    @torch.no_grad()
    def site_centroids(self, model: nn.Module, task: TrainTask, dataset) -> torch.Tensor:
        """The site's report centroids (:mod:`secure_fedvlp.privacy.site_centroids`), released once per run.

        Under DP (:attr:`centroid_release` set) a release kept in :attr:`release_dir` is reused (post-processing:
        nothing new is released); otherwise the release is recorded in the ledger first, then computed, noised
        and kept.  Without DP they are computed without noise at every job (nothing is claimed).
        """
        inner = getattr(model, "_module", model)
        if any(p.requires_grad for p in inner.text_head.parameters()) or not inner.towers_locked():
            raise ValueError(
                "train.objective = 'site_centroids' needs the text side locked (model.trainable = 'image_head')."
            )
        kept = None if self.release_dir is None else Path(self.release_dir) / centroid_release.FILE
        if self.centroid_release is not None and kept is not None and kept.exists():
            return torch.load(kept, map_location="cpu", weights_only=True)
        if self.public is None or len(self.public) == 0:
            raise ValueError("train.objective = 'site_centroids' needs a public reference set; none was given.")
        bs = self.cfg.eval.batch_size
        was = inner.training
        inner.eval()
        try:
            public_emb = embed_texts(inner, [r for r in self.public.reports if r], bs, self.device).cpu()
            bins = centroid_release.public_bins(public_emb, self.cfg.train.site_centroids)
            site_emb = embed_texts(inner, list(dataset.reports), bs, self.device).cpu()  # the job's training records
        finally:
            inner.train(was)
        sigma, generator = 0.0, None
        if self.centroid_release is not None:
            sigma, generator = self.centroid_release(task.server_round)  # the ledger records it before S exists
        sums = centroid_release.bin_sums(site_emb, bins)
        centroids = centroid_release.centroids_of(centroid_release.release(sums, sigma, generator))
        if self.centroid_release is not None and kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = kept.with_suffix(".tmp")
            torch.save(centroids, tmp)
            os.chmod(tmp, 0o600)  # site-local, like the ledger beside it
            os.replace(tmp, kept)
        return centroids

    @torch.no_grad()
    def global_views(self, model: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The (global) model's image and report embeddings of every record of ``dataset``, by position.

        Computed once per job, before the first step, in eval mode; they never leave the client.
        """
        was = model.training
        model.eval()
        try:
            bs = self.cfg.eval.batch_size
            imgs = embed_images(model, dataset.images, bs, self.device).to(self.device)
            txts = embed_texts(model, list(dataset.reports), bs, self.device).to(self.device)
        finally:
            model.train(was)
        return imgs, txts

    def begin(
        self, model: nn.Module, task: TrainTask, global_state: Mapping[str, np.ndarray], dataset=None
    ) -> dict[str, Any]:
        """Per-job state (negative banks, the global model's views of ``dataset``, ...); called before training.

        ``dataset`` is the job's training records (the positions ``batch["index"]`` refers to);
        the decomposable objective needs it.
        """
        state: dict[str, Any] = {}
        if isinstance(self.objective, SiteCentroidLoss):
            if dataset is None:
                raise ValueError("train.objective = 'site_centroids' needs the job's training records: pass dataset.")
            state["site_centroids"] = self.site_centroids(model, task, dataset).to(self.device)
        elif isinstance(self.objective, ReportVariantsLoss):
            if dataset is None:
                raise ValueError("train.objective = 'report_variants' needs the job's training records: pass dataset.")
            state["own_negatives"] = OwnReportNegatives(
                model, dataset, self.cfg.train.report_negatives, self.cfg.eval.batch_size, self.device
            )
        elif not self.objective.couples_samples and self.cfg.train.bank == "current":
            if self.public is None or len(self.public) == 0:
                raise ValueError("the decomposable objective needs a public reference set; none was given.")
            state["bank"] = CurrentBank(model, self.public, self.cfg.eval.batch_size, self.device)
            if self.cfg.train.report_negatives:
                if dataset is None:
                    raise ValueError("train.report_negatives needs the job's training records: pass dataset.")
                state["own_negatives"] = OwnReportNegatives(
                    model, dataset, self.cfg.train.report_negatives, self.cfg.eval.batch_size, self.device
                )
        elif not self.objective.couples_samples:
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

    # -- the loop ------------------------------------------------------------------------
    def plain_engine(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, dataset, generator: torch.Generator
    ) -> StepEngine:
        """The default engine: :class:`PlainSteps`."""
        return PlainSteps(self, model, optimizer, dataset, generator)

    def fit(
        self,
        model: nn.Module,
        dataset,
        task: TrainTask,
        generator: torch.Generator,
        global_state: Mapping[str, np.ndarray],
        *,
        engine: EngineFactory | None = None,
    ) -> dict[str, float]:
        """Run ``task.steps`` optimisation steps of ``task.stage`` on ``dataset``.

        Returns the mean loss terms (``train_<term>``: batch means averaged over steps for the
        plain engine, per-record means for a per-record engine), ``steps``, ``train_seconds``,
        ``train_records_seen`` and ``num-examples``.  ``engine`` builds the step engine
        (default :meth:`plain_engine`); the per-job state (:meth:`begin`) is computed on the
        plain model before the engine attaches anything to it.
        """
        dataset = self.training_subset(dataset)
        if len(dataset) < 2:
            raise ValueError(f"site has {len(dataset)} paired training records; at least 2 are needed.")
        federated = {n for n, p in model.named_parameters() if p.requires_grad}
        names = set(self.trainable_names(model, task.stage))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        sums: dict[str, float] = {}
        reg_sums: dict[str, float] = {}
        records = steps = 0
        try:
            model.train()
            state = self.begin(model, task, global_state, dataset=dataset)
            optimizer = self.make_optimizer(model, [n for n, _ in model.named_parameters() if n in names])
            steps_of = (engine or self.plain_engine)(model, optimizer, dataset, generator)
            t0 = time.perf_counter()
            try:
                for _ in range(task.steps):
                    batch = steps_of.next_batch()
                    reg = self.regularizer(model, state)
                    if batch is None:
                        steps_of.empty_step(reg)
                    else:
                        terms = steps_of.backward(
                            lambda b: self.compute_loss(steps_of.module, b, state, reduction=steps_of.reduction),
                            batch,
                            reg,
                        )
                        for k, v in terms.items():
                            v = v.detach()
                            sums[k] = sums.get(k, 0.0) + (float(v.sum()) if v.ndim else float(v))
                        records += len(batch["index"])
                    for k, v in reg.items():
                        reg_sums[k] = reg_sums.get(k, 0.0) + float(v.detach())
                    steps_of.step()
                    steps += 1
            finally:
                steps_of.close()
            seconds = time.perf_counter() - t0
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(n in federated)
        per = steps if steps_of.reduction == "mean" else records
        metrics = {f"train_{k}": v / max(per, 1) for k, v in sums.items()}
        metrics.update({f"train_{k}": v / max(steps, 1) for k, v in reg_sums.items()})
        metrics.update({f"train_{k}": float(v) for k, v in steps_of.stats().items()})
        metrics.update(
            {
                "steps": float(steps),
                "train_seconds": seconds,
                "train_records_seen": float(records),
                NUM_EXAMPLES: float(len(dataset)),
            }
        )
        return metrics


class CurrentBank:
    """The public negative bank embedded by the model being trained, at every step (``train.bank = "current"``).

    Each record's loss then contrasts its own image and report, both embedded by the current
    model, against public negatives embedded by the same model (detached): a function of the
    record alone and public data, so the objective stays per-sample decomposable.  Because the
    negatives move with the model, moving every embedding towards one direction no longer lowers
    the loss (the collapse that a bank embedded once per job allows, see
    :class:`~secure_fedvlp.objectives.DecomposableContrastiveLoss`).

    Cost: a locked tower's outputs for the public set are computed once, at the start of the job,
    and each step runs only the heads over them; a tower that trains is re-run over the whole
    public set at every step (no gradient), which is what makes this choice expensive unless
    ``model.trainable = "heads"``.
    """

    def __init__(self, model: nn.Module, public, batch_size: int, device: torch.device) -> None:
        self.device = device
        self.batch_size = int(batch_size)
        self.images = torch.from_numpy(np.ascontiguousarray(public.images)).unsqueeze(1)
        reports = [r for r in public.reports if r]
        tok = model.tokenize(reports)
        self.input_ids, self.attention_mask = tok["input_ids"], tok["attention_mask"]
        self._image_feats = self._text_feats = None
        with torch.no_grad():
            if not any(p.requires_grad for p in model.image_encoder.parameters()):
                self._image_feats = self._image_features(model)
            if not any(p.requires_grad for p in model.text_encoder.parameters()):
                self._text_feats = self._text_features(model)

    def _image_features(self, model: nn.Module) -> torch.Tensor:
        bs = self.batch_size
        return torch.cat(
            [model.image_features(self.images[i : i + bs].to(self.device)) for i in range(0, len(self.images), bs)]
        )

    def _text_features(self, model: nn.Module) -> torch.Tensor:
        bs, ids, mask = self.batch_size, self.input_ids, self.attention_mask
        return torch.cat(
            [
                model.text_features(ids[i : i + bs].to(self.device), mask[i : i + bs].to(self.device))
                for i in range(0, len(ids), bs)
            ]
        )

    @torch.no_grad()
    def embed(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(image bank, text bank) embedded by ``model`` as it is now, normalised, without gradient.

        ``model`` may be Opacus' ``GradSampleModule``, which forwards submodules but not methods:
        the wrapped model's own methods run on the same (hooked) modules, and without gradient the
        hooks record nothing.
        """
        model = getattr(model, "_module", model)
        image = self._image_feats if self._image_feats is not None else self._image_features(model)
        text = self._text_feats if self._text_feats is not None else self._text_features(model)
        return model.project_image(image), model.project_text(text)


class OwnReportNegatives:
    """Each training record's own-report negatives (``train.report_negatives = K``), embedded by the current model.

    Every record's report gives ``K`` variants with one sentence left out
    (:func:`~secure_fedvlp.objectives.report_variants`); the locked text tower embeds them once,
    at the start of the job (cached per distinct text, like the reports themselves), and each step
    projects a batch's ``[B, K, H]`` features with the current text head, without gradient.  Each
    record's negatives are a function of that record alone, so the objective stays per-sample
    decomposable.  The text tower must be locked (``model.trainable = "heads"``): a tower that
    trains would leave these features behind the model.
    """

    def __init__(self, model: nn.Module, dataset, k: int, batch_size: int, device: torch.device) -> None:
        model = getattr(model, "_module", model)
        if any(p.requires_grad for p in model.text_encoder.parameters()):
            raise ValueError(
                "train.report_negatives needs a locked text tower (model.trainable = 'heads' or 'image_head')."
            )
        self.k = int(k)
        reports = [r or "" for r in dataset.reports]
        variants = [v for r in reports for v in report_variants(r, self.k)]
        distinct = list(dict.fromkeys(variants))
        where = {v: i for i, v in enumerate(distinct)}
        feats = []
        with torch.no_grad():
            for i in range(0, len(distinct), batch_size):
                tok = model.tokenize(distinct[i : i + batch_size])
                feats.append(
                    model.text_features(tok["input_ids"].to(device), tok["attention_mask"].to(device)).detach()
                )
        rows = torch.tensor([where[v] for v in variants], dtype=torch.long)
        self.features = torch.cat(feats)[rows.to(device)].view(len(reports), self.k, -1)

    def features_of(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, K, H]``: the locked text tower's outputs for the variants of the records at positions ``index``."""
        return self.features[index.to(self.features.device)]

    @torch.no_grad()
    def embed(self, model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        """``[B, K, D]``: the variants of the records at positions ``index``, projected by ``model`` as it is now."""
        model = getattr(model, "_module", model)
        f = self.features[index.to(self.features.device)]
        return model.project_text(f.reshape(-1, f.shape[-1])).view(f.shape[0], f.shape[1], -1)


class StepEngine(Protocol):
    """How one optimisation step is taken: the seam between the loop and plain or private training.

    ``reduction`` is how the loop asks the method for its loss terms: ``"mean"`` (batch means)
    or ``"none"`` (one value per record, which per-sample clipping needs).
    """

    reduction: str
    module: nn.Module  # what the loss is computed through (the model, or a per-sample-gradient wrapper)

    def next_batch(self) -> dict[str, Any] | None:
        """The next batch on the training device, or ``None`` for an empty (Poisson) batch."""

    def backward(
        self,
        compute: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        batch: dict[str, Any],
        regularizer: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Leave the step's gradient in ``.grad``; return the loss terms of the records that contributed.

        ``compute(batch)`` returns the method's named loss terms (``reduction``-shaped; ``loss`` is
        their total); ``regularizer`` holds the data-free terms.  An engine may call ``compute`` again
        on part of the batch (the private engine drops records whose loss or gradient is not finite).
        """

    def empty_step(self, regularizer: Mapping[str, torch.Tensor]) -> None:
        """Leave the gradient of a step whose batch is empty."""

    def step(self) -> None:
        """Apply the optimizer to the gradient."""

    def close(self) -> None:
        """Undo anything the engine attached to the model."""

    def stats(self) -> dict[str, float]:
        """The engine's own counters for the job (reported as ``train_<name>``)."""


#: Builds the engine of one job: ``(model, optimizer, dataset, generator) -> StepEngine``.
EngineFactory = Callable[[nn.Module, torch.optim.Optimizer, Any, torch.Generator], StepEngine]


class PlainSteps:
    """Non-private steps: shuffled mini-batches, the batch-mean loss, optional gradient-norm clipping."""

    reduction = "mean"

    def __init__(
        self,
        trainer: LocalTrainer,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset,
        generator: torch.Generator,
    ) -> None:
        self.module = model
        self.optimizer = optimizer
        self.device = trainer.device
        self.grad_clip = float(trainer.cfg.train.grad_clip)
        self.loader = trainer.make_loader(dataset, model, generator)
        self._it = iter(self.loader)

    def next_batch(self) -> dict[str, Any]:
        self.optimizer.zero_grad(set_to_none=True)
        try:
            batch = next(self._it)
        except StopIteration:  # a new epoch
            self._it = iter(self.loader)
            batch = next(self._it)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def backward(
        self,
        compute: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        batch: dict[str, Any],
        regularizer: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        terms = compute(batch)
        total = terms["loss"] + sum(regularizer.values()) if regularizer else terms["loss"]
        total.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.grad_clip)
        return terms

    def empty_step(
        self, regularizer: Mapping[str, torch.Tensor]
    ) -> None:  # pragma: no cover - loaders never yield empty batches
        raise RuntimeError("a shuffled mini-batch loader yielded an empty batch.")

    def step(self) -> None:
        self.optimizer.step()

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}
