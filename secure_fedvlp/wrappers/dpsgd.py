"""DP-SGD as a wrapper around any method's client trainer (Opacus), with the ledger in the loop.

:class:`DPTrainer` wraps a :class:`~secure_fedvlp.methods.trainer.LocalTrainer` by
composition; the method knows nothing about privacy.  Per local job:

1. the job's DP-SGD event (noise multiplier, Poisson sample rate, steps, clip norm, round,
   stage) is **recorded in the client's ledger before the first step**; the ledger
   refuses it with :class:`~secure_fedvlp.errors.PrivacyBudgetExhausted` if it would
   exceed the budget, so nothing is trained or released;
2. batches are drawn by Opacus' Poisson sampler (``UniformWithReplacementSampler``): each
   record joins each batch independently with probability ``q``, which is what the
   sampled-Gaussian accounting assumes.  ``q = batch_size / n_declared`` and the noisy mean's
   normaliser ``E[B] = q * n_declared`` come from the site's *declared* public size
   (:meth:`ExperimentConfig.declared_size <secure_fedvlp.config.ExperimentConfig.declared_size>`),
   never from the number of records it holds, which is private under add/remove-one
   (:mod:`secure_fedvlp.privacy.relation`); the actual size stays in the site's log;
3. the method returns its loss terms *per record* (``compute_loss(..., reduction="none")``),
   and :class:`PrivateGradient` turns the per-record total into the DP-SGD gradient
   ``(sum_i clip_C(grad loss_i) + N(0, (z C)^2 I)) / E[B]`` in the configured Opacus mode
   (``privacy.grad_sample_mode``):

   * ``hooks`` / ``functorch``: ``GradSampleModule`` materialises every per-sample gradient
     (hooks with Opacus' per-layer rules, or functorch's vmap); ``DPOptimizer`` clips each
     (flat or per layer), sums and noises;
   * ``ghost``: Opacus' fast gradient clipping (``GradSampleModuleFastGradientClipping`` with
     ``use_ghost_clipping=True``, ``DPTensorFastGradientClipping``).  A first backward of
     the batch-mean loss yields per-sample gradient *norms* only: ``nn.Linear`` (every BERT
     projection, both heads) by the ghost-norm identity
     ``||sum_t g_t a_t^T||^2 = <G G^T, A A^T>``, without forming a per-sample gradient; the
     layers Opacus has no norm sampler for (``Conv2d``, ``GroupNorm``, ``LayerNorm``, our
     ``LogitScale``) fall back, inside Opacus, to their per-sample-gradient rule, whose
     gradient is reduced to a norm and dropped at once.  A second backward of
     ``sum_i min(1, C / ||g_i||) * loss_i`` then gives the clipped sum directly, and
     ``DPOptimizerFastGradientClipping`` noises and averages it.  Flat clipping only (the
     config refuses ghost with per-layer clipping);
4. data-independent regularisers (FedProx's proximal term) are differentiated separately
   and added *after* noising: they touch no record, so this is post-processing;
5. after the job the hooks are removed, so evaluation and the next job see a plain model.

What the train reply carries
----------------------------
Only releases that the ledger covers or that are public: the parameters (DP-SGD), the
public counts (``num-examples``: the declared training size, never the actual one; ``steps``),
the public DP parameters (noise multiplier, sample rate) and the privacy spent and budget
(``epsilon``, ``epsilon-budget``; functions of public parameters).  The training-loss terms
are computed on private records with no noise, so they are *not* released:
:meth:`DPTrainer.fit` writes them to the client's own disk
(:meth:`RunLayout.local_train_metrics <secure_fedvlp.layout.RunLayout.local_train_metrics>`,
beside its ledger) and its log, and strips them from the reply (:data:`RELEASED_TRAIN_METRICS` is the allow-list).
Beside the metrics, the client app adds the ledger's head (hash and sequence number of its last
entry, a function of the public events) to every reply, for the server to log as the audit's external reference.

Scalar reports a method sends (FedDRA's DRO losses) go through :meth:`DPTrainer.answer_query`:
per-record values are clipped to ``[0, C_r]``, summed, noised with ``N(0, (z_r C_r)^2)``, and
divided by the report's *declared* count ``m`` (FedDRA: ``feddra.slice_size`` of the declared
size), never by the number of records in the slice.  A report whose declared count is below
``privacy.min_report_count`` (``m >= 4 z_r``: noise std at most a quarter of ``C_r``) is refused.
The Gaussian event is recorded first.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from secure_fedvlp.config import ExperimentConfig, PrivacyConfig
from secure_fedvlp.layout import RunLayout, open_site_file
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models.state import make_collate
from secure_fedvlp.privacy.budget import Budget
from secure_fedvlp.privacy.calibration import calibrate_plan
from secure_fedvlp.privacy.events import DPSGDEvent, PostProcessingEvent
from secure_fedvlp.privacy.ledger import PrivacyLedger
from secure_fedvlp.privacy.mechanisms import mean_release_event, noised_clipped_mean
from secure_fedvlp.privacy.plan import ReleasePlan
from secure_fedvlp.privacy.site_centroids import site_centroids_event
from secure_fedvlp.wire import BUDGET_EXHAUSTED, EPSILON, EPSILON_BUDGET, NUM_EXAMPLES

logger = logging.getLogger(__name__)

__all__ = [
    "DPTrainer",
    "PrivateGradient",
    "PrivateSteps",
    "client_noise_multiplier",
    "sample_rate",
    "make_ledger",
    "refuse_batch_norm",
    "RELEASED_TRAIN_METRICS",
    "GRAD_SAMPLE_MODES",
]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")

# What a DP client's train reply may carry: public counts, public DP parameters, the privacy
# spent and the budget (functions of public parameters), and the budget-exhausted flag.
# No un-noised function of private records (training losses, gradient norms, timings).
RELEASED_TRAIN_METRICS = frozenset(
    {NUM_EXAMPLES, "steps", "dp_noise_multiplier", "dp_sample_rate", EPSILON, EPSILON_BUDGET, BUDGET_EXHAUSTED}
)


def sample_rate(cfg: ExperimentConfig, num_train: int) -> float:
    """Poisson sample rate of a site of declared training size ``num_train``: ``batch_size / num_train``.

    Under DP ``num_train`` is the declared public size, never a count of the data.
    """
    return min(1.0, cfg.train.batch_size / max(1, num_train))


def client_noise_multiplier(cfg: ExperimentConfig, plan: ReleasePlan, num_train: int) -> tuple[float, float]:
    """(noise multiplier, sample rate) of a site of declared training size ``num_train`` releasing ``plan``.

    ``plan`` is the method's release plan, extended by every wrapper that releases more (anchors);
    calibration never overshoots (:func:`~secure_fedvlp.privacy.calibration.calibrate_plan`).
    """
    q = sample_rate(cfg, num_train)
    return calibrate_plan(cfg.privacy, plan, cfg.federation.num_rounds, q), q


def refuse_batch_norm(model: nn.Module) -> None:
    """Refuse a model with BatchNorm: its batch statistics mix records, so per-sample clipping bounds nothing."""
    bn = [n or type(model).__name__ for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(
            f"DP-SGD refuses a model with BatchNorm ({', '.join(bn[:3])}): batch statistics make each record's "
            "output depend on the other records of its batch, so per-sample clipping would not bound one record's "
            "influence. Use GroupNorm or LayerNorm."
        )


class _PoissonBatches:
    """Endless Poisson-sampled batches of dataset indices (Opacus' sampler, seeded)."""

    def __init__(self, n: int, q: float, generator: torch.Generator) -> None:
        self.sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=generator)
        self._it = iter(self.sampler)

    def next(self) -> list[int]:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.sampler)
            return next(self._it)


class PrivateGradient:
    """The DP-SGD gradient of a per-record loss vector, in one Opacus mode (see the module docstring).

    ``backward(per_record_loss)`` leaves in every trainable parameter's ``.grad``
    ``(sum_i clip_C(grad loss_i) + N(0, (z C)^2 I)) / expected_batch_size``, the same
    quantity in every mode (up to floating point); :meth:`step` applies the wrapped optimizer.
    ``model`` must already have ``requires_grad`` set on exactly the parameters to train.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        mode: str,
        clipping: str,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}. Found {mode!r}.")
        refuse_batch_norm(model)
        if mode == "ghost" and clipping != "flat":
            raise ValueError(
                "ghost clipping clips the whole per-sample gradient by one norm; it cannot clip per "
                f"layer. Use clipping = 'flat' or grad_sample_mode = 'hooks'. Found {clipping!r}."
            )
        self.mode = mode
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.expected_batch_size = int(expected_batch_size)
        kw = dict(
            noise_multiplier=float(noise_multiplier),
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=generator,
            secure_mode=secure_mode,
        )
        if mode == "ghost":
            self.module: nn.Module = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm, use_ghost_clipping=True
            )
            self.optimizer: DPOptimizer = DPOptimizerFastGradientClipping(optimizer, max_grad_norm=clip_norm, **kw)
        else:
            self.module = GradSampleModule(
                model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
            )
            if clipping == "per_layer":
                per = clip_norm / math.sqrt(len(self.params))
                self.optimizer = DPPerLayerOptimizer(optimizer, max_grad_norm=[per] * len(self.params), **kw)
            else:
                self.optimizer = DPOptimizer(optimizer, max_grad_norm=clip_norm, **kw)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, per_record_loss: torch.Tensor) -> torch.Tensor:
        """Clipped, summed, noised, averaged gradient of ``per_record_loss`` (shape ``[B]``) into ``.grad``.

        A record whose per-sample gradient is not finite contributes exactly zero: in ``hooks`` and
        ``functorch`` modes its per-sample gradient is replaced by zeros before clipping; in
        ``ghost`` mode (which never forms per-sample gradients) a non-finite gradient norm stops the
        step before the second backward, with nothing accumulated, and the caller computes the loss
        again without those records.  Returns the mask ``[B]`` of such records; in ``ghost`` mode,
        when it has any ``True``, nothing was stepped and ``backward`` must be called again.
        """
        if per_record_loss.ndim != 1:
            raise ValueError(
                f"DP-SGD needs one loss per record (shape [B]); found shape {tuple(per_record_loss.shape)}."
            )
        n = per_record_loss.shape[0]
        if n == 0:
            self.noise_only()
            return torch.zeros(0, dtype=torch.bool)
        if self.mode == "ghost":
            # Opacus' two passes (DPTensorFastGradientClipping.backward), with a check between them:
            # per-sample gradient norms first, then the clipped sum sum_i min(1, C / ||g_i||) loss_i.
            per_record_loss.mean().backward(retain_graph=True)
            self.optimizer.zero_grad()
            bad = ~torch.isfinite(self.module.get_norm_sample()).to("cpu")
            if bad.any():
                return bad
            coeff = self.module.get_clipping_coef()
            second = (coeff.to(per_record_loss.device) * per_record_loss).sum()
            self.module.disable_hooks()
            try:
                second.backward()
            finally:
                self.module.enable_hooks()
        else:
            per_record_loss.mean().backward()
            bad = torch.zeros(n, dtype=torch.bool)
            for p in self.params:
                gs = getattr(p, "grad_sample", None)
                if isinstance(gs, torch.Tensor):
                    bad |= ~torch.isfinite(gs.reshape(gs.shape[0], -1)).all(dim=1).to("cpu")
            if bad.any():
                for p in self.params:
                    gs = getattr(p, "grad_sample", None)
                    if isinstance(gs, torch.Tensor):
                        gs[bad.to(gs.device)] = 0.0
        self.optimizer.pre_step()
        if not all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None):
            # Clipped per-record gradients are finite; a sum that is not (float overflow) is replaced by a
            # noise-only step, so no record's value leaks through it.
            self.noise_only()
            bad = torch.ones(n, dtype=torch.bool)
        return bad

    def discard_forward(self) -> None:
        """Forget a forward pass that will not be back-propagated (the batch is recomputed without some records).

        Opacus' hooks keep each forward's activations and count forwards per parameter until a backward
        consumes them; a second forward before a backward would otherwise read as parameter tying (ghost)
        or mix two batches' activations (hooks).
        """
        for module in self.module.modules():
            if hasattr(module, "activations"):
                module.activations = []
        for p in self.params:
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0

    def noise_only(self) -> None:
        """The step of an empty Poisson batch: ``.grad = N(0, (z C)^2 I) / expected_batch_size``.

        Written out rather than through the optimizer: Opacus' ``DPOptimizer.scale_grad``
        asks for per-sample gradients, which an empty batch does not have.
        """
        opt = self.optimizer
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in self.params:
            p.grad = (
                _generate_noise(std=std, reference=p, generator=opt.generator, secure_mode=opt.secure_mode)
                / self.expected_batch_size
            )

    def step(self) -> None:
        """Apply the wrapped (non-private) optimizer to the private gradient."""
        self.optimizer.original_optimizer.step()

    def close(self) -> None:
        """Remove Opacus' hooks and per-parameter attributes; the model is plain again."""
        self.module._close()
        for p in self.params:
            for attr in ("summed_grad", "_processed"):
                if hasattr(p, attr):
                    delattr(p, attr)


def _subset(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The rows ``keep`` of every tensor of a batch."""
    return {k: (v[keep.to(v.device)] if torch.is_tensor(v) else v) for k, v in batch.items()}


class PrivateSteps:
    """The DP-SGD step engine of :meth:`LocalTrainer.fit <secure_fedvlp.methods.trainer.LocalTrainer.fit>`.

    Poisson batches (an empty one is a noise-only step), per-record losses through
    :class:`PrivateGradient`, and data-independent regularisers added after the noise
    (post-processing).  Built per job by :meth:`DPTrainer.fit`, after the ledger recorded the job.
    ``expected_batch_size`` is ``q`` times the declared size (data-independent), not ``q * len(dataset)``.
    """

    reduction = "none"

    def __init__(
        self,
        trainer: LocalTrainer,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataset,
        *,
        sample_rate: float,
        noise_multiplier: float,
        privacy: PrivacyConfig,
        sampling_generator: torch.Generator,
        noise_generator: torch.Generator,
        expected_batch_size: int,
    ) -> None:
        n = len(dataset)
        self.dataset = dataset
        self.device = trainer.device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.private = PrivateGradient(
            model,
            optimizer,
            mode=privacy.grad_sample_mode,
            clipping=privacy.clipping,
            clip_norm=privacy.clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            generator=noise_generator,
            secure_mode=privacy.secure_mode,
        )
        self.module = self.private.module
        self.batches = _PoissonBatches(n, sample_rate, sampling_generator)
        self.collate = make_collate(model)
        self.nonfinite_records = 0  # site-local statistic, never released

    def next_batch(self) -> dict[str, Any] | None:
        self.private.zero_grad()
        idx = self.batches.next()
        if len(idx) == 0:
            return None
        return {
            k: (v.to(self.device) if torch.is_tensor(v) else v)
            for k, v in self.collate([self.dataset[i] for i in idx]).items()
        }

    def backward(
        self,
        compute: Callable[[dict[str, Any]], dict[str, torch.Tensor]],
        batch: dict[str, Any],
        regularizer: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The private gradient of the batch; records whose loss or gradient is not finite contribute zero.

        A non-finite per-record value is what a crafted model would use to single out records with a
        chosen property (an overflow only they trigger).  Such a record is dropped from the step's sum
        before clipping (its loss is computed again without it), so its contribution is exactly zero,
        the noise is unchanged and the reply stays finite; how many were dropped stays in the site's log.
        """
        terms = compute(batch)
        keep = torch.isfinite(terms["loss"].detach()).to("cpu")
        dropped = 0
        for _ in range(2):  # at most one retry: per-record values do not depend on the other records
            if not keep.all():
                dropped += int((~keep).sum())
                if not keep.any():
                    self.private.discard_forward()
                    self.private.noise_only()
                    break
                self.private.discard_forward()
                batch = _subset(batch, keep)
                terms = compute(batch)
            bad = self.private.backward(terms["loss"])
            if not bad.any():
                break
            if self.private.mode != "ghost":  # hooks/functorch zeroed them in place and stepped
                dropped += int(bad.sum())
                break
            self.private.zero_grad()
            keep = ~bad
        else:  # pragma: no cover - per-record independence makes a second drop impossible
            self.private.zero_grad()
            self.private.noise_only()
        if dropped:
            self.nonfinite_records += dropped
            logger.warning(
                "DP-SGD step: %d record(s) with a non-finite loss or gradient contributed zero "
                "(site-local; not released).",
                dropped,
            )
        self._add_regularizer(regularizer)
        return terms

    def empty_step(self, regularizer: Mapping[str, torch.Tensor]) -> None:
        self.private.noise_only()
        self._add_regularizer(regularizer)

    def _add_regularizer(self, regularizer: Mapping[str, torch.Tensor]) -> None:
        """Data-independent terms: their gradient is added to the noised gradient (post-processing)."""
        if not regularizer:
            return
        grads = torch.autograd.grad(sum(regularizer.values()), self.params, allow_unused=True)
        for p, g in zip(self.params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def step(self) -> None:
        self.private.step()

    def close(self) -> None:
        self.private.close()

    def stats(self) -> dict[str, float]:
        """Records dropped for a non-finite loss or gradient (site-local: the DP reply never carries it)."""
        return {"nonfinite_records": float(self.nonfinite_records)}


class DPTrainer:
    """Wraps a method's trainer in DP-SGD with ledger accounting and budget enforcement.

    ``declared_size`` is the site's declared public size (its training split): the sample rate,
    the noisy mean's normaliser and every count the site releases derive from it (through the
    method's :meth:`~secure_fedvlp.methods.trainer.LocalTrainer.declared_training_size` and
    :meth:`~secure_fedvlp.methods.trainer.LocalTrainer.declared_report_count`).
    """

    def __init__(
        self,
        inner: LocalTrainer,
        ledger_path,
        client_id: str,
        noise_multiplier: float,
        sample_rate: float,
        privacy: PrivacyConfig,
        *,
        declared_size: int,
    ) -> None:
        if inner.objective.couples_samples:
            raise ValueError(
                f"the {type(inner.objective).__name__} objective couples records; DP-SGD needs a "
                "per-sample decomposable objective (train.objective = 'decomposable')."
            )
        self.inner = inner
        self.ledger_path = Path(ledger_path)
        self.client_id = client_id
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.privacy = privacy
        if isinstance(declared_size, bool) or not isinstance(declared_size, int) or declared_size < 1:
            raise ValueError(f"declared_size must be an integer >= 1; found {declared_size!r}.")
        self.declared_size = declared_size
        self.declared_train = inner.declared_training_size(declared_size)
        self.name = f"dp-{inner.name}"
        self.steps_taken = 0

    # -- what the site states in clear: declared sizes only -------------------------------
    def released_site_size(self, dataset) -> int:
        """The declared size, whatever ``dataset`` holds."""
        return self.declared_size

    def released_train_count(self, dataset) -> int:
        """The declared training size, whatever ``dataset`` holds."""
        return self.declared_train

    @property
    def expected_batch_size(self) -> int:
        """``q`` times the declared training size: DP-SGD's normaliser, independent of the data."""
        return max(1, int(round(self.sample_rate * self.declared_train)))

    @property
    def ledger(self) -> PrivacyLedger:
        """The client's ledger, reopened and verified for every use.

        A site's messages may be handled by different processes over a run (Flower's
        simulation runs a node's ClientApp in whichever actor is free), so no process keeps
        the ledger open between releases: each release resumes it from disk, and the ledger
        refuses a write if the file changed underneath it.  A partial last line left by a process of
        this site that died in the middle of a write is dropped when the head file proves it was never
        committed (``repair=True``, logged): the process that reopens the ledger may not be a new one.
        """
        return make_ledger(self.ledger_path, self.client_id, self.privacy, repair=True)

    # Delegate everything the runtime may ask of a trainer.
    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)

    def private_generators(self, seed_from: torch.Generator) -> tuple[torch.Generator, torch.Generator]:
        """Generators for Poisson sampling (CPU) and for the Gaussian noise (the training device).

        Both must be unpredictable to every other party: privacy amplification by subsampling
        assumes nobody knows which records a step used, and the Gaussian mechanism assumes nobody
        knows the noise.  The job generator ``seed_from`` is derived from ``run.seed``, which the
        server holds, so by default both are seeded from the OS CSPRNG (:func:`secrets.randbits`)
        instead.  Only ``privacy.seeded_randomness = true`` derives them from ``seed_from``
        (reproducible, and without a DP claim against anyone who knows the seed).  With
        ``secure_mode`` the noise generator feeds Opacus' floating-point-attack mitigation
        (2n Gaussian draws per value); the generator itself is torch's PRNG, not a CSPRNG
        (``torchcsprng``, which Opacus' ``PrivacyEngine`` would use, has no build for this torch).
        """
        if self.privacy.seeded_randomness:
            seeds = torch.randint(0, 2**62, (2,), generator=seed_from).tolist()
        else:
            seeds = [secrets.randbits(63), secrets.randbits(63)]
        sampling = torch.Generator().manual_seed(int(seeds[0]))
        noise = torch.Generator(device=self.inner.device).manual_seed(int(seeds[1]))
        return sampling, noise

    def fit(
        self,
        model: nn.Module,
        dataset,
        task: TrainTask,
        generator: torch.Generator,
        global_state: Mapping[str, np.ndarray],
    ) -> dict[str, float]:
        """One DP-SGD job: the ledger records it first, then the method's own loop runs with :class:`PrivateSteps`."""
        inner = self.inner
        n = len(inner.training_subset(dataset))
        if n < 2:
            raise ValueError(f"site has {n} paired training records; at least 2 are needed.")
        q = self.sample_rate  # batch_size / declared training size: never a function of n
        if not 0.5 * self.declared_train <= n <= 2 * self.declared_train:
            logger.warning(
                "site %s holds %d training records but declares %d (site-local; not released): the sample rate "
                "%.5f and the released counts follow the declared size, so batches average %.1f records, not %d",
                self.client_id,
                n,
                self.declared_train,
                q,
                q * n,
                self.expected_batch_size,
            )
        event = DPSGDEvent(
            noise_multiplier=self.noise_multiplier,
            sample_rate=q,
            steps=task.steps,
            clip_norm=self.privacy.clip_norm,
            round=task.server_round,
            stage=task.stage,
        )
        ledger = self.ledger
        ledger.record(event)  # before any step: raises PrivacyBudgetExhausted and trains nothing
        sampling_gen, noise_gen = self.private_generators(generator)

        def centroid_release(server_round: int) -> tuple[float, torch.Generator]:
            """The site's report-centroid release (train.objective = 'site_centroids'): ledger first, then noise."""
            release = site_centroids_event(inner.cfg, server_round)
            ledger.record(release)  # before the sums exist: a budget that cannot afford it releases nothing
            seed = (
                int(torch.randint(0, 2**62, (1,), generator=generator))
                if self.privacy.seeded_randomness
                else secrets.randbits(63)
            )
            return release.sigma, torch.Generator().manual_seed(seed)

        inner.centroid_release = centroid_release

        def engine(model_: nn.Module, optimizer: torch.optim.Optimizer, data, _generator) -> PrivateSteps:
            return PrivateSteps(
                inner,
                model_,
                optimizer,
                data,
                sample_rate=q,
                noise_multiplier=self.noise_multiplier,
                privacy=self.privacy,
                sampling_generator=sampling_gen,
                noise_generator=noise_gen,
                expected_batch_size=self.expected_batch_size,
            )

        local = inner.fit(model, dataset, task, generator, global_state, engine=engine)
        self.steps_taken += task.steps
        if inner.post_processing_release is not None:
            # A function of this job's DP-SGD output and public data only: free, but logged before it leaves.
            ledger.record(PostProcessingEvent(what=inner.post_processing_release, round=task.server_round))
        self._log_local(task, {k: v for k, v in local.items() if k.startswith("train_")})
        metrics = {
            "steps": float(task.steps),
            NUM_EXAMPLES: float(self.declared_train),
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_sample_rate": q,
            EPSILON: ledger.epsilon(),
            EPSILON_BUDGET: self.privacy.target_epsilon,
        }
        if not set(metrics) <= RELEASED_TRAIN_METRICS:  # pragma: no cover - a guard against future edits
            raise RuntimeError(f"a DP train reply may carry only covered or public values; found {sorted(metrics)}.")
        return metrics

    def _log_local(self, task: TrainTask, values: Mapping[str, float]) -> None:
        """Keep un-noised training statistics at the client: its log and a JSON Lines file beside its ledger."""
        logger.info(
            "site %s round %d (%s), local only: %s",
            self.client_id,
            task.server_round,
            task.stage,
            ", ".join(f"{k}={v:.4f}" for k, v in values.items()),
        )
        path = RunLayout.local_train_metrics_beside(self.ledger_path)
        with open_site_file(path) as f:  # 0600, like the ledger beside it
            f.write(json.dumps({"round": task.server_round, "stage": task.stage, **values}) + "\n")

    def answer_query(self, kind: str, model: nn.Module, site, config: Mapping[str, Any]) -> dict[str, float]:
        """A noised, clipped, ledger-recorded version of the inner trainer's scalar report."""
        values = self.inner.report_values(kind, model, site, config)
        if values is None:
            return self.inner.answer_query(kind, model, site, config)
        p = self.privacy
        m = self.inner.declared_report_count(kind, self.declared_size)
        if m is None:
            raise ValueError(f"report {kind!r} has no declared public count; it cannot be released under DP.")
        if m < p.min_report_count:
            raise ValueError(
                f"report {kind!r} would divide by a declared count of {m} records, below the minimum "
                f"{p.min_report_count} (4 x privacy.report_noise_multiplier): its noise std "
                f"{p.report_noise_multiplier * p.report_clip / m:.3g} would exceed a quarter of privacy.report_clip."
            )
        rnd = int(config.get("server-round", 0))
        event = mean_release_event(
            p.report_clip, p.report_noise_multiplier, public_count=m, what=f"{kind} report", round=rnd
        )
        ledger = self.ledger
        ledger.record(event)  # before the release
        gen = torch.Generator().manual_seed(secrets.randbits(62))
        estimate, released = noised_clipped_mean(
            values.reshape(-1).float(),
            clip=p.report_clip,
            noise_multiplier=p.report_noise_multiplier,
            generator=gen,
            bounds="nonnegative",
            public_count=m,
            what=f"{kind} report",
            round=rnd,
        )
        if released != event:  # pragma: no cover - the recorded event must be the released one
            raise RuntimeError(f"released {released} but recorded {event}.")
        return {kind: float(estimate.reshape(-1)[0]), NUM_EXAMPLES: float(m), EPSILON: ledger.epsilon()}


def make_ledger(path, client_id: str, privacy: PrivacyConfig, *, repair: bool = False) -> PrivacyLedger:
    """The client's ledger (resumed if it exists), enforcing its (epsilon, delta) budget.

    ``repair`` (a site's start): drop a partial last line the head file proves was never committed
    (:func:`~secure_fedvlp.privacy.ledger.repair_ledger`, logged); anything else is refused.
    """
    budget = Budget(privacy.target_epsilon, privacy.delta)
    return PrivacyLedger(path, client_id, budget, accountant=privacy.accountant, repair=repair)
