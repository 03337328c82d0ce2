"""DP-SGD as a wrapper around any method's client trainer (Opacus), with the ledger in the loop.

:class:`DPTrainer` wraps a :class:`~secure_fedvlp.methods.base.LocalTrainer` by
composition; the method knows nothing about privacy (STYLE.md item 2).  Per local job:

1. the job's DP-SGD event (noise multiplier, Poisson sample rate, steps, clip norm, round,
   stage) is **recorded in the client's ledger before the first step**; the ledger
   refuses it with :class:`~secure_fedvlp.errors.PrivacyBudgetExhausted` if it would
   exceed the budget, so nothing is trained or released;
2. batches are drawn by Opacus' Poisson sampler (``UniformWithReplacementSampler``): each
   record joins each batch independently with probability ``q``, which is what the
   sampled-Gaussian accounting assumes;
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
public counts (``num-examples``, ``steps``), the public DP parameters (noise multiplier,
sample rate) and the privacy spent and budget (``epsilon``, ``epsilon-budget``; functions
of public parameters).  The training-loss terms are computed on private records with no
noise, so they are *not* released: :meth:`DPTrainer.fit` writes them to the client's own
disk (``local_train_metrics.jsonl`` beside its ledger) and its log, and strips them from
the reply (:data:`RELEASED_TRAIN_METRICS` is the allow-list).

Scalar reports a method sends (FedDRA's DRO losses) go through :meth:`DPTrainer.answer_query`:
per-record values are clipped to ``[0, C_r]``, summed, noised with ``N(0, (z_r C_r)^2)``, and
divided by the slice size, which is treated as public (sites' dataset sizes are released as
aggregation weights anyway; see the threat model).  The Gaussian event is recorded first.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
from opacus.optimizers.optimizer import _generate_noise
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from secure_fedvlp.config import ExperimentConfig, PrivacyConfig
from secure_fedvlp.methods.base import NUM_EXAMPLES, LocalTrainer, TrainTask, make_collate
from secure_fedvlp.privacy.anchors import planned_anchor_events
from secure_fedvlp.privacy.budget import Budget
from secure_fedvlp.privacy.calibration import calibrate_noise_multiplier
from secure_fedvlp.privacy.events import DPSGDEvent, GaussianEvent
from secure_fedvlp.privacy.ledger import PrivacyLedger
from secure_fedvlp.privacy.mechanisms import mean_release_event, noised_clipped_mean

logger = logging.getLogger(__name__)

__all__ = ["DPTrainer", "PrivateGradient", "planned_steps_per_round", "client_noise_multiplier", "make_ledger",
           "BUDGET_EXHAUSTED", "RELEASED_TRAIN_METRICS", "GRAD_SAMPLE_MODES"]

BUDGET_EXHAUSTED = "budget-exhausted"
EPSILON_BUDGET = "epsilon-budget"
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")

# What a DP client's train reply may carry: public counts, public DP parameters, the privacy
# spent and the budget (functions of public parameters), and the budget-exhausted flag.
# No un-noised function of private records (training losses, gradient norms, timings).
RELEASED_TRAIN_METRICS = frozenset({NUM_EXAMPLES, "steps", "dp_noise_multiplier", "dp_sample_rate", "epsilon",
                                    EPSILON_BUDGET, BUDGET_EXHAUSTED})


def planned_steps_per_round(cfg: ExperimentConfig) -> int:
    """Local DP-SGD steps a client takes in one round under the configured method."""
    if cfg.federation.method == "feddra":
        return cfg.feddra.stage1_steps + (cfg.feddra.stage2_steps or cfg.train.local_steps)
    return cfg.train.local_steps


def planned_reports(cfg: ExperimentConfig) -> list[GaussianEvent]:
    """Scalar reports a client is planned to release over the run (FedDRA/FedAID's DRO losses)."""
    if cfg.federation.method not in ("feddra", "fedaid"):
        return []
    p = cfg.privacy
    return [GaussianEvent(sensitivity=p.report_clip, sigma=p.report_noise_multiplier * p.report_clip,
                          what="dro-loss (planned)", round=r) for r in range(1, cfg.federation.num_rounds + 1)]


def client_noise_multiplier(cfg: ExperimentConfig, num_train: int) -> tuple[float, float]:
    """(noise multiplier, sample rate) for a client with ``num_train`` training records.

    The sample rate is ``batch_size / num_train``.  With ``privacy.noise_multiplier = 0``
    the multiplier is calibrated so that every planned release of the run (all rounds'
    DP-SGD steps and scalar reports) fits the target epsilon; calibration never overshoots.
    """
    p = cfg.privacy
    q = min(1.0, cfg.train.batch_size / max(1, num_train))
    if p.noise_multiplier > 0:
        return p.noise_multiplier, q
    steps = planned_steps_per_round(cfg) * cfg.federation.num_rounds
    z = calibrate_noise_multiplier(p.target_epsilon, p.delta, q, steps, accountant=p.accountant,
                                   prior_events=planned_reports(cfg) + planned_anchor_events(cfg))
    return z, q


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

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, mode: str, clipping: str,
                 clip_norm: float, noise_multiplier: float, expected_batch_size: int,
                 generator: torch.Generator | None = None, secure_mode: bool = False) -> None:
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}. Found {mode!r}.")
        if mode == "ghost" and clipping != "flat":
            raise ValueError("ghost clipping clips the whole per-sample gradient by one norm; it cannot clip per "
                             f"layer. Use clipping = 'flat' or grad_sample_mode = 'hooks'. Found {clipping!r}.")
        self.mode = mode
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.expected_batch_size = int(expected_batch_size)
        kw = dict(noise_multiplier=float(noise_multiplier), expected_batch_size=self.expected_batch_size,
                  loss_reduction="mean", generator=generator, secure_mode=secure_mode)
        if mode == "ghost":
            self.module: nn.Module = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm, use_ghost_clipping=True)
            self.optimizer: DPOptimizer = DPOptimizerFastGradientClipping(optimizer, max_grad_norm=clip_norm, **kw)
        else:
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                                           force_functorch=mode == "functorch")
            if clipping == "per_layer":
                per = clip_norm / math.sqrt(len(self.params))
                self.optimizer = DPPerLayerOptimizer(optimizer, max_grad_norm=[per] * len(self.params), **kw)
            else:
                self.optimizer = DPOptimizer(optimizer, max_grad_norm=clip_norm, **kw)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, per_record_loss: torch.Tensor) -> None:
        """Clipped, summed, noised, averaged gradient of ``per_record_loss`` (shape ``[B]``) into ``.grad``."""
        if per_record_loss.ndim != 1:
            raise ValueError("DP-SGD needs one loss per record (shape [B]); found shape "
                             f"{tuple(per_record_loss.shape)}.")
        if per_record_loss.shape[0] == 0:
            self.noise_only()
            return
        if self.mode == "ghost":
            # Two backward passes: norms, then the clipped sum (Opacus' DPTensorFastGradientClipping).
            DPTensorFastGradientClipping(self.module, self.optimizer, per_record_loss, "mean").backward()
        else:
            per_record_loss.mean().backward()
        self.optimizer.pre_step()

    def noise_only(self) -> None:
        """The step of an empty Poisson batch: ``.grad = N(0, (z C)^2 I) / expected_batch_size``.

        Written out rather than through the optimizer: Opacus' ``DPOptimizer.scale_grad``
        asks for per-sample gradients, which an empty batch does not have.
        """
        opt = self.optimizer
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in self.params:
            p.grad = _generate_noise(std=std, reference=p, generator=opt.generator,
                                     secure_mode=opt.secure_mode) / self.expected_batch_size

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


class DPTrainer:
    """Wraps a method's trainer in DP-SGD with ledger accounting and budget enforcement."""

    def __init__(self, inner: LocalTrainer, ledger_path, client_id: str, noise_multiplier: float, sample_rate: float,
                 privacy: PrivacyConfig) -> None:
        if inner.objective.couples_samples:
            raise ValueError(f"the {type(inner.objective).__name__} objective couples records; DP-SGD needs a "
                             "per-sample decomposable objective (train.objective = 'decomposable').")
        self.inner = inner
        self.ledger_path = Path(ledger_path)
        self.client_id = client_id
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.privacy = privacy
        self.name = f"dp-{inner.name}"
        self.steps_taken = 0

    @property
    def ledger(self) -> PrivacyLedger:
        """The client's ledger, reopened and verified for every use.

        A site's messages may be handled by different processes over a run (Flower's
        simulation runs a node's ClientApp in whichever actor is free), so no process keeps
        the ledger open between releases: each release resumes it from disk, and the ledger
        refuses a write if the file changed underneath it.
        """
        return make_ledger(self.ledger_path, self.client_id, self.privacy)

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

    def fit(self, model: nn.Module, dataset, task: TrainTask, generator: torch.Generator,
            global_state: Mapping[str, np.ndarray]) -> dict[str, float]:
        inner = self.inner
        dataset = inner.training_subset(dataset)
        n = len(dataset)
        if n < 2:
            raise ValueError(f"site has {n} paired training records; at least 2 are needed.")
        q = min(1.0, inner.cfg.train.batch_size / n)
        if not math.isclose(q, self.sample_rate, rel_tol=1e-9):
            logger.info("sample rate %.5f differs from the calibrated %.5f (training subset size %d)", q,
                        self.sample_rate, n)
        event = DPSGDEvent(noise_multiplier=self.noise_multiplier, sample_rate=q, steps=task.steps,
                           clip_norm=self.privacy.clip_norm, round=task.server_round, stage=task.stage)
        ledger = self.ledger
        ledger.record(event)  # before any step: raises PrivacyBudgetExhausted and trains nothing

        federated = {nm for nm, p in model.named_parameters() if p.requires_grad}
        names = set(inner.trainable_names(model, task.stage))
        for nm, p in model.named_parameters():
            p.requires_grad_(nm in names)
        model.train()
        state = inner.begin(model, task, global_state, dataset=dataset)  # before hooks: banks/views see a plain model
        sampling_gen, noise_gen = self.private_generators(generator)
        params = [p for nm, p in model.named_parameters() if nm in names]
        base_opt = inner.make_optimizer(model, [nm for nm, _ in model.named_parameters() if nm in names])
        private = PrivateGradient(model, base_opt, mode=self.privacy.grad_sample_mode, clipping=self.privacy.clipping,
                                  clip_norm=self.privacy.clip_norm, noise_multiplier=self.noise_multiplier,
                                  expected_batch_size=max(1, int(round(q * n))),
                                  generator=noise_gen, secure_mode=self.privacy.secure_mode)
        batches = _PoissonBatches(n, q, sampling_gen)
        collate = make_collate(model)
        sums: dict[str, float] = {}
        reg_sums: dict[str, float] = {}
        records = 0
        t0 = time.perf_counter()
        try:
            for _ in range(task.steps):
                idx = batches.next()
                private.zero_grad()
                if len(idx) == 0:  # an empty Poisson batch: the step releases noise only
                    private.noise_only()
                else:
                    batch = {k: (v.to(inner.device) if torch.is_tensor(v) else v)
                             for k, v in collate([dataset[i] for i in idx]).items()}
                    terms = inner.compute_loss(private.module, batch, state, reduction="none")
                    private.backward(terms["loss"])
                    for k, v in terms.items():  # local bookkeeping only: never released (see module doc)
                        sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
                    records += len(idx)
                reg = inner.regularizer(model, state)
                if reg:  # data-independent: added to the noised gradient (post-processing)
                    grads = torch.autograd.grad(sum(reg.values()), params, allow_unused=True)
                    for p, g in zip(params, grads, strict=True):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                    for k, v in reg.items():
                        reg_sums[k] = reg_sums.get(k, 0.0) + float(v.detach())
                private.step()
                self.steps_taken += 1
        finally:
            private.close()
            for nm, p in model.named_parameters():
                p.requires_grad_(nm in federated)
        local = {f"train_{k}": v / max(records, 1) for k, v in sums.items()}
        local.update({f"train_{k}": v / max(task.steps, 1) for k, v in reg_sums.items()})
        local.update({"train_seconds": time.perf_counter() - t0, "train_records_seen": float(records)})
        self._log_local(task, local)
        metrics = {"steps": float(task.steps), NUM_EXAMPLES: float(n), "dp_noise_multiplier": self.noise_multiplier,
                   "dp_sample_rate": q, "epsilon": ledger.epsilon(), EPSILON_BUDGET: self.privacy.target_epsilon}
        assert set(metrics) <= RELEASED_TRAIN_METRICS, "a DP train reply may carry only covered or public values"
        return metrics

    def _log_local(self, task: TrainTask, values: Mapping[str, float]) -> None:
        """Keep un-noised training statistics at the client: its log and a JSON Lines file beside its ledger."""
        logger.info("site %s round %d (%s), local only: %s", self.client_id, task.server_round, task.stage,
                    ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
        path = self.ledger_path.parent / "local_train_metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": task.server_round, "stage": task.stage, **values}) + "\n")

    def answer_query(self, kind: str, model: nn.Module, site, config: Mapping[str, Any]) -> dict[str, float]:
        """A noised, clipped, ledger-recorded version of the inner trainer's scalar report."""
        values = self.inner.report_values(kind, model, site, config)
        if values is None:
            return self.inner.answer_query(kind, model, site, config)
        p = self.privacy
        n = len(values)
        rnd = int(config.get("server-round", 0))
        event = mean_release_event(p.report_clip, p.report_noise_multiplier, public_count=max(n, 1),
                                   what=f"{kind} report", round=rnd)
        ledger = self.ledger
        ledger.record(event)  # before the release
        gen = torch.Generator().manual_seed(secrets.randbits(62))
        estimate, released = noised_clipped_mean(values.reshape(-1).float(), clip=p.report_clip,
                                                 noise_multiplier=p.report_noise_multiplier, generator=gen,
                                                 bounds="nonnegative", public_count=max(n, 1),
                                                 what=f"{kind} report", round=rnd)
        assert released == event, "the recorded event must be the released one"
        return {kind: float(estimate.reshape(-1)[0]), NUM_EXAMPLES: float(n), "epsilon": ledger.epsilon()}


def make_ledger(path, client_id: str, privacy: PrivacyConfig) -> PrivacyLedger:
    """The client's ledger (resumed if it exists), enforcing its (epsilon, delta) budget."""
    return PrivacyLedger(path, client_id, Budget(privacy.target_epsilon, privacy.delta), accountant=privacy.accountant)
