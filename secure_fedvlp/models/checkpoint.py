"""Model checkpoints: every parameter and buffer of a model, in a file every party can load.

Only the federated parameters travel in a run; everything else (frozen towers, buffers) is
rebuilt by each party from the config.  A checkpoint that changes the starting model (a public
start, ``model.init_checkpoint``) must therefore hold the frozen parts too: it is the model's
whole ``state_dict``.

Two formats are read: ``.npz`` (what this package writes: one array per state-dict key, plus a
JSON metadata entry :data:`META_KEY`) and ``.pt`` (a ``torch.save``-d state dict, read with
``weights_only=True``; a dict holding it under ``"state_dict"`` or ``"model"`` is accepted).
Loading is strict: a missing or unexpected key, a shape that differs from the model's, or a
non-finite value is a :class:`~secure_fedvlp.errors.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secure_fedvlp.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "META_KEY",
    "full_state",
    "state_hash",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "secure_fedvlp.checkpoint/v1"
#: The ``.npz`` entry that holds the checkpoint's metadata (JSON text); never a state-dict key.
META_KEY = "__secure_fedvlp_meta__"
_HASH_PREFIX = b"secure_fedvlp.state/v1\x00"


def full_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and (persistent) buffer of ``model``, as CPU numpy arrays in their own dtype."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def state_hash(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a full state: every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(_HASH_PREFIX)
    for name in sorted(state):
        a = np.ascontiguousarray(np.asarray(state[name]))
        h.update(f"{name}\x00{a.dtype.str}\x00{a.shape}\x00".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(
    model_or_state: nn.Module | Mapping[str, np.ndarray], path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> str:
    """Write every parameter and buffer to ``path`` (``.npz``, atomically); return the state's :func:`state_hash`.

    ``meta`` (JSON-serialisable) is stored beside the arrays with the format name and the hash.
    """
    state = full_state(model_or_state) if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    digest = state_hash(state)
    info = {"format": CHECKPOINT_FORMAT, "state_hash": digest, **(dict(meta) if meta else {})}
    buf = io.BytesIO()
    np.savez(buf, **{META_KEY: np.array(json.dumps(info, sort_keys=True))}, **state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # a checkpoint is meant to be shared (mkstemp creates 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


def _read_pt(path: Path) -> dict[str, np.ndarray]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file that is not a state dict
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}).") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        kind = type(obj).__name__
        raise CheckpointError(f"{path}: a .pt checkpoint must hold a state dict of tensors; found {kind}.")
    return {str(k): v.detach().cpu().numpy() for k, v in obj.items()}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The state and the metadata (``{}`` when the file has none) of a ``.npz`` or ``.pt`` checkpoint.

    Raises :class:`CheckpointError` naming the file when it is missing, not a file, of another
    format or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file.")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return _read_pt(path), {}
    if suffix != ".npz":
        raise CheckpointError(f"checkpoint {str(path)!r}: unknown format {suffix or '(no suffix)'!r}; use .npz or .pt.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable .npz checkpoint ({type(exc).__name__}: {exc}).") from None
    meta: dict[str, Any] = {}
    if META_KEY in arrays:
        try:
            meta = json.loads(str(arrays.pop(META_KEY)))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: its metadata entry {META_KEY!r} is not JSON ({exc}).") from None
    return arrays, meta


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None) -> dict[str, Any]:
    """Load every parameter and buffer of ``model`` from the checkpoint at ``path``, strictly; return its metadata.

    The checkpoint must hold exactly the model's state-dict keys, each with the model's shape and
    finite values; nothing is loaded unless all of them fit.  ``model_name``: refuse a checkpoint
    whose metadata names another architecture.
    """
    path = Path(path)
    arrays, meta = read_checkpoint(path)
    if model_name is not None and meta.get("model") not in (None, model_name):
        raise CheckpointError(
            f"{path}: written for model {meta['model']!r}, but the configuration builds model {model_name!r}."
        )
    if "state_hash" in meta and meta["state_hash"] != state_hash(arrays):
        raise CheckpointError(f"{path}: its arrays do not match the state hash recorded in it (corrupted or edited).")
    target = model.state_dict()
    missing = sorted(set(target) - set(arrays))
    unexpected = sorted(set(arrays) - set(target))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: missing key {missing[0]!r} (missing: {missing[:3]}{more}).")
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{path}: unexpected key {unexpected[0]!r} (unexpected: {unexpected[:3]}{more}).")
    for name, ref in target.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: key {name!r} has shape {tuple(a.shape)}, the model's is {tuple(ref.shape)}."
            )
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise CheckpointError(f"{path}: key {name!r} holds non-finite values.")
    with torch.no_grad():
        for name, ref in target.items():
            ref.copy_(torch.as_tensor(np.asarray(arrays[name])).to(dtype=ref.dtype, device=ref.device))
    return meta
