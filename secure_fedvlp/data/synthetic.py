"""Embedded synthetic federation: chest-radiograph-like images with paired reports.

Procedural and deterministic by seed (numpy ``Generator`` per site and split; never the
global RNG).  Each image is a chest-like field: body, two dark lung fields with rib
markings, spine/mediastinum, diaphragm domes and a heart silhouette.  Findings alter the
anatomy visibly and write the lesion mask:

* cardiomegaly: enlarged heart silhouette (cardiothoracic ratio > 0.5);
* pleural effusion: bright fluid with a meniscus at one lung base;
* consolidation: a bright fluffy patch inside a lung;
* pneumothorax: a dark apical region with no lung markings bounded by a thin pleural line;
* nodule: one or two small round bright spots.

Sites differ the way hospitals do: scanner style (contrast, gamma, noise, blur, native
resolution, offset), finding prevalence (Dirichlet skew around a base prevalence),
reporting style (terse vs narrative templates, a site vocabulary of synonyms, negation
habits), optionally missing reports at one site, and what each site holds
(``SyntheticSpec.site_modalities``: an image-only site's reports and a text-only site's images are
dropped, in every split, and its records say so in ``has_text`` / ``has_image``).  The held-out site has its own style;
the public reference set uses a neutral style and a different seed.

The **public pre-training corpus** (``SyntheticSpec.pretrain_size`` records,
:func:`generate_pretrain_corpus`) is the public start's data, built to differ from every site so
that the sites' private records still carry something it lacks: clean images (no scanner
noise, blur or tone shift), structured "Findings: ... Impression: ..." reports written with a
vocabulary of its own (:data:`PRETRAIN_TERMS`, no phrase shared with the sites'), and
prevalences that under-represent cardiomegaly and nodule (2 % each, :data:`PRETRAIN_PREVALENCE`;
the demo's training sites hold about a third of their records with each).  It is generated
from its own random streams and cached in its own file, so adding it leaves the sites' data
byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from secure_fedvlp.data.spec import SyntheticSpec
from secure_fedvlp.data.types import FINDINGS, Federation, SiteData, VLPDataset
from secure_fedvlp.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticSpec",
    "generate_federation",
    "generate_pretrain_corpus",
    "pretrain_corpus_key",
    "site_style",
    "pretrain_style",
    "SYNONYMS",
    "PRETRAIN_TERMS",
    "PRETRAIN_PREVALENCE",
    "GENERATOR_VERSION",
    "PRETRAIN_VERSION",
]

GENERATOR_VERSION = 2
LESIONS = FINDINGS[1:]
BASE_PREVALENCE = np.array([0.25, 0.22, 0.2, 0.12, 0.18])  # cardiomegaly, effusion, consolidation, ptx, nodule


# ----------------------------------------------------------------------------- reports

#: Synonyms per finding; each site's vocabulary picks a subset and a preferred order.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (
        "cardiomegaly",
        "enlarged cardiac silhouette",
        "the heart is enlarged",
        "increased cardiothoracic ratio",
    ),
    "pleural_effusion": (
        "{side} pleural effusion",
        "fluid in the {side} pleural space",
        "blunting of the {side} costophrenic angle",
        "{side} effusion",
    ),
    "consolidation": (
        "{side} consolidation",
        "airspace opacity in the {side} lung",
        "{side} lung consolidation",
        "patchy {side} airspace disease",
    ),
    "pneumothorax": (
        "{side} pneumothorax",
        "{side} apical pneumothorax",
        "collapsed {side} lung apex",
        "{side} pleural air",
    ),
    "nodule": (
        "{side} pulmonary nodule",
        "nodular opacity in the {side} lung",
        "{side} lung nodule",
        "rounded density in the {side} lung",
    ),
}
NEGATIONS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("heart size is normal", "no cardiomegaly", "normal cardiac silhouette"),
    "pleural_effusion": ("no pleural effusion", "no effusion", "costophrenic angles are sharp"),
    "consolidation": ("no focal consolidation", "no airspace opacity", "no consolidation"),
    "pneumothorax": ("no pneumothorax", "no evidence of pneumothorax", "no pleural air"),
    "nodule": ("no pulmonary nodules", "no nodule", "no focal nodular opacity"),
}
NORMAL: tuple[str, ...] = (
    "no acute cardiopulmonary abnormality",
    "the lungs are clear",
    "normal chest radiograph",
    "no acute findings",
)
SIZES = ("small", "moderate", "large")

# ----------------------------------------------------------------------------- the public pre-training corpus

#: Version of the public pre-training corpus (its cache key changes with it).
PRETRAIN_VERSION = 1
#: Its prevalences (cardiomegaly, effusion, consolidation, pneumothorax, nodule): the sites' base prevalence
#: (:data:`BASE_PREVALENCE`) except cardiomegaly and nodule, which it under-represents (2 % each).
PRETRAIN_PREVALENCE = np.array([0.02, 0.22, 0.2, 0.12, 0.02])
#: Its positive phrases per finding: a vocabulary of its own, no phrase shared with :data:`SYNONYMS`.
PRETRAIN_TERMS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiac enlargement", "heart size is increased", "enlargement of the heart shadow"),
    "pleural_effusion": ("{side} pleural fluid collection", "layering {side} pleural fluid", "{side} hydrothorax"),
    "consolidation": ("{side} lobar opacification", "dense {side} parenchymal opacity", "{side} alveolar filling"),
    "pneumothorax": ("{side} pleural gas collection", "{side} visceral pleural line", "{side} collapsed lung"),
    "nodule": ("{side} coin lesion", "{side} solitary rounded lesion", "{side} small round lesion"),
}
#: Its negations per finding (none shared with :data:`NEGATIONS`).
PRETRAIN_NEGATIONS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiac size within normal limits", "heart shadow not enlarged"),
    "pleural_effusion": ("no pleural fluid", "pleural spaces are clear"),
    "consolidation": ("no parenchymal opacification", "lung parenchyma is clear"),
    "pneumothorax": ("no pleural gas", "lung edges are normally positioned"),
    "nodule": ("no coin lesion", "no rounded lesion seen"),
}
#: Its impression when nothing is found (none shared with :data:`NORMAL`).
PRETRAIN_NORMAL: tuple[str, ...] = ("unremarkable chest", "heart and lungs within normal limits")
_PRETRAIN_CHUNK = 512  # records rendered at a time (bounded memory; each chunk has its own random stream)


def _style(spec: SyntheticSpec, index: int, kind: str) -> dict[str, Any]:
    """Scanner and reporting style of a site (``kind``: train, heldout or public)."""
    rng = np.random.default_rng([spec.seed, 9_001, index, {"train": 0, "heldout": 1, "public": 2}[kind]])
    if kind == "public":
        return {
            "contrast": 1.0,
            "gamma": 1.0,
            "noise": 0.02,
            "blur": 0.5,
            "native": max(spec.image_size, 64),
            "offset": 0.0,
            "narrative": 0.5,
            "negation_rate": 0.5,
            "vocab": [0, 1, 2, 3],
            "with_size": 0.5,
            "period": True,
        }
    wide = 1.5 if kind == "heldout" else 1.0
    return {
        "contrast": float(rng.uniform(1 - 0.35 * wide, 1 + 0.35 * wide)),
        "gamma": float(np.exp(rng.uniform(-0.4, 0.4) * wide)),
        "noise": float(rng.uniform(0.005, 0.06 * wide)),
        "blur": float(rng.uniform(0.0, 1.4 * wide)),
        "native": int(rng.choice([32, 48, 64, 96])),
        "offset": float(rng.uniform(-0.08, 0.08) * wide),
        "narrative": float(rng.uniform(0.0, 1.0)),
        "negation_rate": float(rng.uniform(0.1, 0.9)),
        "vocab": [int(v) for v in rng.permutation(4)[: int(rng.integers(1, 3))]],
        "with_size": float(rng.uniform(0.0, 1.0)),
        "period": bool(rng.random() < 0.5),
    }


def site_style(spec: SyntheticSpec, site_index: int) -> dict[str, Any]:
    """The style actually used for training site ``site_index`` (``num_sites`` = the held-out site)."""
    return _style(spec, site_index, "heldout" if site_index == spec.num_sites else "train")


def _prevalence(spec: SyntheticSpec, index: int, kind: str) -> np.ndarray:
    if kind == "public":
        return BASE_PREVALENCE.copy()
    rng = np.random.default_rng([spec.seed, 4_242, index, 1 if kind == "heldout" else 0])
    w = rng.dirichlet(np.full(len(LESIONS), spec.dirichlet_alpha))
    return np.clip(BASE_PREVALENCE * len(LESIONS) * w, 0.02, 0.75)


def _report(
    labels: np.ndarray, sides: dict[str, str], sizes: dict[str, str], style: dict[str, Any], rng: np.random.Generator
) -> str:
    vocab = style["vocab"]
    pos, neg = [], []
    for k, f in enumerate(LESIONS):
        if labels[k + 1]:
            phrase = SYNONYMS[f][vocab[int(rng.integers(len(vocab)))]].format(side=sides.get(f, "right"))
            if f in sizes and rng.random() < style["with_size"]:
                phrase = f"{sizes[f]} {phrase}"
            pos.append(phrase)
        elif rng.random() < style["negation_rate"]:
            neg.append(NEGATIONS[f][int(rng.integers(len(NEGATIONS[f])))])
    if not pos:
        pos = [NORMAL[vocab[0] % len(NORMAL)]]
    if rng.random() < style["narrative"]:
        sentences = [f"There is {p}" if not p.startswith(("the ", "no ", "normal")) else p for p in pos]
        sentences = [s[0].upper() + s[1:] for s in sentences + neg]
        text = ". ".join(sentences) + "."
        if rng.random() < 0.5:
            text = "Frontal view of the chest. " + text
    else:
        parts = [p[0].upper() + p[1:] for p in pos + neg]
        text = ". ".join(parts) + ("." if style["period"] else "")
    return text


def pretrain_style(spec: SyntheticSpec) -> dict[str, Any]:
    """The public pre-training corpus' scanner style: clean and neutral (no noise, blur, tone or offset)."""
    return {"contrast": 1.0, "gamma": 1.0, "noise": 0.0, "blur": 0.0, "native": max(spec.image_size, 64), "offset": 0.0}


def _pretrain_report(labels: np.ndarray, sides: dict[str, str], sizes: dict[str, str], rng: np.random.Generator) -> str:
    """A structured public report: ``Findings: <clauses>. Impression: <positives or a normal phrase>.``"""
    pos, neg = [], []
    for k, f in enumerate(LESIONS):
        if labels[k + 1]:
            terms = PRETRAIN_TERMS[f]
            phrase = terms[int(rng.integers(len(terms)))].format(side=sides.get(f, "right"))
            if f in sizes and rng.random() < 0.5:
                phrase = f"{sizes[f]} {phrase}"
            pos.append(phrase)
        elif rng.random() < 0.6:
            negs = PRETRAIN_NEGATIONS[f]
            neg.append(negs[int(rng.integers(len(negs)))])
    impression = "; ".join(pos) if pos else PRETRAIN_NORMAL[int(rng.integers(len(PRETRAIN_NORMAL)))]
    findings = "; ".join(pos + neg) or "no abnormality"
    return f"Findings: {findings}. Impression: {impression}."


# ----------------------------------------------------------------------------- images


def _render(
    labels: np.ndarray, style: dict[str, Any], out_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]], list[dict[str, str]]]:
    """Render ``len(labels)`` images at the site's native resolution, styled and resized."""
    n, res = labels.shape[0], int(style["native"])
    lin = np.linspace(-1.0, 1.0, res, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    yy, xx = yy[None], xx[None]

    def col(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32)[:, None, None]

    def ellipse(cx, cy, rx, ry):
        return ((xx - col(cx)) / col(rx)) ** 2 + ((yy - col(cy)) / col(ry)) ** 2 <= 1.0

    img = np.full((n, res, res), 0.08, np.float32)
    body = ellipse(np.zeros(n), np.full(n, 0.05), rng.uniform(0.85, 0.95, n), np.full(n, 1.05))
    img[body] = 0.55
    lung_rx, lung_ry = rng.uniform(0.26, 0.32, n), rng.uniform(0.5, 0.6, n)
    lungs = []
    for sgn in (-1.0, 1.0):
        lung = ellipse(sgn * rng.uniform(0.36, 0.42, n), rng.uniform(-0.12, -0.02, n), lung_rx, lung_ry)
        lung &= yy < col(rng.uniform(0.42, 0.5, n)) - 0.12 * (xx * sgn) ** 2  # diaphragm dome
        lungs.append(lung)
    right_lung, left_lung = lungs  # radiological convention: patient's right on image left
    lung_any = right_lung | left_lung
    img[lung_any] = 0.16
    ribs = (np.sin(yy * col(rng.uniform(15, 19, n)) + 3.0 * xx**2) > 0.72) & lung_any
    img[ribs] += 0.07
    # lung markings: vessel-like texture, denser towards the hila (absent where a pneumothorax is drawn)
    texture = gaussian_filter(rng.normal(size=(n, res, res)).astype(np.float32), sigma=(0, res / 40, res / 40))
    texture /= texture.std() + 1e-6
    hilum = np.exp(-((np.abs(xx) - 0.22) ** 2 + (yy + 0.02) ** 2) / 0.08)
    img += np.where(lung_any, (0.025 + 0.05 * hilum) * np.maximum(texture, 0.0), 0.0)
    spine = (np.abs(xx) < 0.07) & body
    img[spine] = 0.7
    masks = np.zeros((n, res, res), bool)
    cardio = labels[:, 1] > 0
    heart_rx = np.where(cardio, rng.uniform(0.36, 0.44, n), rng.uniform(0.2, 0.25, n))
    heart = ellipse(rng.uniform(0.06, 0.12, n), rng.uniform(0.2, 0.28, n), heart_rx, heart_rx * 0.75)
    img[heart & body] = 0.62
    masks |= heart & cardio[:, None, None]

    sides: list[dict[str, str]] = [{} for _ in range(n)]
    sizes: list[dict[str, str]] = [{} for _ in range(n)]
    for i in range(n):
        for k, f in enumerate(LESIONS):
            if labels[i, k + 1] and f != "cardiomegaly":
                sides[i][f] = "right" if rng.random() < 0.5 else "left"
                sizes[i][f] = SIZES[int(rng.integers(3))]
    side_is_left = {f: np.array([s.get(f) == "left" for s in sides]) for f in LESIONS}
    size_scale = {
        f: np.array([1.0 + 0.45 * SIZES.index(s.get(f, "small")) for s in sizes], np.float32) for f in LESIONS
    }

    def which_lung(f):
        return np.where(side_is_left[f][:, None, None], left_lung, right_lung)

    # pleural effusion: fluid at the lung base with a meniscus rising laterally
    eff = labels[:, 2] > 0
    lung = which_lung("pleural_effusion")
    cx = np.where(side_is_left["pleural_effusion"], 0.39, -0.39)
    level = col(0.42 - 0.12 * size_scale["pleural_effusion"]) - 0.35 * np.abs(xx - col(cx))
    fluid = lung & (yy > level) & eff[:, None, None]
    img[fluid] = 0.58
    masks |= fluid
    # consolidation: fluffy bright blob inside a lung
    cons = labels[:, 3] > 0
    lung = which_lung("consolidation")
    ccx = np.where(side_is_left["consolidation"], 0.39, -0.39) + rng.uniform(-0.08, 0.08, n)
    ccy = rng.uniform(-0.3, 0.2, n)
    r2 = (xx - col(ccx)) ** 2 + (yy - col(ccy)) ** 2
    sig = col(0.09 * size_scale["consolidation"])
    blob = np.exp(-r2 / (2 * sig**2)) * (0.8 + 0.15 * texture)
    blob = np.where(lung & cons[:, None, None], np.clip(blob, 0, 1.2), 0.0)
    img += 0.38 * blob
    masks |= blob > 0.3
    # pneumothorax: dark apical cap without markings, thin bright pleural line
    ptx = labels[:, 4] > 0
    lung = which_lung("pneumothorax")
    cut = col(-0.45 + 0.1 * size_scale["pneumothorax"])
    edge_x = np.where(side_is_left["pneumothorax"], 1.0, -1.0)[:, None, None]
    region = lung & ((yy < cut) | ((xx * edge_x) > 0.58 - 0.05 * col(size_scale["pneumothorax"]))) & ptx[:, None, None]
    line = region ^ (gaussian_filter(region.astype(np.float32), sigma=(0, 0.6, 0.6)) > 0.7)
    img[region] = 0.03
    img[line & ptx[:, None, None]] = 0.5
    masks |= region
    # nodule(s): small round bright spots
    nod = labels[:, 5] > 0
    lung = which_lung("nodule")
    for j in range(2):
        keep = nod & ((rng.random(n) < 0.5) | (j == 0))
        ncx = np.where(side_is_left["nodule"], 0.39, -0.39) + rng.uniform(-0.14, 0.14, n)
        radius = np.full(n, max(0.05, 2.4 / res))  # at least ~one pixel at coarse native resolutions
        spot = ellipse(ncx, rng.uniform(-0.4, 0.25, n), radius, radius) & lung
        spot &= keep[:, None, None]
        img[spot] = 0.5
        masks |= spot

    # scanner style: blur, noise, contrast, gamma, offset; then resample to the common size
    if style["blur"] > 0:
        img = gaussian_filter(img, sigma=(0, style["blur"] * res / 64, style["blur"] * res / 64))
    img = np.clip((img - 0.35) * style["contrast"] + 0.35 + style["offset"], 0.0, 1.0) ** style["gamma"]
    img = img + rng.normal(scale=style["noise"], size=img.shape).astype(np.float32)
    t = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32)).unsqueeze(1)
    m = torch.from_numpy(masks.astype(np.float32)).unsqueeze(1)
    if res != out_size:
        t = F.interpolate(t, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
        # max-pool when shrinking so small lesions stay in the mask
        m = (
            F.adaptive_max_pool2d(m, out_size)
            if res > out_size
            else F.interpolate(m, size=(out_size, out_size), mode="nearest")
        )
    return (
        t.squeeze(1).clamp(0, 1).numpy().astype(np.float32),
        (m.squeeze(1).numpy() > 0.5).astype(np.uint8),
        sides,
        sizes,
    )


#: Splits larger than this are rendered in chunks of this many images (bounded memory at 10k+ per site).
RENDER_CHUNK = 2048


def _render_chunked(
    labels: np.ndarray, style: dict[str, Any], out_size: int, rng: np.random.Generator, key: list
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]], list[dict[str, str]]]:
    """:func:`_render` in chunks of :data:`RENDER_CHUNK` images, so peak memory does not grow with the split.

    The renderer's intermediates (masks, textures, native-resolution images) are a few times the
    size of its output; rendering a 10,000-record split at once held them all.  A split of at most
    ``RENDER_CHUNK`` records is rendered as before, from ``rng`` (the same bytes as earlier
    versions); a larger one renders chunk ``c`` from its own generator, seeded from ``key`` and
    ``c``, so the result is deterministic and independent of how much memory the machine has.
    """
    n = labels.shape[0]
    if n <= RENDER_CHUNK:
        return _render(labels, style, out_size, rng)
    images = np.empty((n, out_size, out_size), np.float32)
    masks = np.empty((n, out_size, out_size), np.uint8)
    sides: list[dict[str, str]] = []
    sizes: list[dict[str, str]] = []
    kinds = {"train": 0, "heldout": 1, "public": 2}
    splits = {"train": 0, "val": 1, "test": 2}
    seed = [int(key[0]), int(key[1]), kinds.get(key[2], 3), splits.get(key[3], 3), 5_150]
    for c, start in enumerate(range(0, n, RENDER_CHUNK)):
        stop = min(n, start + RENDER_CHUNK)
        im, ma, si, sz = _render(labels[start:stop], style, out_size, np.random.default_rng([*seed, c]))
        images[start:stop], masks[start:stop] = im, ma
        sides += si
        sizes += sz
    return images, masks, sides, sizes


def _labels(n: int, prevalence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lab = np.zeros((n, len(FINDINGS)), np.float32)
    lab[:, 1:] = rng.random((n, len(LESIONS))) < prevalence
    lab[:, 0] = lab[:, 1:].sum(1) == 0
    return lab


def _split(
    spec: SyntheticSpec, name: str, index: int, kind: str, split: str, n: int, missing_text: float = 0.0
) -> VLPDataset:
    rng = np.random.default_rng(
        [spec.seed, index, {"train": 0, "heldout": 1, "public": 2}[kind], {"train": 0, "val": 1, "test": 2}[split]]
    )
    style = _style(spec, index, kind)
    labels = _labels(n, _prevalence(spec, index, kind), rng)
    images, masks, sides, sizes = (
        _render_chunked(labels, style, spec.image_size, rng, [spec.seed, index, kind, split])
        if n
        else (
            np.zeros((0, spec.image_size, spec.image_size), np.float32),
            np.zeros((0, spec.image_size, spec.image_size), np.uint8),
            [],
            [],
        )
    )
    reports = [_report(labels[i], sides[i], sizes[i], style, rng) for i in range(n)]
    has_text = np.ones(n, bool)
    if missing_text > 0 and n:
        has_text[rng.random(n) < missing_text] = False
        reports = [r if h else "" for r, h in zip(reports, has_text, strict=True)]
    return VLPDataset(
        name, images, reports, labels, masks, [f"{name}/{split}/{i:06d}" for i in range(n)], np.ones(n, bool), has_text
    )


def _hold_only(ds: VLPDataset, modality: str) -> VLPDataset:
    """``ds`` as a site holding only ``modality`` keeps it: reports dropped (``"image"``) or images zeroed
    (``"text"``), with ``has_text`` / ``has_image`` False; labels and record ids are kept."""
    if modality == "paired":
        return ds
    n = len(ds)
    has_image, has_text = np.asarray(ds.has_image, bool).copy(), np.asarray(ds.has_text, bool).copy()
    images, reports, masks = ds.images, list(ds.reports), ds.masks
    if modality == "image":
        reports, has_text = [""] * n, np.zeros(n, bool)
    else:  # "text"
        images, has_image = np.zeros_like(ds.images), np.zeros(n, bool)
        masks = None if masks is None else np.zeros_like(masks)
    return VLPDataset(ds.site, images, reports, ds.labels, masks, ds.record_ids, has_image, has_text)


def _generate(spec: SyntheticSpec) -> Federation:
    sites = []
    for i, name in enumerate(spec.site_names()):
        miss = spec.missing_text_fraction if i == spec.num_sites - 1 else 0.0
        modality = spec.site_modality(i)
        sites.append(
            SiteData(
                name,
                "train",
                *(
                    _hold_only(_split(spec, name, i, "train", s, n, miss if s == "train" else 0.0), modality)
                    for s, n in (
                        ("train", spec.train_per_site),
                        ("val", spec.val_per_site),
                        ("test", spec.test_per_site),
                    )
                ),
                modality=modality,
            )
        )
    heldout = None
    if spec.heldout_site:
        i = spec.num_sites
        heldout = SiteData(
            "heldout",
            "heldout",
            _split(spec, "heldout", i, "heldout", "train", spec.heldout_train_size),
            _split(spec, "heldout", i, "heldout", "val", spec.val_per_site),
            _split(spec, "heldout", i, "heldout", "test", spec.test_per_site),
        )
    public = _split(spec, "public", 0, "public", "train", spec.public_size) if spec.public_size else None
    return Federation(tuple(sites), heldout, public)


def _generate_pretrain(spec: SyntheticSpec) -> VLPDataset:
    """The public pre-training corpus, rendered in chunks of :data:`_PRETRAIN_CHUNK` records.

    Chunk ``c`` draws from its own stream ``[seed, 31337, PRETRAIN_VERSION, c]``, disjoint from every
    stream of the sites, the held-out site and the public reference set, so the sites' data do not
    change when the corpus is added, and a larger corpus extends a smaller one.
    """
    n, style = int(spec.pretrain_size), pretrain_style(spec)
    images, labels, reports = [], [], []
    for c, start in enumerate(range(0, n, _PRETRAIN_CHUNK)):
        m = min(_PRETRAIN_CHUNK, n - start)
        rng = np.random.default_rng([spec.seed, 31_337, PRETRAIN_VERSION, c])
        lab = _labels(m, PRETRAIN_PREVALENCE, rng)
        img, _masks, sides, sizes = _render(lab, style, spec.image_size, rng)
        images.append(img)
        labels.append(lab)
        reports += [_pretrain_report(lab[i], sides[i], sizes[i], rng) for i in range(m)]
    size = spec.image_size
    return VLPDataset(
        "pretrain",
        np.concatenate(images) if images else np.zeros((0, size, size), np.float32),
        reports,
        np.concatenate(labels) if labels else np.zeros((0, len(FINDINGS)), np.float32),
        None,
        [f"pretrain/{i:06d}" for i in range(n)],
    )


# ----------------------------------------------------------------------------- cache

#: Spec fields that shape only the public pre-training corpus: left out of the sites' cache key,
#: so the sites' cache file (and data) stay those of a spec without them.
_CORPUS_ONLY_FIELDS = ("pretrain_size",)


def _cache_key(spec: SyntheticSpec) -> str:
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _CORPUS_ONLY_FIELDS}
    blob = json.dumps({"v": GENERATOR_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pretrain_corpus_key(spec: SyntheticSpec) -> str:
    """Content address of the public pre-training corpus: what determines it and nothing else."""
    blob = json.dumps(
        {
            "pretrain_v": PRETRAIN_VERSION,
            "v": GENERATOR_VERSION,
            "seed": spec.seed,
            "pretrain_size": spec.pretrain_size,
            "image_size": spec.image_size,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _datasets(fed: Federation) -> dict[str, VLPDataset]:
    out = {}
    for s in fed.all_sites():
        for split in ("train", "val", "test"):
            out[f"{s.name}|{s.role}|{split}"] = getattr(s, split)
    if fed.public is not None:
        out["public|public|train"] = fed.public
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save(fed: Federation, spec: SyntheticSpec, path: Path) -> tuple[bytes, dict[str, Any]]:
    """Arrays to ``path`` (.npz), then reports/ids/spec and the npz's sha256 to its .json sidecar.

    The sidecar is written last and names the npz digest, so a reader never pairs a sidecar with
    a partial or foreign npz; both writes are atomic.
    """
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for key, ds in _datasets(fed).items():
        arrays[f"{key}|images"] = (ds.images * 65535).round().astype(np.uint16)
        arrays[f"{key}|labels"] = ds.labels.astype(np.uint8)
        arrays[f"{key}|masks"] = ds.masks if ds.masks is not None else np.zeros((0,), np.uint8)
        arrays[f"{key}|has_text"] = ds.has_text
        arrays[f"{key}|has_image"] = ds.has_image
        meta[key] = {"reports": ds.reports, "record_ids": ds.record_ids}
    modalities = {s.name: s.modality for s in fed.all_sites()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    blob = buf.getvalue()
    _atomic_write(path, blob)
    side = {
        "generator_version": GENERATOR_VERSION,
        "spec": dataclasses.asdict(spec),
        "npz_sha256": hashlib.sha256(blob).hexdigest(),
        "datasets": meta,
        "modalities": modalities,
    }
    _atomic_write(path.with_suffix(".json"), json.dumps(side).encode())
    return blob, side


def _load(path: Path) -> Federation:
    blob = path.read_bytes()
    side = json.loads(path.with_suffix(".json").read_text())
    if side.get("npz_sha256") != hashlib.sha256(blob).hexdigest():
        raise ValueError("the npz does not match the digest in its .json sidecar")
    return _from_blob(blob, side)


def _from_blob(blob: bytes, side: dict[str, Any]) -> Federation:
    sites: dict[str, dict[str, VLPDataset]] = {}
    roles: dict[str, str] = {}
    with np.load(io.BytesIO(blob)) as z:
        for key, m in side["datasets"].items():
            name, role, split = key.split("|")
            masks = z[f"{key}|masks"]
            ds = VLPDataset(
                name,
                z[f"{key}|images"].astype(np.float32) / 65535,
                m["reports"],
                z[f"{key}|labels"].astype(np.float32),
                masks if masks.ndim == 3 else None,
                m["record_ids"],
                z[f"{key}|has_image"] if f"{key}|has_image" in z.files else None,
                z[f"{key}|has_text"],
            )
            sites.setdefault(name, {})[split] = ds
            roles[name] = role
    public = sites.pop("public", {}).get("train")
    mods = side.get("modalities", {})
    train = tuple(
        SiteData(n, "train", d["train"], d["val"], d["test"], mods.get(n, "paired"))
        for n, d in sites.items()
        if roles[n] == "train"
    )
    held = [
        SiteData(n, "heldout", d["train"], d["val"], d["test"], mods.get(n, "paired"))
        for n, d in sites.items()
        if roles[n] == "heldout"
    ]
    return Federation(train, held[0] if held else None, public)


def _save_corpus(ds: VLPDataset, spec: SyntheticSpec, path: Path) -> tuple[bytes, dict[str, Any]]:
    """The pre-training corpus to ``path`` (.npz) and its .json sidecar, as :func:`_save` does for the sites."""
    buf = io.BytesIO()
    np.savez(
        buf,
        images=(ds.images * 65535).round().astype(np.uint16),
        labels=ds.labels.astype(np.uint8),
        has_text=ds.has_text,
    )
    blob = buf.getvalue()
    _atomic_write(path, blob)
    side = {
        "pretrain_version": PRETRAIN_VERSION,
        "generator_version": GENERATOR_VERSION,
        "spec": dataclasses.asdict(spec),
        "npz_sha256": hashlib.sha256(blob).hexdigest(),
        "reports": ds.reports,
        "record_ids": ds.record_ids,
    }
    _atomic_write(path.with_suffix(".json"), json.dumps(side).encode())
    return blob, side


def _corpus_from_blob(blob: bytes, side: dict[str, Any]) -> VLPDataset:
    with np.load(io.BytesIO(blob)) as z:
        return VLPDataset(
            "pretrain",
            z["images"].astype(np.float32) / 65535,
            side["reports"],
            z["labels"].astype(np.float32),
            None,
            side["record_ids"],
            None,
            z["has_text"],
        )


def generate_pretrain_corpus(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> VLPDataset:
    """Generate (or load from ``cache_dir``) the public pre-training corpus of ``spec``.

    ``spec.pretrain_size`` records in the corpus' own style, wording and prevalences (module
    docstring); deterministic in ``spec.seed``, ``spec.pretrain_size`` and ``spec.image_size`` only.
    Cached as ``synthetic-pretrain-<hash>.npz`` plus its ``.json`` sidecar, apart from the sites'
    cache, with the same atomic writes and the same 16-bit images; an unreadable cache is regenerated.

    Raises
    ------
    DataError
        ``spec.pretrain_size`` is 0 (the spec asks for no corpus).
    """
    if spec.pretrain_size < 1:
        raise DataError(
            f"data.synthetic.pretrain_size = {spec.pretrain_size}: the synthetic federation has no public "
            "pre-training corpus; set data.synthetic.pretrain_size (e.g. 4096) for pretrain.source = 'synthetic'."
        )
    if cache_dir is None:
        return _generate_pretrain(spec)
    path = Path(cache_dir) / f"synthetic-pretrain-{pretrain_corpus_key(spec)}.npz"
    if path.exists():
        try:
            blob = path.read_bytes()
            side = json.loads(path.with_suffix(".json").read_text())
            if side.get("npz_sha256") != hashlib.sha256(blob).hexdigest():
                raise ValueError("the npz does not match the digest in its .json sidecar")
            return _corpus_from_blob(blob, side)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("pre-training corpus cache %s is unreadable (%s); regenerating it.", path, exc)
    t0 = time.perf_counter()
    ds = _corpus_from_blob(*_save_corpus(_generate_pretrain(spec), spec, path))
    logger.info("generated the public pre-training corpus in %.1fs -> %s", time.perf_counter() - t0, path)
    return ds


def generate_federation(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> Federation:
    """Generate (or load from ``cache_dir``) the synthetic federation described by ``spec``.

    Parameters
    ----------
    spec : what to generate; the same spec always gives bit-identical arrays and reports.
    cache_dir : if given, the federation is cached there as ``synthetic-<hash>.npz`` (arrays) plus
        ``synthetic-<hash>.json`` (spec, reports, record ids and the npz's sha256), keyed by a hash of
        the spec and the generator version.

    Returns
    -------
    Federation

    Notes
    -----
    Images are cached as 16-bit integers, so a cache hit equals the fresh generation to within
    1/65535 (with a cache, the returned data is always the cached form, whether this call
    generated it or read it).  Writes are atomic (temporary file + ``os.replace``), so concurrent
    processes (Ray actors) may call this safely; an unreadable or inconsistent cache is
    regenerated with a logged warning.
    """
    if cache_dir is None:
        return _generate(spec)
    path = Path(cache_dir) / f"synthetic-{_cache_key(spec)}.npz"
    if path.exists():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning("synthetic cache %s is unreadable (%s); regenerating it.", path, exc)
    t0 = time.perf_counter()
    fed = _generate(spec)
    # return the cached (16-bit) form, identical whether this call generated the data or read it; built from
    # memory, so a concurrent writer replacing the files in between cannot pair this npz with another sidecar
    fed = _from_blob(*_save(fed, spec, path))
    logger.info("generated synthetic federation in %.1fs -> %s", time.perf_counter() - t0, path)
    return fed
