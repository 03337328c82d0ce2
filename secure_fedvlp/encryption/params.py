"""CKKS parameters for sum-only encrypted aggregation.

The server in secure_fedvlp only *adds* ciphertexts (and plaintext noise vectors); it never
multiplies.  A sum needs no rescaling, so the modulus chain can be as short as SEAL allows: one
data prime plus the "special" prime that SEAL reserves for key switching.  (SEAL drops the last
prime of ``coeff_mod_bit_sizes`` from the data level; TenSEAL generates relinearisation keys when
it creates a context, which needs at least two primes.  We never serialise those keys.)

Security level: HomomorphicEncryption.org standard (Albrecht et al., "Homomorphic Encryption
Security Standard", 2018, Table 1, uniform ternary secret -- the distribution SEAL uses, classical
attacks).  The largest total ``log2 q`` (sum of *all* primes, the special prime included) for each
ring dimension ``N`` and security level:

======  =======  =======  =======
N       128-bit  192-bit  256-bit
======  =======  =======  =======
1024    27       19       14
2048    54       37       29
4096    109      75       58
8192    218      152      118
16384   438      305      237
32768   881      611      476
======  =======  =======  =======

SEAL enforces the 128-bit column itself when a context is created; :func:`security_level`
reports the strongest column a parameter set meets, and :class:`CKKSParams` refuses anything
below 128 bits.

Presets (``PRESETS``):

``sum_only_128`` (default)
    ``N = 8192``, chain ``[60, 40]`` (total 100 bits, so it meets the 256-bit column: 100 <= 118),
    one 60-bit data prime, global scale ``2**30``, **symmetric** (secret-key) encryption.
    4096 slots per ciphertext; one serialised ciphertext is ~131 kB, i.e. ~32 bytes per slot
    (SEAL's zstd cannot compress uniformly random 60-bit residues stored in 64-bit words).
    Exact (unpacked) mode: fresh noise std is ~2**7.7 coefficient units, i.e. ~2e-7 per slot at
    scale 2**30; measured max |error| of the decrypted weighted mean over 1M values and 4 clients:
    9.5e-7 (analytic high-probability bound 3.7e-6, :func:`~secure_fedvlp.encryption.packing.exact_error_bound`).
    The weighted *sum* must stay below ``2**(60-2-30) = 2**28`` in absolute value.
    Packed mode (10-bit values, <= 8 clients, 3 values per slot): 10.8 bytes/value, max |error| of the
    mean 1.9e-3 for values in [-1, 1] (bound 1.9e-3: quantisation only, the CKKS error is rounded away).
``sum_only_128_pk``
    As ``sum_only_128`` but asymmetric (public-key) encryption, for deployments where a party
    without the secret key must encrypt.  Fresh noise is ~2**10.4 instead of ~2**7.7 (N=8192), and
    the server context carries the ~260 kB public key.
``sum_only_128_n4096``
    ``N = 4096``, chain ``[60, 49]`` (total 109: exactly the 128-bit bound), symmetric, scale 2**30.
    2048 slots per ciphertext (less padding for small updates), same bytes per slot.

Why symmetric encryption by default: every party that encrypts in this protocol (the clients) holds
the secret key anyway -- they decrypt the aggregate -- and the server never encrypts (it adds
ciphertexts and *plaintexts*; plaintext addition needs only the encoder).  Secret-key RLWE
encryption has the same security (RLWE) as public-key encryption, ~5 bits less noise, and the
server's context then holds no key material at all, only the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from secure_fedvlp.errors import ConfigError

__all__ = [
    "HE_STANDARD_MAX_LOG_Q",
    "CKKSParams",
    "PRESETS",
    "preset",
    "security_level",
    "fresh_noise_std",
]

#: HomomorphicEncryption.org standard, ternary secret, classical: N -> {level: max total log2 q}.
HE_STANDARD_MAX_LOG_Q: dict[int, dict[int, int]] = {
    1024: {128: 27, 192: 19, 256: 14},
    2048: {128: 54, 192: 37, 256: 29},
    4096: {128: 109, 192: 75, 256: 58},
    8192: {128: 218, 192: 152, 256: 118},
    16384: {128: 438, 192: 305, 256: 237},
    32768: {128: 881, 192: 611, 256: 476},
}

#: Standard deviation of SEAL's error distribution (``seal::util::global_variables::noise_standard_deviation``).
_SEAL_ERROR_STD = 3.2

_PARAM_FIELDS = ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits", "n_threads", "symmetric")


def security_level(
    params: CKKSParams | None = None, *, poly_modulus_degree: int | None = None, total_log_q: int | None = None
) -> int:
    """Strongest HE-standard security level (bits) the parameters meet.

    Parameters
    ----------
    params
        A parameter set; alternatively pass ``poly_modulus_degree`` and ``total_log_q``.
    poly_modulus_degree, total_log_q
        Ring dimension ``N`` and the sum of all prime bit sizes (special prime included).

    Returns
    -------
    int
        256, 192 or 128 per the table in this module's docstring, or 0 when below 128 bits or when
        ``N`` is not in the table.
    """
    if params is not None:
        poly_modulus_degree = params.poly_modulus_degree
        total_log_q = sum(params.coeff_mod_bit_sizes)
    if poly_modulus_degree is None or total_log_q is None:
        raise ConfigError("security_level needs params, or poly_modulus_degree and total_log_q.")
    row = HE_STANDARD_MAX_LOG_Q.get(int(poly_modulus_degree))
    if row is None:
        return 0
    for level in (256, 192, 128):
        if total_log_q <= row[level]:
            return level
    return 0


@dataclass(frozen=True)
class CKKSParams:
    """Validated CKKS parameters for one federation run.

    Parameters
    ----------
    poly_modulus_degree
        Ring dimension ``N`` (power of two, 1024..32768).  A ciphertext holds ``N / 2`` real slots.
    coeff_mod_bit_sizes
        Bit sizes of the primes; the last one is SEAL's special prime, the others form the data
        level that ciphertexts live at.  Each in [20, 60]; at least two primes.
    global_scale_bits
        ``log2`` of the CKKS scale used by exact (unpacked) encoding.  Must leave at least 4 bits
        of head room below the data modulus.
    n_threads
        Threads TenSEAL may use for operations over multi-ciphertext vectors (>= 1).
    symmetric
        Secret-key encryption (default, see module docstring) instead of public-key encryption.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    global_scale_bits: int
    n_threads: int = 1
    symmetric: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        problems: list[str] = []
        n = self.poly_modulus_degree
        if not isinstance(n, int) or isinstance(n, bool) or n not in HE_STANDARD_MAX_LOG_Q:
            problems.append(
                f"poly_modulus_degree must be a power of two in {sorted(HE_STANDARD_MAX_LOG_Q)}. Found {n!r}."
            )
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            problems.append(
                "coeff_mod_bit_sizes needs at least two primes (data prime(s) then SEAL's special prime). "
                f"Found {list(bits)}."
            )
        bad = [b for b in bits if not 20 <= b <= 60]
        if bad:
            problems.append(f"Each prime must have 20..60 bits (SEAL's limit). Found {bad} in {list(bits)}.")
        if not problems:
            level = security_level(self)
            if level < 128:
                problems.append(
                    f"Total modulus {sum(bits)} bits exceeds the 128-bit HE-standard bound "
                    f"{HE_STANDARD_MAX_LOG_Q[n][128]} for N={n}."
                )
        s = self.global_scale_bits
        if not isinstance(s, int) or isinstance(s, bool) or s < 10:
            problems.append(f"global_scale_bits must be an integer >= 10. Found {s!r}.")
        elif len(bits) >= 2 and s > self.data_modulus_bits - 4:
            problems.append(
                f"global_scale_bits={s} leaves less than 4 bits of head room below the "
                f"{self.data_modulus_bits}-bit data modulus."
            )
        t = self.n_threads
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            problems.append(f"n_threads must be an integer >= 1. Found {t!r}.")
        if not isinstance(self.symmetric, bool):
            problems.append(f"symmetric must be a bool. Found {self.symmetric!r}.")
        if problems:
            raise ConfigError(problems, source="CKKSParams")

    @property
    def slots(self) -> int:
        """Real slots per ciphertext, ``N / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the data-level modulus (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def security_bits(self) -> int:
        """HE-standard security level these parameters meet (see :func:`security_level`)."""
        return security_level(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CKKSParams:
        """Build from a dict, rejecting unknown keys with a message naming them."""
        unknown = sorted(set(data) - set(_PARAM_FIELDS))
        missing = [k for k in ("poly_modulus_degree", "coeff_mod_bit_sizes", "global_scale_bits") if k not in data]
        problems = [f"Unknown CKKS parameter {k!r}." for k in unknown]
        problems += [f"Missing CKKS parameter {k!r}." for k in missing]
        if problems:
            raise ConfigError(problems, source="CKKSParams")
        return cls(**{k: (tuple(v) if k == "coeff_mod_bit_sizes" else v) for k, v in data.items()})


PRESETS: dict[str, CKKSParams] = {
    "sum_only_128": CKKSParams(8192, (60, 40), 30, 1, True),
    "sum_only_128_pk": CKKSParams(8192, (60, 40), 30, 1, False),
    "sum_only_128_n4096": CKKSParams(4096, (60, 49), 30, 1, True),
}


def preset(name: str = "sum_only_128", *, n_threads: int | None = None) -> CKKSParams:
    """Return a named preset, optionally with another thread count.

    Raises
    ------
    ConfigError
        For an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ConfigError(f"Unknown CKKS preset {name!r}. Known presets: {sorted(PRESETS)}.")
    p = PRESETS[name]
    if n_threads is not None:
        p = CKKSParams(p.poly_modulus_degree, p.coeff_mod_bit_sizes, p.global_scale_bits, n_threads, p.symmetric)
    return p


def fresh_noise_std(params: CKKSParams) -> float:
    """Conservative standard deviation of the CKKS error in one slot of a fresh ciphertext.

    In *coefficient units* (i.e. before dividing by the scale).  The model is calibrated on
    measurements with TenSEAL 0.3.18 / SEAL and then doubled as a safety factor:

    * symmetric encryption: error polynomial ``e`` with i.i.d. coefficients of std 3.2; a slot's real
      part has std ``3.2 * sqrt(N / 2)`` (measured: 2**7.7 at N=8192, 2**7.2 at N=4096, matching).
    * asymmetric encryption: ``u*e_pk + e1 + e2*s``; measured std ~ ``N / 6`` (2**10.4 at N=8192,
      2**9.3 at N=4096).

    Returns
    -------
    float
        Twice the measured/modelled std.  A sum of ``K`` independent fresh ciphertexts has std
        ``sqrt(K)`` times this.
    """
    n = params.poly_modulus_degree
    if params.symmetric:
        base = _SEAL_ERROR_STD * math.sqrt(n / 2)
    else:
        base = n / 6.0
    return 2.0 * base
