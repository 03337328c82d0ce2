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
3. Opacus' ``GradSampleModule`` computes per-sample gradients of the method's per-sample
   loss terms, and ``DPOptimizer`` clips each (flat or per layer), sums, adds Gaussian noise
   of std ``z * C`` and averages;
4. data-independent regularisers (FedProx's proximal term) are differentiated separately
   and added *after* noising: they touch no record, so this is post-processing;
5. after the job the hooks are removed, so evaluation and the next job see a plain model.

Scalar reports a method sends (FedDRA's DRO losses) go through :meth:`DPTrainer.answer_query`:
per-record values are clipped to ``[0, C_r]``, summed, noised with ``N(0, (z_r C_r)^2)``, and
divided by the slice size, which is treated as public (sites' dataset sizes are released as
aggregation weights anyway; see the threat model).  The Gaussian event is recorded first.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
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

__all__ = ["DPTrainer", "planned_steps_per_round", "client_noise_multiplier", "make_ledger", "BUDGET_EXHAUSTED"]

BUDGET_EXHAUSTED = "budget-exhausted"


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


class DPTrainer:
    """Wraps a method's trainer in DP-SGD with ledger accounting and budget enforcement."""

    def __init__(self, inner: LocalTrainer, ledger_path, client_id: str, noise_multiplier: float, sample_rate: float,
                 privacy: PrivacyConfig) -> None:
        if inner.objective.couples_samples:
            raise ValueError(f"the {type(inner.objective).__name__} objective couples records; DP-SGD needs a "
                             "per-sample decomposable objective (train.objective = 'decomposable').")
        self.inner = inner
        self.ledger_path = ledger_path
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

    def _noise_generator(self, seed_from: torch.Generator) -> torch.Generator | None:
        if self.privacy.secure_mode:
            return None  # Opacus secure mode draws from its own CSPRNG
        return torch.Generator(device=self.inner.device).manual_seed(int(torch.randint(0, 2**62, (1,),
                                                                                        generator=seed_from)))

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
        state = inner.begin(model, task, global_state)  # before hooks: copies/banks see a plain model
        params = [p for nm, p in model.named_parameters() if nm in names]
        base_opt = inner.make_optimizer(model, [nm for nm, _ in model.named_parameters() if nm in names])
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                               force_functorch=self.privacy.grad_sample_mode == "functorch")
        expected = max(1, int(round(q * n)))
        if self.privacy.clipping == "per_layer":
            per = self.privacy.clip_norm / math.sqrt(len(params))
            dp_opt: DPOptimizer = DPPerLayerOptimizer(base_opt, noise_multiplier=self.noise_multiplier,
                                                      max_grad_norm=[per] * len(params), expected_batch_size=expected,
                                                      loss_reduction="mean", generator=self._noise_generator(generator),
                                                      secure_mode=self.privacy.secure_mode)
        else:
            dp_opt = DPOptimizer(base_opt, noise_multiplier=self.noise_multiplier,
                                 max_grad_norm=self.privacy.clip_norm, expected_batch_size=expected,
                                 loss_reduction="mean", generator=self._noise_generator(generator),
                                 secure_mode=self.privacy.secure_mode)
        batches = _PoissonBatches(n, q, generator)
        collate = make_collate(model)
        sums: dict[str, float] = {}
        try:
            for _ in range(task.steps):
                idx = batches.next()
                dp_opt.zero_grad(set_to_none=True)
                if len(idx) == 0:  # an empty Poisson batch: the step releases noise only
                    for p in params:
                        p.summed_grad = torch.zeros_like(p)
                    dp_opt.add_noise()
                    dp_opt.scale_grad()
                else:
                    batch = {k: (v.to(inner.device) if torch.is_tensor(v) else v)
                             for k, v in collate([dataset[i] for i in idx]).items()}
                    terms = inner.compute_loss(gsm, batch, state)
                    terms["loss"].backward()
                    dp_opt.pre_step()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                reg = inner.regularizer(model, state)
                if reg:  # data-independent: added to the noised gradient (post-processing)
                    grads = torch.autograd.grad(sum(reg.values()), params, allow_unused=True)
                    for p, g in zip(params, grads, strict=True):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                    for k, v in reg.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                dp_opt.original_optimizer.step()
                self.steps_taken += 1
        finally:
            gsm._close()
            for nm, p in model.named_parameters():
                p.requires_grad_(nm in federated)
        metrics = {f"train_{k}": v / max(task.steps, 1) for k, v in sums.items()}
        metrics.update({"steps": float(task.steps), NUM_EXAMPLES: float(n), "dp_noise_multiplier": self.noise_multiplier,
                        "dp_sample_rate": q, "epsilon": ledger.epsilon()})
        return metrics

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
