"""The synthetic federation's specification (torch-free: the config layer reads it)."""

from __future__ import annotations

from dataclasses import dataclass

from secure_fedvlp.errors import ConfigError

__all__ = ["SyntheticSpec", "MODALITIES"]

#: What a site holds: image-report pairs, images only (with finding labels), or reports only (with labels).
MODALITIES: tuple[str, ...] = ("paired", "image", "text")


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and heterogeneity of the synthetic federation."""

    num_sites: int = 4
    heldout_site: bool = True
    train_per_site: int = 240
    val_per_site: int = 48
    test_per_site: int = 96
    public_size: int = 256
    # A separate public pre-training corpus (its own style, wording and prevalences; 0 = none): the
    # public start's data (``[pretrain] source = "synthetic"``). It never changes the sites' data.
    pretrain_size: int = 0
    image_size: int = 64
    dirichlet_alpha: float = 0.5
    missing_text_fraction: float = 0.0
    seed: int = 0
    # What each training site holds, in site order: "paired", "image" (its reports are dropped) or
    # "text" (its images are dropped); sites beyond the list hold pairs.  () = every site paired.
    site_modalities: tuple[str, ...] = ()
    # Training records of the held-out site: it never trains in the federation; downstream evaluation
    # (linear probe, segmentation decoder) fits its heads on them at that site.
    heldout_train_size: int = 0

    def site_names(self) -> tuple[str, ...]:
        """The training sites' names, in order (``site1``, ``site2``, ...); the held-out site is ``heldout``."""
        return tuple(f"site{i + 1}" for i in range(int(self.num_sites)))

    def site_modality(self, index: int) -> str:
        """What training site ``index`` (0-based) holds; the held-out site and the public set hold pairs."""
        mods = tuple(self.site_modalities)
        return mods[index] if 0 <= index < len(mods) and index < self.num_sites else "paired"

    def __post_init__(self) -> None:
        problems = []
        mods = self.site_modalities
        if not isinstance(mods, (tuple, list)) or any(m not in MODALITIES for m in mods):
            problems.append(
                f"'data.synthetic.site_modalities' must be a list of {', '.join(map(repr, MODALITIES))}. "
                f"Found {mods!r}."
            )
        elif isinstance(self.num_sites, int) and len(mods) > self.num_sites:
            problems.append(
                f"'data.synthetic.site_modalities' names {len(mods)} sites but data.synthetic.num_sites = "
                f"{self.num_sites}. Found {list(mods)!r}."
            )
        for name in ("num_sites", "train_per_site", "val_per_site", "test_per_site", "image_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"'data.synthetic.{name}' must be an integer >= 1. Found {v!r}.")
        for name in ("public_size", "pretrain_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"'data.synthetic.{name}' must be an integer >= 0. Found {v!r}.")
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool) and self.image_size < 16:
            problems.append(f"'data.synthetic.image_size' must be >= 16. Found {self.image_size!r}.")
        if not (isinstance(self.dirichlet_alpha, (int, float)) and self.dirichlet_alpha > 0):
            problems.append(f"'data.synthetic.dirichlet_alpha' must be > 0. Found {self.dirichlet_alpha!r}.")
        if not (isinstance(self.missing_text_fraction, (int, float)) and 0 <= self.missing_text_fraction < 1):
            problems.append(
                f"'data.synthetic.missing_text_fraction' must be in [0, 1). Found {self.missing_text_fraction!r}."
            )
        if (
            isinstance(self.heldout_train_size, bool)
            or not isinstance(self.heldout_train_size, int)
            or (self.heldout_train_size < 0)
        ):
            problems.append(
                f"'data.synthetic.heldout_train_size' must be an integer >= 0. Found {self.heldout_train_size!r}."
            )
        if problems:
            raise ConfigError(problems)
