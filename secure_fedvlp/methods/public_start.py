"""The public start: non-private pre-training on a public image-report set, before any site trains.

Published DP medical imaging starts private fine-tuning from a public initialisation; this module
is that step.  It runs *before* the Flower apps start, as the server operator's public step (like
the key authority's step for CKKS keys): it trains the model every party builds
(:func:`~secure_fedvlp.build.build_model`, every parameter the architecture leaves trainable) on a
public corpus, with in-batch InfoNCE, through the package's one training loop
(:meth:`LocalTrainer.fit <secure_fedvlp.methods.trainer.LocalTrainer.fit>` with plain steps), and
writes every parameter and buffer to a checkpoint (:mod:`secure_fedvlp.models.checkpoint`) that
becomes ``model.init_checkpoint``: every party then builds exactly that round-0 model.

**It spends no privacy budget**: it reads no site's record (the corpus is public: the synthetic
public corpus, :func:`~secure_fedvlp.data.synthetic.generate_pretrain_corpus`, or a manifest the
operator names), so nothing it releases depends on private data, and no ledger records it.

**Cache.** The checkpoint is content-addressed under ``<data.cache_dir>/public_start/`` by
:func:`public_start_key`, a hash of everything that determines it (the architecture, the
``[pretrain]`` settings, the public corpus' specification, its seed), so the cells of a sweep
that share a public start train it once.  A ``.json`` sidecar beside every copy says what it is
(:func:`describe`): public, epsilon spent 0, the source, steps, corpus size, hash, wall time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secure_fedvlp.build import build_model, checkpoint_path, resolve_device
from secure_fedvlp.config import (
    AnchorConfig,
    AuditConfig,
    EncryptionConfig,
    ExperimentConfig,
    PrivacyConfig,
    TrainConfig,
    config_to_dict,
)
from secure_fedvlp.data.types import VLPDataset
from secure_fedvlp.errors import CheckpointError, DataError
from secure_fedvlp.methods.trainer import LocalTrainer, PlainSteps, StepEngine, TrainTask
from secure_fedvlp.models.checkpoint import read_checkpoint, save_checkpoint, state_hash

logger = logging.getLogger(__name__)
progress_logger = logging.getLogger("secure_fedvlp.progress")

__all__ = [
    "PUBLIC_START_VERSION",
    "PublicStart",
    "public_corpus",
    "corpus_spec",
    "public_start_key",
    "pretrain_config",
    "pretrain_public",
    "compute_public_start",
    "cached_public_start",
    "install_public_start",
    "checkpoint_info",
    "cache_path",
    "info_path",
    "write_info",
    "describe",
    "read_info",
    "TRAINING_RUNS",
]

#: Changes when what this module trains changes (it is part of the cache key).
PUBLIC_START_VERSION = 1
#: How many public starts this process has trained (tests check that a cache hit trains none).
TRAINING_RUNS = [0]


@dataclass(frozen=True)
class PublicStart:
    """A public-start checkpoint, its description (the sidecar's content) and whether this call trained it."""

    path: Path
    info: dict[str, Any]
    trained: bool


# ----------------------------------------------------------------------------- the public corpus


def _concat(parts: list[VLPDataset], name: str) -> VLPDataset:
    parts = [p for p in parts if len(p)]
    if not parts:
        raise DataError("the public pre-training corpus holds no record.")
    return VLPDataset(
        name,
        np.concatenate([p.images for p in parts]),
        [r for p in parts for r in p.reports],
        np.concatenate([p.labels for p in parts]),
        None,
        [i for p in parts for i in p.record_ids],
        np.concatenate([p.has_image for p in parts]),
        np.concatenate([p.has_text for p in parts]),
    )


def _manifest_file(cfg: ExperimentConfig) -> Path:
    path = Path(cfg.pretrain.manifest_path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"pretrain.manifest_path = {cfg.pretrain.manifest_path!r}: {path} is not a file.")
    return path


def corpus_spec(cfg: ExperimentConfig) -> dict[str, Any]:
    """What determines the public corpus (part of :func:`public_start_key`; written to the sidecar).

    Synthetic: the generator's corpus key and the spec fields behind it.  Manifest: the manifest's
    absolute path and SHA-256, the image root and the image size (the images themselves are not
    hashed: change the manifest, or clear the cache, when they change).
    """
    p = cfg.pretrain
    if p.source == "synthetic":
        from secure_fedvlp.data.synthetic import PRETRAIN_VERSION, pretrain_corpus_key

        spec = cfg.data.synthetic
        return {
            "source": "synthetic",
            "corpus_key": pretrain_corpus_key(spec),
            "pretrain_version": PRETRAIN_VERSION,
            "pretrain_size": spec.pretrain_size,
            "image_size": spec.image_size,
            "seed": spec.seed,
        }
    path = _manifest_file(cfg)
    root = Path(p.image_root).expanduser().resolve() if p.image_root else path.parent
    return {
        "source": "manifest",
        "manifest": str(path),
        "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "image_root": str(root),
        "image_size": cfg.data.synthetic.image_size,
    }


def public_corpus(cfg: ExperimentConfig) -> VLPDataset:
    """The public pre-training corpus of ``cfg`` (``[pretrain] source``).

    ``"synthetic"``: ``data.synthetic.pretrain_size`` records of the synthetic public corpus (cached
    under ``data.cache_dir``, apart from the sites' data).  ``"manifest"``: every record of
    ``pretrain.manifest_path``, whatever its site or split, images resized to ``data.synthetic.image_size``.
    """
    p = cfg.pretrain
    if p.source == "synthetic":
        from secure_fedvlp.data.synthetic import generate_pretrain_corpus

        return generate_pretrain_corpus(cfg.data.synthetic, cache_dir=cfg.data.cache_dir or None)
    from secure_fedvlp.data.manifest import load_manifest

    fed = load_manifest(
        _manifest_file(cfg),
        image_root=Path(p.image_root).expanduser() if p.image_root else None,
        image_size=cfg.data.synthetic.image_size,
        default_site="public",
        allow_missing_text=True,
    )
    parts = [getattr(s, split) for s in fed.all_sites() for split in ("train", "val", "test")]
    if fed.public is not None:
        parts.append(fed.public)
    return _concat(parts, "pretrain")


# ----------------------------------------------------------------------------- what is trained, and its address


def pretrain_seed(cfg: ExperimentConfig) -> int:
    """The seed of the public start: ``pretrain.seed``, or ``run.seed`` when it is -1."""
    return cfg.run.seed if cfg.pretrain.seed < 0 else cfg.pretrain.seed


def pretrain_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The configuration the pre-training runs under: ``cfg`` with the ``[pretrain]`` settings as the local
    training (in-batch InfoNCE, AdamW, no gradient clipping), every parameter the architecture leaves trainable,
    no checkpoint, ``run.seed`` = :func:`pretrain_seed` (the seeded model it starts from), and no privacy,
    anchors, encryption or canaries (none applies to public data)."""
    p = cfg.pretrain
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, seed=pretrain_seed(cfg)),
        # the image whitening, if asked for, is set at the end (pretrain_public): none while pre-training
        model=dataclasses.replace(cfg.model, trainable="all", init_checkpoint="", image_whitening=False),
        pretrain=dataclasses.replace(p, enabled=False),
        train=TrainConfig(
            local_steps=p.steps,
            batch_size=p.batch_size,
            lr=p.lr,
            text_lr=p.text_lr,
            weight_decay=p.weight_decay,
            optimizer="adamw",
            objective="infonce",
            grad_clip=0.0,
        ),
        privacy=PrivacyConfig(),
        anchors=AnchorConfig(),
        encryption=EncryptionConfig(),
        audit=AuditConfig(),
    )


def public_start_key(cfg: ExperimentConfig) -> str:
    """Content address of ``cfg``'s public start: a hash of the architecture (its model config and text
    weights), the ``[pretrain]`` settings that shape training, the public corpus' specification
    (:func:`corpus_spec`) and :func:`pretrain_seed` (the seeded model it starts from and its batch order).

    ``model.trainable`` and ``model.init_checkpoint`` are not part of it: the public stage always trains
    every parameter the architecture leaves trainable, from the seeded model.
    """
    from secure_fedvlp.models import get_model_spec

    p = config_to_dict(cfg.pretrain)
    blob = {
        "v": PUBLIC_START_VERSION,
        "model": dataclasses.asdict(get_model_spec(cfg.model.name)),
        "text_weights_dir": cfg.model.text_weights_dir,
        "pretrain": {
            k: v for k, v in p.items() if k not in ("enabled", "log_every", "manifest_path", "image_root", "seed")
        },
        "corpus": corpus_spec(cfg),
        "seed": pretrain_seed(cfg),
    }
    if cfg.model.image_whitening:  # only then: the keys of every start without it stay what they were
        blob["image_whitening"] = True
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- training


class _ProgressSteps:
    """A :class:`~secure_fedvlp.methods.trainer.StepEngine` around another that prints a progress line
    every ``every`` steps (mean loss of the window, elapsed time) and keeps the last window's mean loss."""

    def __init__(self, inner: StepEngine, every: int, total: int, log: Callable[[str], None]) -> None:
        self.inner, self.every, self.total, self.log = inner, int(every), int(total), log
        self.reduction = inner.reduction
        self.module = inner.module
        self.done = 0
        self.window: list[float] = []
        self.last_window = float("nan")
        self.t0 = time.perf_counter()

    def next_batch(self):  # noqa: ANN201 - the inner engine's batch
        return self.inner.next_batch()

    def backward(self, compute, batch, regularizer):  # noqa: ANN001, ANN201 - StepEngine's signature
        terms = self.inner.backward(compute, batch, regularizer)
        self.window.append(float(terms["loss"].detach().mean()))
        return terms

    def empty_step(self, regularizer) -> None:  # noqa: ANN001
        self.inner.empty_step(regularizer)

    def step(self) -> None:
        self.inner.step()
        self.done += 1
        if self.window and (self.done == self.total or (self.every and self.done % self.every == 0)):
            self.last_window = float(np.mean(self.window))
            if self.every:
                self.log(
                    f"public start: step {self.done}/{self.total}, InfoNCE loss {self.last_window:.3f} "
                    f"[{time.perf_counter() - self.t0:.0f}s]"
                )
            self.window = []

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict[str, float]:
        return {**self.inner.stats(), "loss_last": self.last_window}


def _job_seed(seed: int) -> int:
    digest = hashlib.sha256(f"{seed}/public-start".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def pretrain_public(
    cfg: ExperimentConfig, *, corpus: VLPDataset | None = None, log: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``cfg``'s seeded model on the public corpus, non-privately; return the model and what was done.

    The loop is :meth:`LocalTrainer.fit` with plain steps under :func:`pretrain_config`: shuffled
    batches of ``pretrain.batch_size`` public records, in-batch InfoNCE, ``pretrain.steps`` AdamW steps;
    the model, the batch order and dropout are seeded from :func:`pretrain_seed`.
    """
    pcfg = pretrain_config(cfg)
    log = log or progress_logger.info
    corpus = public_corpus(cfg) if corpus is None else corpus
    device = resolve_device(cfg.run.device)
    model = build_model(pcfg).to(device)
    trainer = LocalTrainer(pcfg, device)
    steps = cfg.pretrain.steps
    holder: dict[str, _ProgressSteps] = {}

    def engine(m, opt, data, gen) -> StepEngine:  # noqa: ANN001 - EngineFactory
        holder["e"] = _ProgressSteps(PlainSteps(trainer, m, opt, data, gen), cfg.pretrain.log_every, steps, log)
        return holder["e"]

    seed = _job_seed(pretrain_seed(cfg))
    log(
        f"public start: pre-training model {cfg.model.name!r} on {len(corpus)} public records "
        f"({cfg.pretrain.source}), {steps} steps of {min(cfg.pretrain.batch_size, len(corpus))}, "
        "in-batch InfoNCE, no privacy budget spent"
    )
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        task = TrainTask(server_round=0, stage="full", steps=steps)
        metrics = trainer.fit(model, corpus, task, torch.Generator().manual_seed(seed), {}, engine=engine)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    TRAINING_RUNS[0] += 1
    batch = min(cfg.pretrain.batch_size, len(corpus))
    last = float(metrics.get("train_loss_last", float("nan")))
    if at_chance(last, batch):
        logger.warning(
            "public start: the InfoNCE loss of the last steps (%.3f) is at chance level (log %d = %.3f): the model "
            "has not learned to pair images with reports (often the text tower collapsing to one embedding); "
            "try a lower pretrain.text_lr or more pretrain.steps",
            last,
            batch,
            math.log(batch),
        )
    model = model.cpu().eval()
    whitening = _whiten(model, corpus, cfg.eval.batch_size) if cfg.model.image_whitening else None
    return model, {
        **({"image_whitening": whitening} if whitening else {}),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "train_loss_mean": float(metrics.get("train_loss", float("nan"))),
        "train_loss_last": float(metrics.get("train_loss_last", float("nan"))),
        "records_seen": int(metrics.get("train_records_seen", 0)),
        "corpus_size": int(metrics.get("num-examples", len(corpus))),
    }


def at_chance(loss: float, batch: int, tol: float = 0.01) -> bool:
    """Whether an in-batch InfoNCE loss over ``batch`` pairs is no better than matching at random (``log batch``,
    within ``tol``): what a collapsed model (every embedding the same) scores."""
    return batch >= 2 and math.isfinite(loss) and loss >= math.log(batch) - tol


def describe(cfg: ExperimentConfig, key: str, digest: str, stats: Mapping[str, Any]) -> dict[str, Any]:
    """The sidecar of a public start trained by this module: what it is, and that it spent nothing."""
    p = cfg.pretrain
    return {
        "kind": "public_start",
        "public": True,
        "epsilon_spent": 0.0,
        "privacy": "trained on public records only, before any site trains: no site's record is read, "
        "no privacy budget is spent and no ledger records it",
        "source": p.source,
        "corpus": corpus_spec(cfg),
        "corpus_size": int(stats["corpus_size"]),
        "steps": p.steps,
        "batch_size": p.batch_size,
        "lr": p.lr,
        "text_lr": p.text_lr,
        "weight_decay": p.weight_decay,
        "objective": "infonce",
        "model": cfg.model.name,
        "seed": pretrain_seed(cfg),
        "key": key,
        "state_hash": digest,
        **{k: stats[k] for k in ("wall_seconds", "cpu_seconds", "train_loss_mean", "train_loss_last", "records_seen")},
        **({"image_whitening": stats["image_whitening"]} if "image_whitening" in stats else {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_info(path: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """Write a checkpoint's description (JSON, atomically) to ``path``."""
    _write_json(Path(path), info)


def _write_json(path: Path, info: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(info), indent=2, sort_keys=True, default=str) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def info_path(checkpoint: str | os.PathLike) -> Path:
    """The ``.json`` description beside a checkpoint."""
    return Path(checkpoint).with_suffix(".json")


def read_info(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The description beside ``checkpoint``, or None when it has none (or an unreadable one)."""
    path = info_path(checkpoint)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("%s is unreadable (%s); ignored.", path, exc)
        return None


@torch.no_grad()
def _whiten(model: nn.Module, corpus: VLPDataset, batch_size: int) -> dict[str, float]:
    """Set ``model``'s image whitening from the public corpus' image-tower outputs (``model.image_whitening``)."""
    images = torch.from_numpy(np.ascontiguousarray(corpus.images[np.asarray(corpus.has_image, dtype=bool)]))
    feats = torch.cat(
        [model.image_encoder(images[i : i + batch_size].unsqueeze(1)) for i in range(0, len(images), batch_size)]
    )
    return model.whiten_image_head(feats)


def compute_public_start(
    cfg: ExperimentConfig, out: str | os.PathLike, *, key: str | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train the public start of ``cfg`` and write it to ``out`` (``.npz``) with its ``.json``; return the latter."""
    out = Path(out)
    key = key or public_start_key(cfg)
    model, stats = pretrain_public(cfg, log=log)
    digest = save_checkpoint(
        model, out, meta={"model": cfg.model.name, "key": key, "public": True, "kind": "public_start"}
    )
    info = describe(cfg, key, digest, stats)
    _write_json(info_path(out), info)
    return info


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (two processes computing one public start train it once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _valid_cached(path: Path, key: str) -> dict[str, Any] | None:
    """The cached public start's description if the checkpoint and its sidecar exist and agree (key, hash)."""
    info = read_info(path)
    if info is None or not path.is_file():
        return None
    if info.get("key") != key:
        logger.warning("public-start cache %s describes key %s, not %s; training it again.", path, info.get("key"), key)
        return None
    try:
        arrays, meta = read_checkpoint(path)
    except CheckpointError as exc:
        logger.warning("public-start cache %s is unreadable (%s); training it again.", path, exc)
        return None
    if meta.get("state_hash") != info.get("state_hash") or state_hash(arrays) != info.get("state_hash"):
        logger.warning("public-start cache %s does not match its description; training it again.", path)
        return None
    return info


def cache_path(cfg: ExperimentConfig, key: str | None = None) -> Path:
    """Where ``cfg``'s public start is cached: ``<data.cache_dir>/public_start/public-start-<key>.npz``."""
    return Path(cfg.data.cache_dir) / "public_start" / f"public-start-{key or public_start_key(cfg)}.npz"


def cached_public_start(cfg: ExperimentConfig, *, log: Callable[[str], None] | None = None) -> PublicStart:
    """``cfg``'s public start from the cache, trained (and cached) first when the cache lacks it."""
    key = public_start_key(cfg)
    path = cache_path(cfg, key)
    with _locked(path.with_suffix(".lock")):
        info = _valid_cached(path, key)
        if info is not None:
            (log or progress_logger.info)(
                f"public start: cached {path} (key {key}, {info.get('steps')} steps on "
                f"{info.get('corpus_size')} public records; not trained again)"
            )
            return PublicStart(path, info, False)
        info = compute_public_start(cfg, path, key=key, log=log)
        return PublicStart(path, info, True)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def install_public_start(source: str | os.PathLike, info: Mapping[str, Any], dest: str | os.PathLike) -> Path:
    """Put the checkpoint ``source`` at ``dest`` (a hard link where possible, else a copy) with ``info`` as its
    ``.json``; return ``dest``."""
    source, dest = Path(source), Path(dest)
    _link_or_copy(source, dest)
    _write_json(info_path(dest), {**info, "installed_from": str(source)})
    return dest


def checkpoint_info(cfg: ExperimentConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """The description of a user's ``model.init_checkpoint``: its own sidecar when it has one (a checkpoint
    written by ``secure-fedvlp pretrain``), else what the file says (its SHA-256 and state hash)."""
    path = checkpoint_path(cfg)
    if path is None:
        raise CheckpointError("model.init_checkpoint is empty: no checkpoint to describe.")
    own = read_info(path) or {}
    arrays, meta = read_checkpoint(path)
    digest = state_hash(arrays)
    if own.get("state_hash") not in (None, digest):
        logger.warning("%s: its description names another state hash; it is ignored.", info_path(path))
        own = {}
    info = {
        "kind": "public_start",
        "public": True,
        "epsilon_spent": 0.0,
        "privacy": "a checkpoint the operator declared public (model.init_checkpoint); it spends no privacy budget "
        "(trained on private records, it would carry no DP guarantee for them)",
        "source": "checkpoint",
        **own,
        "state_hash": digest,
        "origin": str(path),
        "origin_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    if meta.get("key") and "key" not in info:
        info["key"] = meta["key"]
    return info
