"""Flattening, quantised multi-value packing, its precision budget, and bytes on the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fedvlp.encryption import (
    QuantizedPacking,
    decode_sums,
    encode_chunks,
    encrypt_update,
    flatten_update,
    init_keys,
    load_client_context,
    num_vectors,
    preset,
    unflatten_update,
)
from secure_fedvlp.encryption.packing import MAX_PACKED_BITS, UpdateLayout
from secure_fedvlp.errors import CiphertextError, ConfigError

PARAMS = preset()


# ------------------------------------------------------------------------------------- layout
def test_flatten_roundtrip_dict_keeps_names_shapes_dtypes():
    rng = np.random.default_rng(0)
    upd = {
        "conv.weight": rng.normal(size=(3, 2, 2)).astype(np.float32),
        "bias": rng.normal(size=(3,)).astype(np.float64),
        "scale": np.array(1.5, dtype=np.float16),
    }
    flat, layout = flatten_update(upd)
    assert flat.dtype == np.float64 and flat.size == 12 + 3 + 1 == layout.num_values
    back = unflatten_update(flat, layout)
    assert list(back) == list(upd)
    for k in upd:
        assert back[k].dtype == upd[k].dtype and back[k].shape == upd[k].shape
        np.testing.assert_array_equal(back[k], upd[k])
    assert UpdateLayout.from_dict(layout.to_dict()) == layout


def test_flatten_roundtrip_list_and_layout_hash():
    arrs = [np.ones((2, 3)), np.zeros(4)]
    flat, layout = flatten_update(arrs)
    back = unflatten_update(flat, layout)
    assert isinstance(back, list) and [a.shape for a in back] == [(2, 3), (4,)]
    _, other = flatten_update([np.ones((3, 2)), np.zeros(4)])
    assert layout.layout_hash() == flatten_update(arrs)[1].layout_hash()
    assert layout.layout_hash() != other.layout_hash()


def test_flatten_rejects_bad_input():
    with pytest.raises(TypeError, match="floating"):
        flatten_update({"steps": np.arange(3)})
    with pytest.raises(ValueError, match="NaN"):
        flatten_update({"w": np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="empty"):
        flatten_update({})
    _, layout = flatten_update([np.ones(3)])
    with pytest.raises(ValueError, match="layout needs 3"):
        unflatten_update(np.ones(4), layout)


# ----------------------------------------------------------------------------- precision budget
@pytest.mark.parametrize("bits,clients", [(8, 4), (10, 8), (12, 16), (7, 4), (16, 64)])
def test_packing_fits_the_slot_budget(bits, clients):
    p = QuantizedPacking.for_params(PARAMS, bits, 1.0, clients)
    assert 2**p.digit_bits > clients * (2**bits - 1)  # digit sums never carry
    assert p.digits_per_slot * p.digit_bits + p.scale_bits <= PARAMS.data_modulus_bits - 2  # < q0 / 2
    assert p.digits_per_slot * p.digit_bits <= MAX_PACKED_BITS  # exact in float64
    # The scale covers 10 sigma of the summed noise, with the noise model already doubled.
    from secure_fedvlp.encryption.params import fresh_noise_std

    assert 2 ** (p.scale_bits - 1) >= 10 * fresh_noise_std(PARAMS) * math.sqrt(clients)


def test_packing_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match="does not fit"):
        QuantizedPacking.for_params(PARAMS, 32, 1.0, 2**20)
    with pytest.raises(ConfigError) as ei:
        QuantizedPacking.for_params(PARAMS, 0, -1.0, 0, max_weight=float("nan"))
    assert len(ei.value.problems) == 4


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 50),
    k=st.integers(1, 8),
    bits=st.sampled_from([6, 8, 10, 12]),
    seed=st.integers(0, 2**16),
    stochastic=st.booleans(),
)
def test_packed_plaintext_sum_decodes_within_bound(n, k, bits, seed, stochastic):
    """Without encryption: slot-wise sums of packed chunks decode to the weighted mean within the bound."""
    rng = np.random.default_rng(seed)
    p = QuantizedPacking.for_params(PARAMS, bits, 2.0, 8)
    vals = rng.uniform(-2, 2, size=(k, n))
    ws = rng.uniform(0.05, 1.0, size=k)
    sums = None
    for v, w in zip(vals, ws, strict=True):
        chunks = np.concatenate(encode_chunks(v, float(w), 16, p, rng if stochastic else None))
        sums = chunks if sums is None else sums + chunks
    out = decode_sums(sums, n, float(ws.sum()), p)
    ref = (ws[:, None] * vals).sum(0) / ws.sum()
    assert np.max(np.abs(out - ref)) <= p.error_bound(k, float(ws.sum()), stochastic) + 1e-12


def test_stochastic_rounding_is_unbiased():
    p = QuantizedPacking.for_params(PARAMS, 4, 1.0, 4)
    rng = np.random.default_rng(1)
    v = np.full(20000, 0.123)
    dec = decode_sums(np.concatenate(encode_chunks(v, 1.0, 4096, p, rng)), v.size, 1.0, p)
    assert abs(dec.mean() - 0.123) < 3 * p.step / math.sqrt(v.size)
    det = decode_sums(np.concatenate(encode_chunks(v, 1.0, 4096, p, None)), v.size, 1.0, p)
    assert abs(det.mean() - 0.123) <= p.step / 2  # round to nearest: biased but within half a step


def test_values_outside_bound_are_clamped():
    p = QuantizedPacking.for_params(PARAMS, 8, 1.0, 2)
    out = decode_sums(np.concatenate(encode_chunks(np.array([5.0, -7.0, 0.5]), 1.0, 8, p)), 3, 1.0, p)
    np.testing.assert_allclose(out, [1.0, -1.0, 0.5], atol=p.step / 2)


def test_overflow_detected_on_decode():
    p = QuantizedPacking.for_params(PARAMS, 8, 1.0, 2)
    with pytest.raises(CiphertextError, match="digit range"):
        decode_sums(np.array([2.0 ** (p.digits_per_slot * p.digit_bits)]), 1, 1.0, p)


def test_weight_above_max_weight_refused():
    p = QuantizedPacking.for_params(PARAMS, 8, 1.0, 2, max_weight=1.0)
    with pytest.raises(ValueError, match="max_weight"):
        encode_chunks(np.zeros(3), 2.0, 8, p)


def test_num_vectors():
    p = QuantizedPacking.for_params(PARAMS, 10, 1.0, 8)
    assert num_vectors(4096, 4096) == 1 and num_vectors(4097, 4096) == 2
    assert num_vectors(3 * 4096, 4096, p) == 1 and num_vectors(3 * 4096 + 1, 4096, p) == 2


# ---------------------------------------------------------------------------- bytes on the wire
def test_bytes_per_value_plain_vs_packed(tmp_path):
    """Measured: len(serialised ciphertexts) / model values, at full vectors (no padding)."""
    b = init_keys(tmp_path, ["a"], PARAMS)
    ctx = load_client_context(b.client_paths["a"])
    p3 = QuantizedPacking.for_params(PARAMS, 10, 1.0, 8)
    p4 = QuantizedPacking.for_params(PARAMS, 7, 1.0, 4)
    assert (p3.digits_per_slot, p4.digits_per_slot) == (3, 4)
    rng = np.random.default_rng(0)
    for packing, lo, hi in [(None, 30.0, 33.0), (p3, 9.5, 11.0), (p4, 7.5, 8.3)]:
        n = 2 * PARAMS.slots * (packing.digits_per_slot if packing else 1)
        upd = encrypt_update(ctx, rng.uniform(-1, 1, n), 1.0, 0, packing=packing)
        per_value = upd.nbytes / n
        assert lo <= per_value <= hi, (packing, per_value)
        assert len(upd.to_bytes()) - upd.nbytes < 1024  # envelope overhead is small
