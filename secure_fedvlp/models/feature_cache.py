"""Locked-tower features kept on disk, so that another process with the same towers need not recompute them.

With ``model.trainable = "heads"`` the image tower and a wholly frozen text tower are fixed
functions of their inputs, and :class:`~secure_fedvlp.models.vlp.VLPModel` caches their outputs
in memory (per image digest, per token sequence).  Computing them is most of a short job's
time: a site of 2,000 records spends about a minute on them before its first step, and every
run of a sweep (each cell is a process of its own) would spend it again.  This module writes
those in-memory caches to a file and reads them back:

* The file is named by a digest of the locked towers' weights (:func:`locked_towers_digest`),
  and holds that digest: features are loaded only into a model whose locked towers are
  bit-for-bit the ones that computed them, so a stale file is ignored, never used.
* It is plain arrays (``numpy.savez``, loaded with ``allow_pickle=False``): nothing in it is
  executed.  A file that cannot be read is logged and ignored; it is only a cache.
* It holds functions of the site's own records and stays where the site keeps its data
  (``data.cache_dir``), written with owner-only permissions, like the data cache beside it.
  Nothing in it is released: it changes no computation, only when it happens.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["PersistentFeatures", "load_features", "locked_towers_digest", "save_features"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _image_locked(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.image_encoder.parameters())


def _text_locked(model: nn.Module) -> bool:
    tower = model.text_encoder
    return tower.frozen_layers >= len(tower.encoder.encoder.layer)


def _hash_module(h: hashlib._Hash, module: nn.Module) -> None:
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())


def locked_towers_digest(model: nn.Module) -> str | None:
    """A digest of the weights of ``model``'s locked towers (``None`` when neither tower is locked, or the model
    keeps no tower caches: a model other than :class:`~secure_fedvlp.models.vlp.VLPModel`)."""
    model = getattr(model, "_module", model)
    if not (hasattr(model, "_image_cache") and hasattr(getattr(model, "text_encoder", None), "_pooled")):
        return None
    image, text = _image_locked(model), _text_locked(model)
    if not (image or text):
        return None
    h = hashlib.sha256(f"v{FORMAT_VERSION}/image={image}/text={text}/".encode())
    if image:
        _hash_module(h, model.image_encoder)
    if text:
        _hash_module(h, model.text_encoder)
    return h.hexdigest()[:24]


def _entries(model: nn.Module) -> int:
    return len(model._image_cache) + len(model.text_encoder._pooled)


def save_features(model: nn.Module, path: str | os.PathLike, digest: str | None = None) -> int:
    """Write ``model``'s cached locked-tower features to ``path`` (atomically, mode 0600); return the entry count."""
    model = getattr(model, "_module", model)
    digest = digest or locked_towers_digest(model)
    if digest is None:
        return 0
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"digest": np.frombuffer(digest.encode(), dtype=np.uint8)}
    if _image_locked(model) and model._image_cache:
        keys = list(model._image_cache)
        arrays["image_keys"] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1)
        arrays["image_feats"] = torch.stack([model._image_cache[k] for k in keys]).float().numpy()
    pooled = model.text_encoder._pooled
    if _text_locked(model) and pooled:
        keys = list(pooled)
        arrays["text_key_bytes"] = np.frombuffer(b"".join(keys), dtype=np.uint8)
        arrays["text_key_ends"] = np.cumsum([len(k) for k in keys]).astype(np.int64)
        arrays["text_feats"] = torch.stack([pooled[k].cpu() for k in keys]).float().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return _entries(model)


def load_features(model: nn.Module, path: str | os.PathLike, digest: str | None = None) -> int:
    """Fill ``model``'s feature caches from ``path`` if it was written by the same locked towers.

    Returns the number of entries loaded: 0 when the file is missing, unreadable (logged) or from
    other towers (a stale file: ignored).
    """
    model = getattr(model, "_module", model)
    path = Path(path)
    digest = digest or locked_towers_digest(model)
    if digest is None or not path.is_file():
        return 0
    try:
        with np.load(path, allow_pickle=False) as z:
            if bytes(z["digest"]).decode() != digest:
                logger.info("feature cache %s was computed by other towers; ignored", path)
                return 0
            n = 0
            if "image_keys" in z and _image_locked(model):
                keys, feats = z["image_keys"], torch.from_numpy(z["image_feats"])
                for i in range(keys.shape[0]):
                    model._image_cache[keys[i].tobytes()] = feats[i]
                n += keys.shape[0]
            if "text_feats" in z and _text_locked(model):
                raw, ends, feats = z["text_key_bytes"].tobytes(), z["text_key_ends"], torch.from_numpy(z["text_feats"])
                start = 0
                for i, end in enumerate(ends.tolist()):
                    model.text_encoder._pooled[raw[start:end]] = feats[i]
                    start = end
                n += len(ends)
            return n
    except (OSError, EOFError, ValueError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        logger.warning("feature cache %s could not be read (%s); ignored, the features will be recomputed", path, e)
        return 0


class PersistentFeatures:
    """One model's locked-tower features kept in a file under ``directory`` named by the towers' digest.

    :meth:`load` once after the model is built; :meth:`refresh` before work that needs features
    (it reads what other processes added to the file since); :meth:`sync` after work that may have
    added features.  Several processes may serve one site (the simulation's actors take any site's
    message; a deployment starts a process per message): each one merges the file's entries into
    its own before writing, so one process's write never drops what another computed, and a
    process that built its caches early (say, for an evaluation) still finds the features another
    computed later (say, the variants of every report that training needs).
    """

    def __init__(self, model: nn.Module, directory: str | os.PathLike, name: str) -> None:
        self.model = model
        self.digest = locked_towers_digest(model)
        self.path = Path(directory) / f"{name}-{self.digest}.npz" if self.digest else None
        self._saved = 0  # entries the file held when this process last read or wrote it
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file then
        self.loaded = 0  # entries read by the last load()

    @property
    def held(self) -> int:
        """Entries the file held when this process last read or wrote it."""
        return self._saved

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()  # type: ignore[union-attr]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> int:
        if self.path is None:
            return 0
        stamp = self._file_stamp()
        n = self.loaded = load_features(self.model, self.path, self.digest)
        self._stamp, self._saved = stamp, n
        if n:
            logger.info("locked-tower features: %d loaded from %s", n, self.path)
        return n

    def refresh(self) -> int:
        """Merge what the file holds if it changed since this process last read or wrote it; return the entries read."""
        if self.path is None:
            return 0
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return 0
        if locked_towers_digest(self.model) != self.digest:  # the towers changed (a checkpoint was loaded)
            return 0
        n = load_features(self.model, self.path, self.digest)
        self._stamp, self._saved = stamp, n
        return n

    def sync(self) -> None:
        if self.path is None:
            return
        model = getattr(self.model, "_module", self.model)
        self.refresh()  # another process's entries first: the file written below holds them too
        if _entries(model) > self._saved:
            if locked_towers_digest(model) != self.digest:  # the towers changed (a checkpoint was loaded)
                return
            self._saved = save_features(model, self.path, self.digest)
            self._stamp = self._file_stamp()
