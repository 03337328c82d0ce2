"""One entry point for every data source: ``load_federation(source, ...)`` with plain arguments.

Sources
-------
``"synthetic"``      the embedded generator (:func:`~secure_fedvlp.data.synthetic.generate_federation`).
``"manifest"``       a CSV/TSV/JSONL manifest (:func:`~secure_fedvlp.data.manifest.load_manifest`).
``"mimic_cxr_jpg"``  MIMIC-CXR-JPG in its published layout (:func:`~secure_fedvlp.data.adapters.load_mimic_cxr_jpg`).
``"chexpert"``       CheXpert in its published layout (:func:`~secure_fedvlp.data.adapters.load_chexpert`).

Empty strings (and ``limit = 0``) mean "not given", so a caller can pass its settings through unchanged.
"""

from __future__ import annotations

from typing import cast

from secure_fedvlp.data.adapters import load_chexpert, load_mimic_cxr_jpg
from secure_fedvlp.data.labels import UNCERTAIN_POLICIES, UncertainPolicy
from secure_fedvlp.data.manifest import load_manifest
from secure_fedvlp.data.spec import SyntheticSpec
from secure_fedvlp.data.synthetic import generate_federation
from secure_fedvlp.data.types import Federation
from secure_fedvlp.errors import DataError

__all__ = ["SOURCES", "load_federation"]

SOURCES: tuple[str, ...] = ("synthetic", "manifest", "mimic_cxr_jpg", "chexpert")


def load_federation(
    source: str,
    *,
    image_size: int,
    synthetic: SyntheticSpec | None = None,
    cache_dir: str | None = None,
    manifest_path: str = "",
    image_root: str = "",
    root: str = "",
    reports_root: str = "",
    heldout_site: str = "",
    public_site: str = "",
    uncertain: str = "negative",
    num_sites: int = 1,
    limit: int = 0,
) -> Federation:
    """The federation of ``source``.

    Parameters
    ----------
    source : one of :data:`SOURCES`.
    image_size : side length real images are resized to (the synthetic spec carries its own).
    synthetic, cache_dir : ``"synthetic"``: the spec to generate and where to cache it (None = no cache).
    manifest_path, image_root : ``"manifest"``: the table, and the directory its image paths are
        relative to ("" = the manifest's directory).
    root : ``"mimic_cxr_jpg"`` / ``"chexpert"``: the dataset directory.
    reports_root : ``"mimic_cxr_jpg"``: the directory holding ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt``
        ("" = ``root``).
    heldout_site, public_site : real sources: the site that never trains, and the site whose records
        form the public reference set ("" = none).
    uncertain : real sources: policy for ``-1`` labels (``"negative"``, ``"positive"`` or ``"error"``).
    num_sites, limit : adapters: patients are hashed into ``num_sites`` simulated sites; only the
        first ``limit`` images are kept (0 = all).

    Raises
    ------
    DataError
        An unknown source, a missing required argument, or whatever the loader finds wrong with the data.
    """

    def required(name: str, value: str) -> str:
        if not value:
            raise DataError(f"data source {source!r} needs {name}; found {value!r}.")
        return value

    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}; found {uncertain!r}.")
    policy = cast(UncertainPolicy, uncertain)
    held, public = heldout_site or None, public_site or None
    if source == "synthetic":
        return generate_federation(synthetic if synthetic is not None else SyntheticSpec(), cache_dir=cache_dir)
    if source == "manifest":
        return load_manifest(
            required("manifest_path", manifest_path),
            image_root=image_root or None,
            image_size=image_size,
            uncertain=policy,
            heldout_site=held,
            public_site=public,
        )
    if source == "mimic_cxr_jpg":
        return load_mimic_cxr_jpg(
            required("root", root),
            reports_root=reports_root or None,
            image_size=image_size,
            uncertain=policy,
            num_sites=num_sites,
            limit=limit or None,
            heldout_site=held,
            public_site=public,
        )
    if source == "chexpert":
        return load_chexpert(
            required("root", root),
            image_size=image_size,
            uncertain=policy,
            num_sites=num_sites,
            limit=limit or None,
            heldout_site=held,
            public_site=public,
        )
    raise DataError(f"unknown data source {source!r}; known sources: {', '.join(SOURCES)}.")
