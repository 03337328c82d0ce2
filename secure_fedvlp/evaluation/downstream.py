"""Downstream evaluation of a pre-trained image encoder, at one site, on that site's own records.

What medical VLP papers report (MGCA and the work built on it):

* **Linear probe**: the image encoder is frozen; one logistic-regression head per finding
  (multi-label, one-vs-rest) is fitted on a fraction of the site's training split (1 %, 10 %,
  100 %; each fraction drawn afresh per sub-sampling seed) and scored on its test split by macro
  AUROC over the findings that have both classes there.  A finding with a single class in the
  sub-sample gets a constant score (AUROC 0.5): with 1 % of a small site that is common, and it is
  what a probe with no positive example can do.
* **Segmentation**: the encoder is frozen; a U-Net-style decoder
  (:class:`~secure_fedvlp.models.segmentation.UNetDecoder`) is trained on the site's training masks
  with MONAI's Dice loss and scored by per-image Dice at threshold 0.5 on its test split (an empty
  prediction on an empty mask counts 1), averaged over images; ``dice_lesion`` averages the images
  whose mask is not empty.  One decoder per seed (initialisation and batch order).

Everything here runs at the site that holds the records: it takes the site's data and a model and
returns metrics.  Which metrics leave the site is the caller's business
(:mod:`secure_fedvlp.evaluation.downstream_run`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from secure_fedvlp.data.types import FINDINGS, SiteData, VLPDataset
from secure_fedvlp.evaluation.metrics import binary_auroc
from secure_fedvlp.models.segmentation import (
    UNetDecoder,
    dice_loss,
    encoder_features,
    feature_channels,
    per_image_dice,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "POOLED_TASK",
    "ProbeSettings",
    "label_fraction_indices",
    "pooled_features",
    "linear_probe",
    "train_decoder",
    "evaluate_decoder",
    "segmentation_eval",
    "site_downstream",
]

TASKS = ("linear", "segmentation")
#: A reference, not a site-local task: one decoder trained on every training site's records pooled at one party
#: (:func:`secure_fedvlp.evaluation.downstream_run.evaluate_run`), scored at each site.
POOLED_TASK = "segmentation_pooled"


@dataclass(frozen=True)
class ProbeSettings:
    """How the downstream tasks run (``eval.downstream_*`` in the config)."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    seeds: int = 3
    seg_steps: int = 150
    seg_batch_size: int = 16
    seg_lr: float = 3e-3
    seg_width: int = 16
    batch_size: int = 64

    def __post_init__(self) -> None:
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if not self.fractions or bad:
            raise ValueError(f"label fractions must be in (0, 1]. Found {list(self.fractions)}.")
        if self.seeds < 1:
            raise ValueError(f"the number of seeds must be >= 1. Found {self.seeds}.")
        if self.seg_steps < 1 or self.seg_batch_size < 1 or not self.seg_lr > 0:
            raise ValueError(
                f"segmentation steps, batch size and learning rate must be positive. Found "
                f"{self.seg_steps}, {self.seg_batch_size}, {self.seg_lr}."
            )


def label_fraction_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded sub-sample of ``max(1, round(fraction * n))`` of ``range(n)``, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1]. Found {fraction}.")
    if fraction == 1.0:
        return np.arange(n)
    k = min(n, max(1, int(round(fraction * n))))
    rng = np.random.default_rng([int(seed), 7_919, int(round(fraction * 1e6))])
    return np.sort(rng.choice(n, size=k, replace=False))


def pooled_features(image_encoder: torch.nn.Module, dataset: VLPDataset, batch_size: int, device) -> np.ndarray:
    """The frozen encoder's pooled feature vector of every image of ``dataset`` ``[N, C]`` (float64)."""
    maps = encoder_features(image_encoder, dataset.images, batch_size, device)
    return maps[-1].mean(dim=(2, 3)).double().numpy() if maps else np.zeros((0, 0))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    fraction: float,
    seed: int,
) -> dict[str, float]:
    """Fit one logistic regression per finding on a ``fraction`` of the training features; test macro AUROC.

    Returns ``auroc_macro`` (NaN when no finding has both classes in the test split),
    ``auroc/<finding>``, ``num_train`` (records used) and ``constant_findings`` (findings with a single
    class in the sub-sample, scored as a constant).
    """
    idx = label_fraction_indices(len(train_x), fraction, seed)
    x, y = train_x[idx], np.asarray(train_y)[idx] > 0.5
    scaler = StandardScaler().fit(x)
    xs, ts = scaler.transform(x), scaler.transform(test_x)
    out: dict[str, float] = {"num_train": float(len(idx))}
    aurocs, constant = [], 0
    for f, name in enumerate(FINDINGS):
        if y[:, f].all() or not y[:, f].any():
            scores = np.zeros(len(test_x))
            constant += 1
        else:
            clf = LogisticRegression(C=1.0, max_iter=2000)
            clf.fit(xs, y[:, f])
            scores = clf.decision_function(ts)
        a = binary_auroc(np.asarray(test_y)[:, f], scores)
        if not math.isnan(a):
            out[f"auroc/{name}"] = a
            aurocs.append(a)
    out["constant_findings"] = float(constant)
    out["auroc_macro"] = float(np.mean(aurocs)) if aurocs else float("nan")
    return out


def _has_masks(ds: VLPDataset) -> bool:
    return ds.masks is not None and len(ds) > 0


def train_decoder(
    image_encoder: torch.nn.Module,
    dataset: VLPDataset,
    *,
    settings: ProbeSettings,
    seed: int,
    device: torch.device | str = "cpu",
    features: list[torch.Tensor] | None = None,
) -> UNetDecoder:
    """Train a :class:`UNetDecoder` on ``dataset``'s masks over the frozen ``image_encoder`` (plain Adam, Dice loss)."""
    if not _has_masks(dataset):
        raise ValueError(f"site {dataset.site!r}: segmentation needs lesion masks; this split has none.")
    device = torch.device(device)
    feats = features if features is not None else encoder_features(image_encoder, dataset.images, 64, device)
    images = torch.from_numpy(dataset.images).unsqueeze(1)
    masks = torch.from_numpy(dataset.masks.astype(np.float32)).unsqueeze(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        decoder = UNetDecoder(feature_channels(image_encoder), width=settings.seg_width).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=settings.seg_lr)
    loss_fn = dice_loss()
    gen = torch.Generator().manual_seed(int(seed) + 1)
    n, bs = len(dataset), min(settings.seg_batch_size, len(dataset))
    decoder.train()
    for _ in range(settings.seg_steps):
        idx = torch.randperm(n, generator=gen)[:bs]
        logits = decoder(images[idx].to(device), [f[idx].to(device) for f in feats])
        loss = loss_fn(logits, masks[idx].to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    decoder.eval()
    return decoder


@torch.no_grad()
def evaluate_decoder(
    image_encoder: torch.nn.Module,
    decoder: torch.nn.Module,
    dataset: VLPDataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    features: list[torch.Tensor] | None = None,
) -> np.ndarray:
    """Per-image Dice ``[N]`` of ``decoder`` on ``dataset`` (threshold 0.5; empty on empty = 1)."""
    if not _has_masks(dataset):
        raise ValueError(f"site {dataset.site!r}: segmentation needs lesion masks; this split has none.")
    device = torch.device(device)
    feats = features if features is not None else encoder_features(image_encoder, dataset.images, batch_size, device)
    images = torch.from_numpy(dataset.images).unsqueeze(1)
    masks = torch.from_numpy(dataset.masks.astype(np.float32)).unsqueeze(1)
    was = decoder.training
    decoder.eval()
    out = []
    try:
        for i in range(0, len(dataset), batch_size):
            sl = slice(i, i + batch_size)
            logits = decoder(images[sl].to(device), [f[sl].to(device) for f in feats])
            out.append(per_image_dice(logits.cpu(), masks[sl]))
    finally:
        decoder.train(was)
    return torch.cat(out).numpy().astype(np.float64)


def dice_summary(dice: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Mean per-image Dice, and its mean over images with a non-empty mask (``dice_lesion``)."""
    lesion = masks.reshape(len(masks), -1).any(1)
    return {
        "dice": float(dice.mean()) if len(dice) else float("nan"),
        "dice_lesion": float(dice[lesion].mean()) if lesion.any() else float("nan"),
        "num_test": float(len(dice)),
    }


def segmentation_eval(
    image_encoder: torch.nn.Module, site: SiteData, *, settings: ProbeSettings, seed: int, device="cpu"
) -> dict[str, float]:
    """Train a decoder on the site's training split (seed ``seed``) and score it on its test split."""
    dev = torch.device(device)
    tr = encoder_features(image_encoder, site.train.images, settings.batch_size, dev)
    te = encoder_features(image_encoder, site.test.images, settings.batch_size, dev)
    dec = train_decoder(image_encoder, site.train, settings=settings, seed=seed, device=dev, features=tr)
    dice = evaluate_decoder(image_encoder, dec, site.test, batch_size=settings.batch_size, device=dev, features=te)
    return dice_summary(dice, site.test.masks)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return {"mean": float("nan"), "std": float("nan"), "n": 0.0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": float(len(v))}


def site_downstream(
    model: torch.nn.Module,
    site: SiteData,
    *,
    tasks: Sequence[str],
    settings: ProbeSettings,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Every downstream metric of ``model``'s frozen image encoder on ``site``'s own records.

    A flat dict of floats (what may leave the site): ``linear@<fraction>/auroc_macro`` with
    ``/std`` over seeds and ``/num_train``; ``segmentation/dice``, ``/dice_lesion`` with ``/std``;
    ``seconds/<task>``.  A site without masks has no segmentation keys; one with fewer than two
    training or test records returns only ``skipped``.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown downstream task(s) {unknown}; known: {', '.join(TASKS)}.")
    dev = torch.device(device)
    enc = model.image_encoder
    out: dict[str, float] = {}
    if len(site.train) < 2 or len(site.test) < 2:  # e.g. a held-out site without training records
        logger.warning(
            "site %s: downstream evaluation needs >= 2 training and test records (has %d / %d); skipped",
            site.name,
            len(site.train),
            len(site.test),
        )
        return {"skipped": 1.0}
    if "linear" in tasks:
        t0 = time.perf_counter()
        trx = pooled_features(enc, site.train, settings.batch_size, dev)
        tex = pooled_features(enc, site.test, settings.batch_size, dev)
        for frac in settings.fractions:
            # with every label the sub-sample is the whole split and the fit deterministic: one run
            seeds = range(settings.seeds if frac < 1.0 else 1)
            runs = [linear_probe(trx, site.train.labels, tex, site.test.labels, fraction=frac, seed=s) for s in seeds]
            ms = _mean_std([r["auroc_macro"] for r in runs])
            key = f"linear@{frac:g}"
            out[f"{key}/auroc_macro"] = ms["mean"]
            out[f"{key}/auroc_macro/std"] = ms["std"]
            out[f"{key}/num_train"] = runs[0]["num_train"]
        out["seconds/linear"] = time.perf_counter() - t0
    if "segmentation" in tasks and _has_masks(site.train) and _has_masks(site.test):
        t0 = time.perf_counter()
        runs = [segmentation_eval(enc, site, settings=settings, seed=s, device=dev) for s in range(settings.seeds)]
        for k in ("dice", "dice_lesion"):
            ms = _mean_std([r[k] for r in runs])
            out[f"segmentation/{k}"] = ms["mean"]
            out[f"segmentation/{k}/std"] = ms["std"]
        out["seconds/segmentation"] = time.perf_counter() - t0
    return out
