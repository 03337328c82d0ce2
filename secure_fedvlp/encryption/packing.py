"""Flattening a model update into CKKS slots, with optional quantised multi-value packing.

Two encodings map one flat float vector (the weighted update) onto chunks of ``slots = N/2`` reals:

**Exact** (``packing=None``): one value per slot, ``weight * value`` encoded at the context's global
scale.  Approximate-arithmetic CKKS: the decrypted sum carries a small error
(:func:`exact_error_bound`).  Costs ~32 bytes per value with the 60-bit data prime (a SEAL
ciphertext is ``2 * N`` 64-bit residues for ``N / 2`` real slots, and zstd cannot compress uniformly
random 60-bit residues).

**Packed** (:class:`QuantizedPacking`): each value, already clipped and noised by the client, is
clamped to the public bound ``[-B, B]`` and mapped to ``u = (v + B) / (2B) * L`` with
``L = 2**value_bits - 1``; the client multiplies by its weight ``w <= max_weight`` and rounds
``z = round(w * u)`` (round-to-nearest, or unbiased stochastic rounding with an explicit generator).
``k = digits_per_slot`` such non-negative integers go into one slot as the single real number
``X = z_0 + z_1 * 2**d + ... + z_{k-1} * 2**(d (k-1))`` (base ``2**d`` positional encoding,
``d = digit_bits``).  Summing ciphertexts adds digit-wise without carries as long as every digit
sum stays below ``2**d``; ``d`` is chosen so that ``max_clients`` contributions of weight
``max_weight`` always fit: ``2**d > max_clients * ceil(max_weight * L)``.

Precision budget of one slot (SEAL data prime ``q0``, 60 bits, so ``q0/2 > 2**58``):

* the encoded message is ``X * 2**s`` (``s = scale_bits``); decryption is correct while
  ``|X * 2**s + e| < q0 / 2``, guaranteed by ``k * d + s <= 58``;
* the digits are recovered *exactly* by rounding ``X`` to the nearest integer when the CKKS error
  ``|e| / 2**s < 1/2``.  ``s`` is the smallest power of two with ``2**(s-1) >= 10 * sigma``, where
  ``sigma = fresh_noise_std(params) * sqrt(max_clients)`` (a doubled, measured noise model), so
  the per-slot failure probability is below ``P(|N(0,1)| > 10) ~ 2**-75``;
* ``k * d <= 46`` keeps ``X`` and the encoder's double-precision FFT far from the 53-bit mantissa.

For the default preset (N=8192, symmetric) ``s = 15`` for up to 8 clients (16 for 64), leaving 43
bits: ``value_bits=10, max_clients=8`` gives ``d = 13``, ``k = 3`` -> **10.76 bytes/value measured**;
``value_bits=7, max_clients=8`` gives ``d = 10``, ``k = 4`` -> 8.14 bytes/value; exact mode costs
32.15 (``benchmarks/bench_ckks.py --values 1000000 --clients 4``).

Aggregate error of the packed weighted mean (per coordinate, for values inside ``[-B, B]``):
``|mean_hat - mean| <= n * r * step / W`` with ``step = 2B / L``, ``n`` contributions, total weight
``W``, ``r = 1/2`` for round-to-nearest and ``r = 1`` for stochastic rounding (which is unbiased).
The CKKS error contributes nothing: the decoded integers are exact.  Because the decrypted value is
an exact function of the plaintexts, packed aggregates also do not expose the CKKS error term that
IND-CPA-D attacks exploit.  Values outside ``[-B, B]`` are clamped (a bias the caller controls
through ``B``).  The server cannot add real-valued plaintext noise to a packed aggregate.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_fedvlp.encryption.params import CKKSParams, fresh_noise_std
from secure_fedvlp.errors import CiphertextError, ConfigError

__all__ = [
    "LayoutEntry",
    "UpdateLayout",
    "flatten_update",
    "unflatten_update",
    "QuantizedPacking",
    "num_vectors",
    "encode_chunks",
    "decode_sums",
    "exact_capacity",
    "exact_error_bound",
    "codec_id",
    "fixed_point_bits_for",
    "fixed_point_failure_bound",
    "PACKED_WEIGHT_BITS",
    "weight_quantum",
    "quantize_weight",
    "split_weight_slots",
    "grid_residual",
    "packed_digit_sums",
    "delta_packing",
    "packed_failure_bound",
]

#: Tail multiple of the noise std that the packed scale must cover (per-slot failure < 2**-75).
NOISE_TAIL_SIGMAS = 10.0
#: Largest packed slot value, in bits (stays far below the 53-bit float64 mantissa).
MAX_PACKED_BITS = 46
#: Fractional bits of a weight in the weight slot of a packed vector (weights are quantised to 2**-16).
PACKED_WEIGHT_BITS = 16


# --------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of an update: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of values."""
        return int(math.prod(self.shape))


@dataclass(frozen=True)
class UpdateLayout:
    """How a flat vector maps back to named tensors.

    Attributes
    ----------
    entries
        Tensors in flattening order.
    kind
        ``"dict"`` (named tensors) or ``"list"`` (positional).
    """

    entries: tuple[LayoutEntry, ...]
    kind: str = "dict"

    @property
    def num_values(self) -> int:
        """Total number of values."""
        return sum(e.size for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible description."""
        return {"kind": self.kind, "entries": [[e.name, list(e.shape), e.dtype] for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UpdateLayout:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(LayoutEntry(str(n), tuple(int(x) for x in s), str(d)) for n, s, d in data["entries"]),
            str(data["kind"]),
        )

    def layout_hash(self) -> str:
        """sha256 (32 hex chars) of the canonical description; sent with every update."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:32]


def flatten_update(update: Mapping[str, Any] | Sequence[Any]) -> tuple[np.ndarray, UpdateLayout]:
    """Flatten named (dict) or positional (list) arrays into one float64 vector.

    Parameters
    ----------
    update
        Mapping name -> array, or a sequence of arrays (anything ``np.asarray`` accepts).  Insertion
        order is kept.

    Returns
    -------
    (numpy.ndarray, UpdateLayout)
        The flat vector and the layout to undo it.

    Raises
    ------
    TypeError
        For non-floating or complex arrays.
    ValueError
        For non-finite values or an empty update.
    """
    if isinstance(update, Mapping):
        items = [(str(k), v) for k, v in update.items()]
        kind = "dict"
    else:
        items = [(str(i), v) for i, v in enumerate(update)]
        kind = "list"
    if not items:
        raise ValueError("Cannot flatten an empty update.")
    parts: list[np.ndarray] = []
    entries: list[LayoutEntry] = []
    for name, value in items:
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"Update tensor {name!r} has dtype {arr.dtype}; only real floating tensors are supported.")
        flat = arr.astype(np.float64, copy=False).reshape(-1)
        if not np.all(np.isfinite(flat)):
            raise ValueError(f"Update tensor {name!r} contains NaN or infinite values.")
        parts.append(flat)
        entries.append(LayoutEntry(name, tuple(int(s) for s in arr.shape), str(arr.dtype)))
    return np.concatenate(parts), UpdateLayout(tuple(entries), kind)


def unflatten_update(vector: np.ndarray, layout: UpdateLayout) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Inverse of :func:`flatten_update` (values cast back to each tensor's dtype)."""
    vec = np.asarray(vector).reshape(-1)
    if vec.size != layout.num_values:
        raise ValueError(f"Vector has {vec.size} values; the layout needs {layout.num_values}.")
    out: list[tuple[str, np.ndarray]] = []
    pos = 0
    for e in layout.entries:
        out.append((e.name, vec[pos : pos + e.size].astype(np.dtype(e.dtype)).reshape(e.shape)))
        pos += e.size
    if layout.kind == "dict":
        return dict(out)
    return [a for _, a in out]


# -------------------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class QuantizedPacking:
    """Public parameters of quantised multi-value packing (see the module docstring).

    Build with :meth:`for_params`, which derives ``digit_bits``, ``digits_per_slot`` and
    ``scale_bits`` from the CKKS parameters and checks the precision budget.

    Attributes
    ----------
    value_bits
        Quantisation bits per value (``L = 2**value_bits - 1`` levels above zero).
    bound
        Public bound ``B``: values are clamped to ``[-B, B]``.
    max_clients
        Most contributions one aggregate may sum.
    max_weight
        Largest client weight (weights are e.g. ``num_examples / public_cap``).
    digit_bits
        Bits per packed digit.
    digits_per_slot
        Values per CKKS slot.
    scale_bits
        CKKS scale (log2) used for packed vectors.
    """

    value_bits: int
    bound: float
    max_clients: int
    max_weight: float
    digit_bits: int
    digits_per_slot: int
    scale_bits: int

    @classmethod
    def for_params(
        cls,
        params: CKKSParams,
        value_bits: int,
        bound: float,
        max_clients: int,
        max_weight: float = 1.0,
        digits_per_slot: int | None = None,
    ) -> QuantizedPacking:
        """Derive a packing for ``params``; raise :class:`ConfigError` if it cannot fit.

        Parameters
        ----------
        params
            The run's CKKS parameters.
        value_bits
            Quantisation bits per value, 1..32.
        bound
            Public clamp bound ``B > 0``.
        max_clients
            Most contributions per aggregate (>= 1).
        max_weight
            Largest per-client weight (> 0).
        digits_per_slot
            Force fewer digits per slot than fit (default: as many as fit).
        """
        problems: list[str] = []
        if not isinstance(value_bits, int) or isinstance(value_bits, bool) or not 1 <= value_bits <= 32:
            problems.append(f"value_bits must be an integer in [1, 32]. Found {value_bits!r}.")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            problems.append(f"bound must be a finite number > 0. Found {bound!r}.")
        if not isinstance(max_clients, int) or isinstance(max_clients, bool) or max_clients < 1:
            problems.append(f"max_clients must be an integer >= 1. Found {max_clients!r}.")
        if not (isinstance(max_weight, (int, float)) and math.isfinite(max_weight) and max_weight > 0):
            problems.append(f"max_weight must be a finite number > 0. Found {max_weight!r}.")
        if problems:
            raise ConfigError(problems, source="QuantizedPacking")
        levels = 2**value_bits - 1
        digit_max = max_clients * math.ceil(max_weight * levels)
        digit_bits = int(digit_max).bit_length()
        sigma = fresh_noise_std(params) * math.sqrt(max_clients)
        scale_bits = math.ceil(math.log2(2.0 * NOISE_TAIL_SIGMAS * sigma))
        capacity = min(params.data_modulus_bits - 2 - scale_bits, MAX_PACKED_BITS)
        fit = capacity // digit_bits
        if fit < 1:
            raise ConfigError(
                f"A {digit_bits}-bit digit (value_bits={value_bits}, max_clients={max_clients}, "
                f"max_weight={max_weight}) does not fit the {capacity}-bit slot capacity of these CKKS parameters.",
                source="QuantizedPacking",
            )
        if digits_per_slot is None:
            digits_per_slot = fit
        elif not isinstance(digits_per_slot, int) or not 1 <= digits_per_slot <= fit:
            raise ConfigError(
                f"digits_per_slot must be in [1, {fit}] for these parameters. Found {digits_per_slot!r}.",
                source="QuantizedPacking",
            )
        return cls(
            int(value_bits),
            float(bound),
            int(max_clients),
            float(max_weight),
            digit_bits,
            int(digits_per_slot),
            int(scale_bits),
        )

    @property
    def levels(self) -> int:
        """``L = 2**value_bits - 1``."""
        return 2**self.value_bits - 1

    @property
    def step(self) -> float:
        """Quantisation step in value units, ``2B / L``."""
        return 2.0 * self.bound / self.levels

    def error_bound(self, num_contributions: int, total_weight: float, stochastic: bool = False) -> float:
        """Worst-case absolute error of the decoded weighted mean (values within ``[-B, B]``).

        ``num_contributions * r * step / total_weight`` with ``r = 1/2`` (round to nearest) or
        ``1`` (stochastic rounding).
        """
        r = 1.0 if stochastic else 0.5
        return num_contributions * r * self.step / total_weight

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible description."""
        return {
            "value_bits": self.value_bits,
            "bound": self.bound,
            "max_clients": self.max_clients,
            "max_weight": self.max_weight,
            "digit_bits": self.digit_bits,
            "digits_per_slot": self.digits_per_slot,
            "scale_bits": self.scale_bits,
        }


def codec_id(
    params: CKKSParams,
    packing: QuantizedPacking | None,
    fixed_point_bits: int | None = None,
    weight_slot: bool = False,
) -> str:
    """Short public description of the encoding; the server rejects updates whose codec differs.

    ``/ws`` at the end: the last slot of every vector holds the contribution's weight.
    """
    ws = "/ws" if weight_slot else ""
    if packing is None:
        fp = f"/f{int(fixed_point_bits)}" if fixed_point_bits is not None else ""
        return f"exact/s{params.global_scale_bits}{fp}{ws}"
    p = packing
    return (
        f"packed/b{p.value_bits}/B{p.bound!r}/K{p.max_clients}/w{p.max_weight!r}"
        f"/d{p.digit_bits}x{p.digits_per_slot}/s{p.scale_bits}{ws}"
    )


def num_vectors(num_values: int, slots: int, packing: QuantizedPacking | None = None, weight_slot: bool = False) -> int:
    """Number of CKKS vectors (one ciphertext each) that ``num_values`` values need.

    With ``weight_slot`` the last slot of each vector carries the weight, not a value.
    """
    per = (slots - int(bool(weight_slot))) * (packing.digits_per_slot if packing is not None else 1)
    return -(-int(num_values) // per)


def weight_quantum(packing: QuantizedPacking | None, fixed_point_bits: int | None) -> float | None:
    """Grid of a weight carried in a weight slot: ``2**-16`` packed, ``2**-f`` fixed point, else none."""
    if packing is not None:
        return 2.0**-PACKED_WEIGHT_BITS
    if fixed_point_bits is not None:
        return 2.0 ** -int(fixed_point_bits)
    return None


def quantize_weight(
    weight: float, packing: QuantizedPacking | None = None, fixed_point_bits: int | None = None
) -> float:
    """``weight`` rounded to :func:`weight_quantum` (exactly representable; what a site signs and encrypts)."""
    w = float(weight)
    if not (math.isfinite(w) and w > 0):
        raise ValueError(f"weight must be a finite number > 0. Found {weight!r}.")
    q = weight_quantum(packing, fixed_point_bits)
    if q is None:
        return w
    bits = -math.frexp(q)[1] + 1  # q == 2**-bits
    wq = math.ldexp(round(math.ldexp(w, bits)), -bits)
    if wq <= 0:
        raise ValueError(f"weight {weight!r} rounds to 0 on the weight grid {q!r}.")
    return wq


def split_weight_slots(sums: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data slots concatenated, weight slot of each vector)`` of decrypted vectors with a weight slot."""
    s = np.asarray(sums, dtype=np.float64).reshape(-1, slots)
    return s[:, :-1].reshape(-1), s[:, -1].copy()


def grid_residual(values: np.ndarray, step_bits: int) -> float:
    """Largest distance, in grid steps, of ``values`` from the grid ``2**-step_bits`` (0 for an empty array)."""
    v = np.ldexp(np.asarray(values, dtype=np.float64), int(step_bits))
    return float(np.max(np.abs(v - np.rint(v)))) if v.size else 0.0


def exact_capacity(params: CKKSParams) -> float:
    """Largest absolute weighted *sum* an exact-mode slot can hold: ``2**(data_bits - 2 - scale_bits)``."""
    return float(2.0 ** (params.data_modulus_bits - 2 - params.global_scale_bits))


def exact_error_bound(params: CKKSParams, num_contributions: int, total_weight: float = 1.0) -> float:
    """High-probability bound on the exact-mode error of the decrypted weighted mean.

    ``10 * fresh_noise_std * sqrt(n) / 2**global_scale_bits / total_weight`` (per coordinate,
    exceeded with probability < 2**-75 under the noise model of :func:`fresh_noise_std`).
    """
    sigma = fresh_noise_std(params) * math.sqrt(max(1, num_contributions))
    return NOISE_TAIL_SIGMAS * sigma / 2.0**params.global_scale_bits / total_weight


def fixed_point_bits_for(params: CKKSParams, max_clients: int) -> int:
    """Fractional bits ``f`` of the fixed-point exact encoding for up to ``max_clients`` contributions.

    In fixed-point mode every weighted value is rounded to a multiple of ``2**-f`` before it is
    encrypted, and every decrypted sum is rounded back to that grid.  The sum of ``K`` fresh
    ciphertexts carries a CKKS error of std ``fresh_noise_std * sqrt(K) / 2**s`` in value units;
    ``f`` is the largest value with ``2**-(f+1) >= 10 * that std``, so the rounding recovers the
    exact sum unless the error exceeds ten standard deviations (probability < 2**-75 per slot).

    The decrypted value is then an exact function of the plaintexts: it carries nothing of the
    CKKS error, which is what IND-CPA-D key-recovery attacks on approximate decryption exploit
    (Li and Micciancio, EUROCRYPT 2021).  See :func:`fixed_point_failure_bound`.
    """
    if not isinstance(max_clients, int) or max_clients < 1:
        raise ValueError(f"max_clients must be an integer >= 1. Found {max_clients!r}.")
    err = NOISE_TAIL_SIGMAS * fresh_noise_std(params) * math.sqrt(max_clients) / 2.0**params.global_scale_bits
    f = math.floor(-math.log2(2.0 * err))
    if f < 1:
        raise ConfigError(f"CKKS parameters leave no fixed-point precision for {max_clients} clients.")
    return int(f)


def fixed_point_failure_bound(params: CKKSParams, num_contributions: int, fixed_point_bits: int) -> float:
    """Upper bound on the probability that one slot of a fixed-point sum decodes wrongly.

    Gaussian tail ``P(|N(0, sigma^2)| > 2**-(f+1))`` with ``sigma`` the (doubled) CKKS error std of
    ``num_contributions`` summed fresh ciphertexts; ``erfc`` underflows to 0 far below 2**-1000.
    """
    sigma = fresh_noise_std(params) * math.sqrt(max(1, num_contributions)) / 2.0**params.global_scale_bits
    t = 2.0 ** -(fixed_point_bits + 1) / sigma
    return math.erfc(t / math.sqrt(2.0))


def packed_failure_bound(params: CKKSParams, packing: QuantizedPacking, num_contributions: int) -> float:
    """Upper bound on the probability that one slot of a packed sum decodes to a wrong integer.

    Gaussian tail ``P(|N(0, sigma^2)| > 1/2)`` with ``sigma`` the (doubled) CKKS error std of
    ``num_contributions`` summed fresh ciphertexts at the packing's scale.
    """
    sigma = fresh_noise_std(params) * math.sqrt(max(1, num_contributions)) / 2.0**packing.scale_bits
    return math.erfc(0.5 / sigma / math.sqrt(2.0))


def _check_vector(vector: np.ndarray) -> np.ndarray:
    vec = np.asarray(vector, dtype=np.float64)
    if vec.ndim != 1 or vec.size == 0:
        raise ValueError(f"Expected a non-empty 1-D vector; got shape {vec.shape}.")
    if not np.all(np.isfinite(vec)):
        raise ValueError("The update vector contains NaN or infinite values.")
    return vec


def encode_chunks(
    vector: np.ndarray,
    weight: float,
    slots: int,
    packing: QuantizedPacking | None = None,
    rng: np.random.Generator | None = None,
    params: CKKSParams | None = None,
    max_clients: int | None = None,
    fixed_point_bits: int | None = None,
    weight_slot: bool = False,
) -> list[np.ndarray]:
    """Weight a flat update and cut it into slot vectors ready for encryption.

    Parameters
    ----------
    vector
        The (clipped, noised) flat update.
    weight
        Client weight (> 0; at most ``packing.max_weight`` when packed).
    slots
        Slots per ciphertext.
    packing
        ``None`` for exact encoding, else the packing.
    rng
        Packed mode only: a generator for unbiased stochastic rounding; ``None`` rounds to nearest.
    params, max_clients
        Exact mode only (optional): refuse weighted values whose sum over ``max_clients`` clients
        could exceed :func:`exact_capacity`.
    fixed_point_bits
        Exact mode only (optional): round the weighted values to multiples of ``2**-f``
        (see :func:`fixed_point_bits_for`).
    weight_slot
        Put the weight itself (rounded by :func:`quantize_weight`; packed: as the integer
        ``w * 2**16``) into the last slot of every vector, so that the weight travels inside the
        same ciphertexts as the weighted values and the decrypted sum carries the total weight.

    Returns
    -------
    list of numpy.ndarray
        ``num_vectors(...)`` arrays of length ``slots`` (zero padded).
    """
    vec = _check_vector(vector)
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a finite number > 0. Found {weight!r}.")
    if weight_slot:  # the weight in the slot and the weight the values are multiplied by must agree exactly
        weight = quantize_weight(weight, packing, fixed_point_bits)
    n = vec.size
    if packing is None:
        data = vec * float(weight)
        if params is not None and max_clients is not None:
            limit = exact_capacity(params) / max_clients
            if float(np.max(np.abs(data))) >= limit:
                raise ValueError(
                    f"Weighted values must stay below {limit:g} in magnitude so that {max_clients} "
                    "contributions fit the exact-mode CKKS range; lower the weight or use normalised weights."
                )
        if fixed_point_bits is not None:  # exact multiples of 2**-f (powers of two: no float error)
            data = np.ldexp(np.rint(np.ldexp(data, int(fixed_point_bits))), -int(fixed_point_bits))
        return _lay_out(data, slots, weight_slot, quantize_weight(weight, None, fixed_point_bits))
    if weight > packing.max_weight * (1 + 1e-12):
        raise ValueError(f"weight {weight!r} exceeds the packing's max_weight {packing.max_weight!r}.")
    levels = packing.levels
    u = (np.clip(vec, -packing.bound, packing.bound) + packing.bound) * (levels / (2.0 * packing.bound))
    z = u * float(weight)
    if rng is None:
        zi = np.floor(z + 0.5)
    else:
        zi = np.floor(z + rng.random(z.shape))
    zi = np.clip(zi, 0, math.ceil(packing.max_weight * levels)).astype(np.int64)
    k, d = packing.digits_per_slot, packing.digit_bits
    nslots = -(-n // k)
    digits = np.zeros(nslots * k, dtype=np.int64)
    digits[:n] = zi
    digits = digits.reshape(-1, k)
    shifts = np.arange(k, dtype=np.int64) * d
    packed = np.sum(digits << shifts, axis=1)  # < 2**(k*d) <= 2**46: exact in int64 and float64
    wslot = float(round(quantize_weight(weight, packing) * 2**PACKED_WEIGHT_BITS))
    if weight_slot and packing.max_clients * packing.max_weight * 2**PACKED_WEIGHT_BITS >= 2.0 ** (k * d):
        raise ValueError("The packing's slots are too small to carry max_clients weights in the weight slot.")
    return _lay_out(packed.astype(np.float64), slots, weight_slot, wslot)


def _lay_out(data: np.ndarray, slots: int, weight_slot: bool, weight_value: float) -> list[np.ndarray]:
    """Cut slot values into zero-padded vectors of ``slots``; with ``weight_slot`` the last slot holds the weight."""
    per = slots - int(bool(weight_slot))
    nvec = -(-data.size // per)
    body = np.zeros(nvec * per, dtype=np.float64)
    body[: data.size] = data
    body = body.reshape(nvec, per)
    if weight_slot:
        body = np.concatenate([body, np.full((nvec, 1), float(weight_value))], axis=1)
    return list(body)


def decode_sums(
    sums: np.ndarray,
    num_values: int,
    total_weight: float,
    packing: QuantizedPacking | None = None,
    fixed_point_bits: int | None = None,
) -> np.ndarray:
    """Turn decrypted slot sums into the weighted mean.

    Parameters
    ----------
    sums
        Concatenated decrypted slots of every vector, in order.
    num_values
        Length of the model vector.
    total_weight
        Sum of the weights of the contributions in the aggregate.
    packing
        The packing used to encode, or ``None``.
    fixed_point_bits
        Exact mode: round the sums back to the ``2**-f`` grid they were encoded on.

    Raises
    ------
    CiphertextError
        Packed mode: a decoded slot lies outside ``[0, 2**(k d))`` (too many contributions or too
        large weights overflowed the digits).
    """
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise ValueError(f"total_weight must be a finite number > 0. Found {total_weight!r}.")
    s = np.asarray(sums, dtype=np.float64).reshape(-1)
    if packing is None:
        if s.size < num_values:
            raise CiphertextError(f"Decrypted {s.size} slots; need {num_values}.")
        s = s[:num_values]
        if fixed_point_bits is not None:
            s = np.ldexp(np.rint(np.ldexp(s, int(fixed_point_bits))), -int(fixed_point_bits))
        return s / total_weight
    digit_sums = packed_digit_sums(s, num_values, packing).astype(np.float64)
    return digit_sums / total_weight * packing.step - packing.bound


def packed_digit_sums(sums: np.ndarray, num_values: int, packing: QuantizedPacking) -> np.ndarray:
    """The per-value integer sums ``sum_k z_k`` held in decrypted packed slots (int64, length ``num_values``).

    Raises
    ------
    CiphertextError
        A decoded slot lies outside ``[0, 2**(k d))`` (too many contributions or too large weights
        overflowed the digits).
    """
    s = np.asarray(sums, dtype=np.float64).reshape(-1)
    k, d = packing.digits_per_slot, packing.digit_bits
    need = -(-num_values // k)
    if s.size < need:
        raise CiphertextError(f"Decrypted {s.size} slots; need {need} for {num_values} packed values.")
    s = s[:need]
    xi = np.rint(s)
    residual = float(np.max(np.abs(s - xi))) if s.size else 0.0
    if residual > 0.25:
        warnings.warn(
            f"Packed CKKS decode residual {residual:.3f} exceeds 0.25: the noise budget is nearly exhausted "
            "(more contributions than max_clients?).",
            stacklevel=2,
        )
    if np.any(xi < 0) or np.any(xi >= 2.0 ** (k * d)):
        raise CiphertextError(
            "Packed aggregate decoded outside its digit range: more contributions or larger weights "
            f"than the packing allows (max_clients={packing.max_clients}, max_weight={packing.max_weight})."
        )
    xi = xi.astype(np.int64)
    mask = (1 << d) - 1
    shifts = np.arange(k, dtype=np.int64) * d
    return ((xi[:, None] >> shifts) & mask).reshape(-1)[:num_values]


def delta_packing(params: CKKSParams, max_clients: int, bound: float, value_bits: int = 0) -> QuantizedPacking:
    """The packing of the Flower path's delta protocol: weights normalised to at most 1, 3 values per slot.

    ``value_bits = 0`` picks the most bits per value that still fit three values per slot (with the
    weight slot), e.g. 12 bits for up to 4 contributions and 11 bits for up to 8, i.e. about
    10.7 bytes per model value with the default preset.
    """
    if value_bits:
        return QuantizedPacking.for_params(params, int(value_bits), float(bound), int(max_clients), 1.0)
    best = None
    for bits in range(4, 17):
        try:
            p = QuantizedPacking.for_params(params, bits, float(bound), int(max_clients), 1.0)
        except ConfigError:
            break
        if p.digits_per_slot < 3:
            break
        best = p
    if best is None:
        raise ConfigError(
            f"No packing holds 3 values per slot for {max_clients} contributions with these CKKS parameters.",
            source="delta_packing",
        )
    return best
