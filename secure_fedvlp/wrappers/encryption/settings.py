"""The CKKS settings of a run, derived from its config once.

Every party of an encrypted run (each site's client mod, the server's strategy wrapper, a key
holder's export, the CLI acting as key authority) needs the same few values: the CKKS preset, the
fixed-point grid, the bound on contributions per aggregate, the TenSEAL thread count and where the
key files are.  :func:`encryption_settings` computes them from ``(cfg, run_dir)`` and nothing else
reads them from the config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.encryption import preset
from secure_fedvlp.encryption.keys import MANIFEST_NAME, SERVER_FILE
from secure_fedvlp.encryption.packing import QuantizedPacking, delta_packing, exact_capacity, fixed_point_bits_for
from secure_fedvlp.encryption.params import CKKSParams
from secure_fedvlp.errors import ConfigError
from secure_fedvlp.layout import RunLayout

__all__ = ["EncryptionSettings", "encryption_settings"]


@dataclass(frozen=True)
class EncryptionSettings:
    """The CKKS settings of one run (build them with :func:`encryption_settings`).

    ``preset`` names the CKKS parameters (:attr:`params`); ``fixed_point_bits`` is the number of
    fractional bits of the fixed-point grid (public: part of the codec every party checks);
    ``max_contributions`` is the most contributions one aggregate may hold, which the grid is sized
    for; ``n_threads`` is the TenSEAL thread count; ``key_dir`` holds the run's key files.
    ``min_contributors`` (model aggregates) and ``anchor_min_contributors`` (anchor banks) are the
    fewest signed contributions a site accepts in an aggregate; ``clip`` is the public bound on the
    absolute value of every value a site encrypts.
    """

    preset: str
    fixed_point_bits: int
    max_contributions: int
    n_threads: int
    key_dir: Path
    min_contributors: int = 2
    anchor_min_contributors: int = 1
    clip: float = 100.0
    codec: str = "packed_delta"
    delta_bound: float = 0.25
    value_bits: int = 0

    @property
    def packing(self) -> QuantizedPacking | None:
        """The packing of the delta protocol (``codec = "packed_delta"``), or ``None`` (exact full models)."""
        if self.codec != "packed_delta":
            return None
        return delta_packing(self.params, self.max_contributions, self.delta_bound, self.value_bits)

    @property
    def max_weight(self) -> float:
        """Largest signed weight.  Exact codec: ``max_contributions`` contributions of values within ``clip``
        then fit the capacity (:func:`~secure_fedvlp.encryption.packing.exact_capacity`) with a 2x margin.
        Packed deltas: weights are normalised to at most 1."""
        if self.codec == "packed_delta":
            return 1.0
        return exact_capacity(self.params) / (2.0 * self.max_contributions * self.clip)

    @property
    def manifest(self) -> Path:
        """The run's ``manifest.json`` (the sites' signing public keys)."""
        return self.key_dir / MANIFEST_NAME

    @property
    def params(self) -> CKKSParams:
        """The CKKS parameters of :attr:`preset` (with the preset's own thread count)."""
        return preset(self.preset)

    @property
    def server_context(self) -> Path:
        """The server's key-less context file."""
        return self.key_dir / SERVER_FILE

    def client_key(self, site: str) -> Path:
        """A site's secret-key file (as ``secure-fedvlp keys init`` names it)."""
        return self.key_dir / f"client-{site}.key"


def contribution_grid(cfg: ExperimentConfig) -> tuple[int, int]:
    """``(max_contributions, fixed_point_bits)`` of the run's configuration.

    The contributor bound is the number of federation nodes (at least 2); the grid is the finest
    whose CKKS error stays below half a step for that many contributions.  Raises
    :class:`~secure_fedvlp.errors.ConfigError` when the preset cannot hold such a grid.
    """
    from secure_fedvlp.build import expected_num_nodes

    bound = max(2, expected_num_nodes(cfg))
    try:
        bits = fixed_point_bits_for(preset(cfg.encryption.preset), bound)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"encryption: {exc}") from exc
    return bound, bits


def encryption_settings(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> EncryptionSettings:
    """The run's CKKS settings: keys in ``encryption.key_dir``, else in the run directory's ``keys/``."""
    bound, bits = contribution_grid(cfg)
    enc = cfg.encryption
    return EncryptionSettings(
        preset=enc.preset,
        fixed_point_bits=bits,
        max_contributions=bound,
        n_threads=enc.n_threads or max(1, cfg.run.threads_per_client),
        key_dir=Path(enc.key_dir) if enc.key_dir else RunLayout(run_dir).keys,
        min_contributors=int(enc.min_contributors),
        anchor_min_contributors=int(cfg.anchors.min_contributors),
        clip=float(enc.clip),
        codec=enc.codec,
        delta_bound=float(enc.delta_bound),
        value_bits=int(enc.value_bits),
    )
