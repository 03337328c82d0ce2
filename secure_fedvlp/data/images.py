"""Image files: decode PNG/JPEG/DICOM to float32 squares in [0, 1], and find them under an image root.

Conventions
-----------
* PNG/JPEG go through Pillow: 8-bit images are divided by 255; 16/32-bit and float images are
  min-max scaled per image, because 12-bit data in 16-bit containers is common.
* DICOM goes through pydicom: rescale slope/intercept, then the first VOI window
  (centre/width) if present, else the image's min-max range; clipped to [0, 1]; MONOCHROME1 is
  inverted so that bone is bright.  Colour is averaged to grey; of a multi-frame file only the
  first frame is read.
* Non-square images are zero-padded to a centred square (nothing is cropped) and resized
  (antialiased bilinear) to the requested side length.
* Lesion masks (:func:`load_mask`) are a PNG (any non-zero pixel is lesion) or a run-length
  encoding as SIIM-ACR distributes it (``-1`` for an empty mask, else pairs ``start length`` with
  each start relative to the end of the previous run, pixels numbered column by column over the
  image's original size).  They are padded like their image and shrunk by max-pooling, so a small
  lesion stays in the mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "load_image",
    "load_mask",
    "decode_siim_rle",
    "is_rle",
    "resolve_image",
    "describe_missing_image",
    "outside_image_roots",
]


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read one PNG/JPEG/DICOM file as float32 ``[image_size, image_size]`` in [0, 1].

    Parameters
    ----------
    path : path of the image; DICOM is recognised by suffix (.dcm/.dicom) or the ``DICM`` preamble.
    image_size : output side length.

    Raises
    ------
    Exception
        Whatever the decoder raises on an unreadable file (callers report it as a row problem).
    """
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path):
        arr = _read_dicom(path)
    else:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("L", (2 * image_size, 2 * image_size))  # decode at reduced scale: much faster
            if im.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            else:  # I;16*, I, F: high bit depth -> min-max
                arr = _minmax(np.asarray(im, dtype=np.float64))
    return _square_resize(arr.astype(np.float32), image_size)


def _within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def outside_image_roots(value: str | os.PathLike, roots: Sequence[Path]) -> bool:
    """Whether the image a table cell names lies outside every image root (``..`` or an absolute path
    elsewhere, symbolic links followed): a manifest must not make a site read files beyond its images."""
    rel = Path(value)
    candidates = [rel] if rel.is_absolute() else [Path(r) / rel for r in roots]
    return not any(_within(c, Path(r)) for c in candidates for r in roots)


def resolve_image(value: str | os.PathLike, roots: Sequence[Path]) -> tuple[Path | None, list[Path]]:
    """Find the image a table cell names: ``(first existing file or None, every path tried)``.

    A relative ``value`` is tried under each of ``roots`` in order; an absolute one as it is.  A path
    outside every root is never returned (see :func:`outside_image_roots`).
    """
    rel = Path(value)
    tried = [rel] if rel.is_absolute() else [Path(r) / rel for r in roots]
    found = (p for p in tried if p.is_file() and any(_within(p, Path(r)) for r in roots))
    return next(found, None), tried


def describe_missing_image(column: str, value: str, tried: Sequence[Path]) -> str:
    """The row-problem text for an image that was not found."""
    return f"column {column!r}: image file {value!r} not found (tried {', '.join(map(str, tried))})"


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def _first(v: Any) -> float | None:
    if v is None:
        return None
    try:
        if not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):  # pydicom MultiValue: first value
            v = v[0]
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array, dtype=np.float64)
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        arr = arr.mean(axis=-1)
    if arr.ndim == 3:  # multi-frame: first frame
        arr = arr[0]
    slope = _first(getattr(ds, "RescaleSlope", None))
    intercept = _first(getattr(ds, "RescaleIntercept", None))
    arr = arr * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    centre, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if centre is not None and width is not None and width > 0:
        out = np.clip((arr - (centre - width / 2.0)) / width, 0.0, 1.0)
    else:
        out = _minmax(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out


def _square_resize(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h != w:
        side = max(h, w)
        pad = np.zeros((side, side), np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        pad[top : top + h, left : left + w] = arr
        arr = pad
    if arr.shape[0] != size:
        arr = np.asarray(Image.fromarray(arr.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def is_rle(value: str) -> bool:
    """Whether a mask cell is a run-length encoding (``-1``, or integers separated by spaces) rather than a path."""
    parts = value.split()
    return bool(parts) and (value.strip() == "-1" or all(p.isdigit() for p in parts))


def decode_siim_rle(rle: str, height: int, width: int) -> np.ndarray:
    """A SIIM-ACR run-length encoding as a bool ``[height, width]`` mask (``-1``: empty).

    Raises ValueError naming the problem for an odd number of values or a run past the image's end.
    """
    rle = rle.strip()
    mask = np.zeros(height * width, bool)
    if rle == "-1" or not rle:
        return mask.reshape(height, width)
    values = [int(v) for v in rle.split()]
    if len(values) % 2:
        raise ValueError(f"run-length encoding has {len(values)} numbers; expected start/length pairs")
    pos = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        pos += start
        if pos + length > mask.size:
            raise ValueError(
                f"run-length encoding runs past the end of a {height}x{width} image (pixel {pos + length})"
            )
        mask[pos : pos + length] = True
        pos += length
    return mask.reshape(width, height).T  # numbered column by column


def _square_max_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask zero-padded to a centred square like its image, then resized (max-pool when shrinking)."""
    import torch
    import torch.nn.functional as F

    h, w = mask.shape
    side = max(h, w)
    pad = np.zeros((side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    pad[top : top + h, left : left + w] = mask
    t = torch.from_numpy(pad)[None, None]
    if side > size:
        t = F.adaptive_max_pool2d(t, size)
    elif side < size:
        t = F.interpolate(t, size=(size, size), mode="nearest")
    return (t[0, 0].numpy() > 0.5).astype(np.uint8)


def load_mask(value: str, image_path: str | os.PathLike, image_size: int, roots: Sequence[Path]) -> np.ndarray:
    """The lesion mask of one record as uint8 ``[image_size, image_size]`` (see the module docstring).

    ``value`` is the manifest cell: a SIIM run-length encoding (decoded over the size of the image at
    ``image_path``) or the path of a PNG mask (resolved against ``roots``).
    """
    if is_rle(value):
        image_path = Path(image_path)
        if image_path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(image_path):
            h, w = _read_dicom(image_path).shape[:2]
        else:
            with Image.open(image_path) as im:
                w, h = im.size
        return _square_max_resize(decode_siim_rle(value, h, w), image_size)
    path, tried = resolve_image(value, roots)
    if path is None:
        raise FileNotFoundError(f"mask file {value!r} not found (tried {', '.join(str(t) for t in tried)})")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L")) > 0
    return _square_max_resize(arr, image_size)
