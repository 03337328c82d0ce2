"""FedProx (Li et al., 2020): FedAvg plus a proximal term (mu/2)||w - w_global||^2 at each client.

The server side is FedAvg's; only the trainer differs (one overridden hook).  The
proximal term is per-sample decomposable (it does not depend on the data), so it
composes with DP-SGD unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secure_fedvlp.methods.registry import register_method
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask

__all__ = ["FedProxTrainer"]


class FedProxTrainer(LocalTrainer):
    """Adds ``prox = mu/2 * sum ||w - w_global||^2`` over the parameters being trained."""

    name = "fedprox"

    def begin(
        self, model: nn.Module, task: TrainTask, global_state: Mapping[str, np.ndarray], dataset=None
    ) -> dict[str, Any]:
        state = super().begin(model, task, global_state, dataset=dataset)
        params = dict(model.named_parameters())
        state["global_params"] = {
            n: torch.as_tensor(np.asarray(v), device=params[n].device, dtype=params[n].dtype)
            for n, v in global_state.items()
            if params[n].requires_grad
        }
        return state

    def regularizer(self, model: nn.Module, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        mu = self.cfg.federation.proximal_mu
        if mu == 0:
            return {}
        params = dict(model.named_parameters())
        prox = sum(((params[n] - g) ** 2).sum() for n, g in state["global_params"].items())
        return {"proximal": 0.5 * mu * prox}


register_method("fedprox", VLPStrategy, FedProxTrainer, "FedAvg with a proximal term (mu) in the local loss.")
