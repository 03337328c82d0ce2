"""Where the config chooses wrappers: the one place that composes a method with DP-SGD, anchors and encryption.

Server side, :func:`strategy_class` returns ``method``, ``anchored(method)``, ``encrypted(method)``
or ``encrypted(anchored(method))``.  Client side, :func:`client_parts` returns the method's
trainer (wrapped in DP-SGD when privacy is on), the encryption state of the client mod, and the
client extensions (the anchor client).  :func:`release_plan` is what one training site releases
per round: the method's plan plus every wrapper's releases; DP calibration consumes it.
Nothing below this module branches on ``privacy.enabled``, ``anchors.enabled`` or ``encryption.enabled``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.data import SiteData
from secure_fedvlp.layout import RunLayout
from secure_fedvlp.methods import VLPStrategy, get_method
from secure_fedvlp.methods.registry import method_model
from secure_fedvlp.privacy.plan import ReleasePlan
from secure_fedvlp.privacy.relation import seeded_site_key
from secure_fedvlp.privacy.site_centroids import site_centroids_event
from secure_fedvlp.wrappers import anchors as anchors_wrapper

logger = logging.getLogger(__name__)

__all__ = ["release_plan", "strategy_class", "method_model", "ClientParts", "client_parts"]


def release_plan(cfg: ExperimentConfig) -> ReleasePlan:
    """What one training site releases per round: the method's plan and every wrapper's releases."""
    plan = get_method(cfg.federation.method).plan(cfg)
    if cfg.anchors.enabled:
        plan = anchors_wrapper.extend_plan(plan, cfg)
    if cfg.train.objective == "site_centroids" and cfg.privacy.enabled:
        plan = plan.with_release_once(site_centroids_event(cfg))  # the site's report centroids, once per run
    return plan


def strategy_class(cfg: ExperimentConfig) -> type[VLPStrategy]:
    """The configured method's strategy class with the configured wrappers around it."""
    cls = get_method(cfg.federation.method).strategy
    if cfg.anchors.enabled:
        cls = anchors_wrapper.anchored_strategy(cls)
    if cfg.encryption.enabled:
        from secure_fedvlp.wrappers.encryption import encrypted_strategy

        cls = encrypted_strategy(cls)
    return cls


@dataclass
class ClientParts:
    """What a site's client runtime is made of."""

    trainer: Any  # LocalTrainer, or DPTrainer around it
    encryption: Any = None  # ClientEncryption when encryption is on
    extensions: list[Any] = field(default_factory=list)
    ledger_path: Path | None = None  # the site's privacy ledger when DP is on (its head goes with every reply)


def client_parts(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    site: SiteData,
    reference_state: dict[str, np.ndarray],
    device: torch.device,
    public,
) -> ClientParts:
    """The site's trainer, encryption state and extensions, as the config asks."""
    trainer: Any = get_method(cfg.federation.method).trainer(cfg, device, public)
    trainer.bind_site(site, RunLayout(run_dir).client_dir(site.name))
    trainer.release_dir = RunLayout(run_dir).client_dir(site.name)  # site-local releases kept between rounds
    if hasattr(trainer, "site_dir"):  # methods that keep per-site state between rounds (FedSM's v_i)
        trainer.site_dir = RunLayout(run_dir).client_dir(site.name)
    if cfg.privacy.enabled and not cfg.privacy.seeded_randomness:
        trainer.site_key_path = RunLayout(run_dir).site_key(site.name)  # a secret in the site's own directory
    else:  # reproducible runs: a key anyone holding the config can derive
        trainer.set_site_key(seeded_site_key(cfg.run.seed, site.name))
    ledger = None
    path = None
    if cfg.privacy.enabled and site.role == "train":  # a held-out site releases no DP output
        from secure_fedvlp.wrappers.dpsgd import DPTrainer, client_noise_multiplier, make_ledger

        declared = cfg.require_declared_size(site.name)  # public configuration, never a count of the data
        path = RunLayout(run_dir).ledger(site.name)
        make_ledger(path, site.name, cfg.privacy, repair=True)  # create, or resume: a torn write is repaired
        z, q = client_noise_multiplier(cfg, release_plan(cfg), trainer.declared_training_size(declared))
        logger.info(
            "site %s: DP-SGD noise multiplier %.4f, sample rate %.4f (declared size %d; %d records held, "
            "site-local), budget eps=%g delta=%g",
            site.name,
            z,
            q,
            declared,
            len(site.train),
            cfg.privacy.target_epsilon,
            cfg.privacy.delta,
        )
        trainer = DPTrainer(trainer, path, site.name, z, q, cfg.privacy, declared_size=declared)
        ledger = lambda: trainer.ledger  # noqa: E731  (reopened and verified for every release)
    encryption = None
    if cfg.encryption.enabled:
        from secure_fedvlp.wrappers.encryption import ClientEncryption, encryption_settings

        state = RunLayout(run_dir).client_dir(site.name) / "encryption_state.npz"  # the site's own directory
        encryption = ClientEncryption.load(encryption_settings(cfg, run_dir), site.name, reference_state, state)
    extensions: list[Any] = []
    if encryption is not None and getattr(get_method(cfg.federation.method).strategy, "reply_payload", "") == (
        "representations"
    ):
        from secure_fedvlp.wrappers.encryption.ensemble import EnsembleKeyHolder

        extensions.append(EnsembleKeyHolder(cfg.encryption.min_contributors))
    if cfg.anchors.enabled:
        extensions.append(
            anchors_wrapper.AnchorClient(
                cfg, ledger=ledger, fixed_point_bits=encryption.fixed_point_bits if encryption is not None else None
            )
        )
    return ClientParts(trainer, encryption, extensions, path)
