"""CreamFL's numeric core (Yu et al., ICLR 2023; code FLAIR-THU/CreamFL): pure functions of tensors.

Notation: ``M`` public items, ``C`` clients contributing one modality, ``d`` the representation size.
``G^img``, ``G^txt`` (``[M, d]``) are the server model's *global* representations of the public set.

Server-side ensemble ("con_w", ``MMFL.distill.aggregation`` in the authors' code)
    For a client ``c`` with image representations ``i^c`` (``[M, d]``) its contrastive score on item
    ``j`` is the log-softmax, over every public item ``k``, of the matching pair::

        s_{c,j} = <i^c_j, G^txt_j> - log sum_k exp <i^c_j, G^txt_k>        (no temperature, as in the code)

    and the ensemble weights each client per item by the softmax of the scores over clients::

        alpha_{c,j} = exp s_{c,j} / sum_{c'} exp s_{c',j},      I_bar_j = sum_c alpha_{c,j} i^c_j

    (text symmetric, against ``G^img``).  The authors compute ``log(sum(exp(.)))`` directly, which
    overflows for large logits; here both log-sum-exps are the stable ones.  A modality no client
    contributed has no ensemble (``None``); its distillation term is left out.

The same ensemble as a ratio of two sums (for CKKS aggregation)
    ``I_bar_j = (sum_c w_{c,j} i^c_j) / (sum_c w_{c,j})`` with ``w_{c,j} = exp(s_{c,j} + log M)``: each
    client computes its own weight from its own representation and the broadcast global bank, so the
    server only adds.  ``s_{c,j} <= 0``, so ``w`` is at most ``M``; the shift ``log M`` puts a score at
    chance level (``1/M``) at weight 1.  Weights below ``floor`` are raised to it, so that a denominator
    never falls under the fixed-point grid (:func:`shifted_weights`); above the floor the ratio equals
    the softmax weighting exactly (the common factor cancels).

Client-side regularisers on the public set (``ClientTrainer.tra`` / ``MMClientTrainer.train_epoch``)
    inter-modal: ``L_inter = CE(<z_i, G^{other}_k> / tau, k = i)`` over *all* ``M`` global
    representations of the other modality; intra-modal (MOON-style): the global representation of the
    same item is the positive and the client's own previous model's representation the negative,
    ``L_intra = -log e^{<z,g>/tau} / (e^{<z,g>/tau} + e^{<z,z_old>/tau})``; ``tau = 0.5``;
    ``L_reg = weight * (L_intra + L_inter)``, ``weight = 0.5``.  A paired client averages the intra term
    over its two modalities (the code concatenates both into one cross-entropy) and sums the inter
    terms.

Server distillation
    ``kd_weight * [n_img MSE(I^srv, I_bar) + n_txt MSE(T^srv, T_bar)]`` where ``n_img`` counts the client
    types that contribute images (image-only and paired: the code adds the term once per type present).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "contrastive_scores",
    "ensemble_weights",
    "ensemble",
    "shifted_weights",
    "ratio_ensemble",
    "inter_modal_loss",
    "intra_modal_loss",
    "regulariser_terms",
    "distillation_terms",
    "modality_type_counts",
]


def contrastive_scores(reps: torch.Tensor, global_other: torch.Tensor) -> torch.Tensor:
    """``s_{..., j} = log softmax_k <reps_j, G_k>`` at ``k = j``.

    ``reps``: ``[..., M, d]``; ``global_other``: ``[M, d]``.
    """
    if reps.shape[-2:] != global_other.shape:
        raise ValueError(
            f"representations {tuple(reps.shape)} do not match the global bank {tuple(global_other.shape)} "
            "(one row per public item, same size)."
        )
    logits = reps.double() @ global_other.double().T  # [..., M, M]
    diag = torch.diagonal(logits, dim1=-2, dim2=-1)
    return diag - torch.logsumexp(logits, dim=-1)


def ensemble_weights(scores: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha_{c,j} = softmax_c(s_{c,j})`` over the clients ``present`` for item ``j`` (``[C, M]``).

    Items no client covers get all-zero weights; the others sum to 1 over clients.
    """
    if present is None:
        present = torch.ones_like(scores, dtype=torch.bool)
    masked = scores.double().masked_fill(~present, float("-inf"))
    covered = present.any(dim=0)
    lse = torch.logsumexp(masked, dim=0)
    alpha = torch.exp(masked - torch.where(covered, lse, torch.zeros_like(lse)))
    return torch.where(covered[None, :], alpha, torch.zeros_like(alpha))


def ensemble(
    reps: torch.Tensor, global_other: torch.Tensor, present: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The con_w ensemble of ``reps`` (``[C, M, d]``; ``C = 0``: the modality is absent) and its weights.

    Returns ``(ensemble [M, d] float64, alpha [C, M])``, or ``(None, None)`` when no client contributed.
    """
    if reps.ndim != 3:
        raise ValueError(f"representations must be [clients, items, dim]; found {tuple(reps.shape)}.")
    if reps.shape[0] == 0:
        return None, None
    alpha = ensemble_weights(contrastive_scores(reps, global_other), present)
    return (alpha[..., None] * reps.double()).sum(dim=0), alpha


def shifted_weights(scores: torch.Tensor, num_items: int, floor: float) -> torch.Tensor:
    """``w = max(exp(s + log M), floor)``: the ratio-of-sums weights of :func:`ratio_ensemble` (see the module doc)."""
    if not floor > 0:
        raise ValueError(f"the weight floor must be > 0; found {floor!r}.")
    return torch.exp(scores.double() + math.log(int(num_items))).clamp_min(float(floor))


def ratio_ensemble(weighted_sum: torch.Tensor, weight_sum: torch.Tensor) -> torch.Tensor:
    """``(sum_c w_c r_c) / (sum_c w_c)`` per item: ``[M, d]`` over ``[M]`` (what a key holder computes)."""
    if weighted_sum.shape[:-1] != weight_sum.shape:
        raise ValueError(f"sums {tuple(weighted_sum.shape)} and weights {tuple(weight_sum.shape)} do not match.")
    if not bool((weight_sum > 0).all()):
        raise ValueError("every item's weight sum must be positive (an item no client covered has no ensemble).")
    return weighted_sum.double() / weight_sum.double()[..., None]


def inter_modal_loss(
    z: torch.Tensor, global_other: torch.Tensor, index: torch.Tensor, tau: float, reduction: str = "mean"
) -> torch.Tensor:
    """``CE(<z_b, G^{other}_k> / tau, k = index_b)`` over every public item ``k``."""
    return F.cross_entropy(z @ global_other.T / tau, index, reduction=reduction)


def intra_modal_loss(
    z: torch.Tensor, global_same: torch.Tensor, old: torch.Tensor, tau: float, reduction: str = "mean"
) -> torch.Tensor:
    """MOON-style: ``-log e^{<z,g>/tau} / (e^{<z,g>/tau} + e^{<z,z_old>/tau})`` per row."""
    logits = torch.stack([(z * global_same).sum(-1), (z * old).sum(-1)], dim=1) / tau
    target = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, target, reduction=reduction)


def regulariser_terms(
    z: Mapping[str, torch.Tensor],
    old: Mapping[str, torch.Tensor],
    global_reps: Mapping[str, torch.Tensor],
    index: torch.Tensor,
    *,
    tau: float = 0.5,
    weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Inter- and intra-modal terms of one public batch, for the modalities in ``z`` (``"image"``, ``"text"``).

    ``z[m]`` / ``old[m]``: the current and previous client model's representations of the batch
    (``[B, d]``); ``global_reps[m]``: the global bank ``[M, d]``; ``index``: the batch's public items.
    Returns ``inter`` (summed over modalities), ``intra`` (averaged) and ``loss = weight * (inter + intra)``.
    """
    other = {"image": "text", "text": "image"}
    mods = [m for m in ("image", "text") if m in z]
    if not mods:
        raise ValueError("the regulariser needs at least one modality.")
    inter = sum(inter_modal_loss(z[m], global_reps[other[m]], index, tau) for m in mods)
    intra = sum(intra_modal_loss(z[m], global_reps[m][index], old[m], tau) for m in mods) / len(mods)
    return {"inter": inter, "intra": intra, "loss": weight * (inter + intra)}


def distillation_terms(
    out: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor | None],
    type_counts: Mapping[str, int],
    kd_weight: float = 0.3,
) -> dict[str, torch.Tensor]:
    """``kd_weight * n_m * MSE(out[m], targets[m])`` per modality with a target; ``loss`` is their sum."""
    terms: dict[str, torch.Tensor] = {}
    for m in ("image", "text"):
        t = targets.get(m)
        n = int(type_counts.get(m, 0))
        if t is None or n == 0 or m not in out:
            continue
        terms[f"kd_{m}"] = kd_weight * n * F.mse_loss(out[m], t.to(out[m].dtype))
    if not terms:
        raise ValueError("nothing to distil: no modality has both an ensemble and a contributing client type.")
    terms["loss"] = sum(terms.values())
    return terms


def modality_type_counts(modalities: Sequence[str]) -> dict[str, int]:
    """How many client *types* contribute each modality: image-only and paired add to ``image``, etc."""
    kinds = set(modalities)
    return {
        "image": int("image" in kinds) + int("paired" in kinds),
        "text": int("text" in kinds) + int("paired" in kinds),
    }
