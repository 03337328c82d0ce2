"""The centralized reference: the same model and objective, trained on every training site's data pooled at one party.

Not a federated method but the yardstick for federated ones (FedSM claims to close the gap to it;
FedDRA to improve downstream transfer over FedAvg): ``federation.method = "centralized"`` runs in the
same harness so that everything else (model, objective, optimiser, steps per round, rounds,
federated evaluation of each site's test split, downstream evaluation) is identical.

* Server (:class:`CentralizedStrategy`): each round sends the train message to one party only, the
  first training site by name, which plays the data centre; its model is adopted as it is.
* Client (:class:`CentralizedTrainer`): its training records are the union of the training splits
  of every training site of the federation (the held-out site's excluded), so ``train.local_steps``
  steps per round draw mini-batches from the pooled data.  Pooling raw records is exactly what
  federated learning avoids: the reference has no privacy story, and DP-SGD and CKKS aggregation
  are refused for it (a run that asks for them fails at start with a one-line reason).

Step budget: one party takes ``train.local_steps`` steps per round, the same number of optimiser
steps each site takes under FedAvg (FedAvg averages K such trajectories; the reference takes one on
K times the data).
"""

from __future__ import annotations

import numpy as np

from secure_fedvlp.build import build_federation
from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.data.types import VLPDataset
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.methods.registry import register_method
from secure_fedvlp.methods.strategy import RoundRecorder, VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer

__all__ = ["CentralizedStrategy", "CentralizedTrainer", "pooled_training_data", "refuse_private_modes"]


def refuse_private_modes(cfg: ExperimentConfig, what: str) -> None:
    """A :class:`ConfigError` if ``cfg`` turns on DP-SGD or encryption for a pooled-data reference."""
    on = [k for k, v in (("privacy.enabled", cfg.privacy.enabled), ("encryption.enabled", cfg.encryption.enabled)) if v]
    if on:
        raise ConfigError(
            f"'federation.method' = {cfg.federation.method!r} ({what}) pools every site's raw records at one party; "
            f"{' and '.join(on)} = true protects a federation, not that. Turn it off for this reference."
        )


def pooled_training_data(cfg: ExperimentConfig) -> VLPDataset:
    """The training splits of every training site of ``cfg``'s federation, concatenated (site by site)."""
    sites = build_federation(cfg).sites
    parts = [s.train for s in sites]
    masks = None if any(p.masks is None for p in parts) else np.concatenate([p.masks for p in parts])
    return VLPDataset(
        "pooled",
        np.concatenate([p.images for p in parts]),
        sum((list(p.reports) for p in parts), []),
        np.concatenate([p.labels for p in parts]),
        masks,
        sum((list(p.record_ids) for p in parts), []),
        np.concatenate([p.has_image for p in parts]),
        np.concatenate([p.has_text for p in parts]),
    )


class CentralizedTrainer(LocalTrainer):
    """The FedAvg trainer whose training records are the pooled training splits of every site."""

    name = "centralized"

    def __init__(self, cfg: ExperimentConfig, device, public=None) -> None:
        refuse_private_modes(cfg, "the centralized reference")
        super().__init__(cfg, device, public)
        self._pooled: VLPDataset | None = None

    def training_subset(self, dataset):
        if self._pooled is None:
            self._pooled = pooled_training_data(self.cfg)
        return super().training_subset(self._pooled)


class CentralizedStrategy(VLPStrategy):
    """Trains at one party (the first training site by name); every site still evaluates."""

    method_name = "centralized"
    #: DP-SGD and CKKS protect a federation; the pooled reference refuses them.
    composes_with_privacy = False

    def __init__(self, cfg: ExperimentConfig, recorder: RoundRecorder | None = None) -> None:
        refuse_private_modes(cfg, "the centralized reference")
        super().__init__(cfg, recorder)

    def sample_train_nodes(self, server_round: int) -> list[int]:
        nodes = self.train_nodes()
        return sorted(nodes, key=lambda nid: self.sites[nid].site)[:1]


register_method(
    "centralized",
    CentralizedStrategy,
    CentralizedTrainer,
    "Reference: one party trains on every training site's data pooled (no federation, no privacy).",
)
