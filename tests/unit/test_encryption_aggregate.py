"""Encrypted weighted aggregation: correctness, dropout, and dropping bad contributions with reasons."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_fedvlp.encryption import (
    AggregateCiphertext,
    EncryptedUpdate,
    QuantizedPacking,
    add_plaintext_noise,
    aggregate_encrypted,
    decrypt_aggregate,
    encrypt_update,
    exact_error_bound,
    flooding_sigma,
    init_keys,
    load_client_context,
    load_server_context,
    noise_flood_for_export,
    preset,
    validate,
)
from secure_fedvlp.errors import CiphertextError, KeyMaterialError

PARAMS = preset()
IDS = ["c0", "c1", "c2", "c3"]
PACKING = QuantizedPacking.for_params(PARAMS, 10, 1.0, 8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    b = init_keys(tmp_path_factory.mktemp("keys"), IDS, PARAMS)
    clients = {cid: load_client_context(p) for cid, p in b.client_paths.items()}
    return b, clients, load_server_context(b.server_path)


def _encrypt_all(clients, vals, weights, round_id=1, packing=None, **kw):
    return {
        cid: encrypt_update(clients[cid], v, w, round_id, client_id=cid, packing=packing, **kw).to_bytes()
        for cid, v, w in zip(IDS, vals, weights, strict=False)
    }


def _mean(vals, weights):
    w = np.asarray(weights, dtype=float)
    return (w[:, None] * np.asarray(vals)).sum(0) / w.sum()


# ------------------------------------------------------------------------------- correctness
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 4),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_encrypted_aggregate_matches_plaintext_weighted_mean(run, n, k, packed, seed):
    _, clients, server = run
    rng = np.random.default_rng(seed)
    vals = rng.uniform(-1, 1, size=(k, n))
    weights = rng.uniform(0.1, 1.0, size=k).tolist()
    packing = PACKING if packed else None
    ups = _encrypt_all(clients, vals, weights, packing=packing)
    res = aggregate_encrypted(server, ups, round_id=1, num_values=n, packing=packing)
    assert res.rejected == {} and res.accepted == IDS[:k]
    assert res.aggregate.total_weight == pytest.approx(sum(weights))
    out = decrypt_aggregate(clients["c0"], res.aggregate, packing=packing)
    bound = PACKING.error_bound(k, sum(weights)) if packed else exact_error_bound(PARAMS, k, sum(weights))
    assert np.max(np.abs(out - _mean(vals, weights))) <= bound


def test_dropout_aggregates_those_who_replied_with_their_weights(run):
    _, clients, server = run
    rng = np.random.default_rng(7)
    vals = rng.uniform(-1, 1, size=(4, 500))
    weights = [0.2, 0.9, 0.5, 0.7]
    ups = _encrypt_all(clients, vals, weights)
    del ups["c2"]  # c2 dropped out
    res = aggregate_encrypted(server, ups, round_id=1, num_values=500)
    assert res.accepted == ["c0", "c1", "c3"] and res.rejected == {}
    assert res.aggregate.contributors == ("c0", "c1", "c3")
    out = decrypt_aggregate(clients["c3"], res.aggregate)
    keep = [0, 1, 3]
    np.testing.assert_allclose(out, _mean(vals[keep], [weights[i] for i in keep]), atol=1e-5)


def test_encrypted_weight_option(run):
    _, clients, server = run
    rng = np.random.default_rng(3)
    vals = rng.uniform(-1, 1, size=(3, 100))
    weights = [3.0, 10.0, 7.0]
    ups = {
        cid: encrypt_update(clients[cid], v, w, 2, client_id=cid, encrypt_weight=True)
        for cid, v, w in zip(IDS, vals, weights, strict=False)
    }
    assert all(u.weight is None for u in ups.values())
    res = aggregate_encrypted(server, ups, round_id=2, num_values=100, encrypted_weight=True)
    assert res.rejected == {} and res.aggregate.total_weight is None
    agg = AggregateCiphertext.from_bytes(res.aggregate.to_bytes(), clients["c1"])
    np.testing.assert_allclose(decrypt_aggregate(clients["c1"], agg), _mean(vals, weights), atol=1e-5)
    # A clear-weight aggregation rejects them.
    res2 = aggregate_encrypted(server, ups, round_id=2, num_values=100)
    assert res2.aggregate is None and all("encrypted weight" in r for r in res2.rejected.values())


def test_server_cannot_decrypt_the_aggregate(run):
    _, clients, server = run
    ups = _encrypt_all(clients, np.ones((2, 10)), [1.0, 1.0])
    res = aggregate_encrypted(server, ups, round_id=1, num_values=10)
    with pytest.raises(KeyMaterialError, match="no secret key"):
        decrypt_aggregate(server, res.aggregate)
    with pytest.raises(ValueError, match="secret_key"):
        res.aggregate.vectors[0].decrypt()
    roundtrip = AggregateCiphertext.from_bytes(res.aggregate.to_bytes(), server)
    np.testing.assert_allclose(decrypt_aggregate(clients["c2"], roundtrip), np.ones(10), atol=1e-5)


# ---------------------------------------------------------------------------- bad contributions
def test_each_bad_update_is_dropped_with_its_reason_and_the_rest_aggregate(run, tmp_path):
    b, clients, server = run
    n = 200
    rng = np.random.default_rng(11)
    vals = rng.uniform(-1, 1, size=(4, n))
    good = {cid: encrypt_update(clients[cid], v, 1.0, 5, client_id=cid) for cid, v in zip(IDS, vals, strict=False)}
    good_bytes = {cid: u.to_bytes() for cid, u in good.items()}

    other = init_keys(tmp_path / "other", ["x"], PARAMS)  # another run's context, same parameters
    other_ctx = load_client_context(other.client_paths["x"])
    blob = good_bytes["c0"]
    corrupted = bytearray(blob)
    corrupted[len(blob) // 2] ^= 0x5A
    garbage_ct = dataclasses.replace(good["c0"], client_id="garbage", ciphertexts=(b"\x08\x01" + b"\x00" * 64,))

    bad = {
        "truncated": blob[: len(blob) // 3],
        "corrupted": bytes(corrupted),
        "foreign": encrypt_update(other_ctx, vals[0], 1.0, 5, client_id="foreign").to_bytes(),
        "short": encrypt_update(clients["c0"], vals[0][: n - 1], 1.0, 5, client_id="short").to_bytes(),
        "long": encrypt_update(clients["c0"], np.ones(PARAMS.slots + 1), 1.0, 5, client_id="long").to_bytes(),
        "replay": encrypt_update(clients["c0"], vals[0], 1.0, 4, client_id="replay").to_bytes(),
        "future": encrypt_update(clients["c0"], vals[0], 1.0, 6, client_id="future").to_bytes(),
        "garbage": garbage_ct,
        "impostor": good_bytes["c1"],  # c1's update re-sent under another sender id
        "packed": encrypt_update(clients["c0"], vals[0], 1.0, 5, client_id="packed", packing=PACKING),
        "badweight": dataclasses.replace(good["c0"], client_id="badweight", weight=-1.0),
        "notbytes": 12345,
    }
    res = aggregate_encrypted(server, {**good_bytes, **bad}, round_id=5, num_values=n)
    assert res.accepted == sorted(IDS)
    expected_reason = {
        "truncated": "truncated",
        "corrupted": "corrupted",
        "foreign": "another context",
        "short": "num_values 199",
        "long": "ciphertexts where 1 are expected",
        "replay": "replay",
        "future": "later than the current round",
        "garbage": "does not deserialise",
        "impostor": "arrived from 'impostor'",
        "packed": "codec",
        "badweight": "weight -1.0",
        "notbytes": "expected bytes",
    }
    assert set(res.rejected) == set(expected_reason)
    for sender, needle in expected_reason.items():
        assert needle in res.rejected[sender], (sender, res.rejected[sender])
    np.testing.assert_allclose(decrypt_aggregate(clients["c0"], res.aggregate), vals.mean(0), atol=1e-5)


def test_from_bytes_names_what_is_wrong(run):
    _, clients, _ = run
    blob = encrypt_update(clients["c0"], np.zeros(5), 1.0, 0).to_bytes()
    with pytest.raises(CiphertextError, match="truncated"):
        EncryptedUpdate.from_bytes(blob[:10])
    with pytest.raises(CiphertextError, match="bad magic"):
        EncryptedUpdate.from_bytes(b"X" * len(blob))
    with pytest.raises(CiphertextError, match="trailing|corrupted|truncated"):
        EncryptedUpdate.from_bytes(blob + b"\x00")
    assert EncryptedUpdate.from_bytes(blob) == EncryptedUpdate.from_bytes(blob)


def test_validate_collects_metadata_problems(run, tmp_path):
    _, clients, server = run
    upd = encrypt_update(clients["c0"], np.zeros(5), 1.0, 1, stage="align")
    with pytest.raises(CiphertextError) as ei:
        validate(upd, server, expected_round=3, expected_num_values=6, expected_stage="full")
    msg = str(ei.value)
    assert "replay" in msg and "num_values 5" in msg and "stage 'align'" in msg
    vectors, wvec = validate(upd, server, expected_round=1, expected_num_values=5)
    assert len(vectors) == 1 and wvec is None


def test_all_rejected_gives_no_aggregate(run):
    _, clients, server = run
    ups = {"c0": encrypt_update(clients["c0"], np.zeros(5), 1.0, 0, client_id="c0").to_bytes()}
    res = aggregate_encrypted(server, ups, round_id=1, num_values=5)
    assert res.aggregate is None and res.accepted == [] and "replay" in res.rejected["c0"]


def test_packing_capacity_surplus_is_rejected(run):
    _, clients, server = run
    p = QuantizedPacking.for_params(PARAMS, 8, 1.0, 2)
    ups = {cid: encrypt_update(clients[cid], np.full(7, 0.5), 1.0, 1, client_id=cid, packing=p) for cid in IDS[:3]}
    res = aggregate_encrypted(server, ups, round_id=1, num_values=7, packing=p)
    assert res.accepted == ["c0", "c1"] and "max_clients=2" in res.rejected["c2"]
    np.testing.assert_allclose(decrypt_aggregate(clients["c0"], res.aggregate, packing=p), 0.5, atol=p.step)


# --------------------------------------------------------------------------------- noise
def test_server_adds_plaintext_noise_in_ciphertext_domain(run):
    _, clients, server = run
    rng = np.random.default_rng(5)
    vals = rng.uniform(-1, 1, size=(2, 50))
    ups = _encrypt_all(clients, vals, [1.0, 3.0])
    res = aggregate_encrypted(server, ups, round_id=1, num_values=50)
    noise = rng.normal(0, 2.0, size=50)
    noised = add_plaintext_noise(res.aggregate, noise)
    assert noised.noised and not res.aggregate.noised
    out = decrypt_aggregate(clients["c0"], noised)
    np.testing.assert_allclose(out, _mean(vals, [1.0, 3.0]) + noise / 4.0, atol=1e-5)
    with pytest.raises(ValueError, match="49 values"):
        add_plaintext_noise(res.aggregate, noise[:49])
    packed = aggregate_encrypted(
        server, _encrypt_all(clients, vals, [1.0, 1.0], packing=PACKING), round_id=1, num_values=50, packing=PACKING
    )
    with pytest.raises(CiphertextError, match="packed"):
        add_plaintext_noise(packed.aggregate, noise)


def test_noise_flood_for_export():
    g = np.random.default_rng(0)
    vals = np.zeros((100, 100))
    out = noise_flood_for_export(vals, 0.5, g)
    assert out.shape == vals.shape and abs(out.std() - 0.5) < 0.02 and np.all(vals == 0)
    with pytest.raises(TypeError, match="Generator"):
        noise_flood_for_export(vals, 0.5, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma_flood"):
        noise_flood_for_export(vals, 0.0, g)
    assert flooding_sigma(1e-6, 40) == pytest.approx(1e-6 * 2**39)
    assert flooding_sigma(1e-6, 40, num_releases=10) == pytest.approx(1e-5 * 2**39)


def test_ckks_vector_api_only(run):
    _, clients, _ = run
    upd = encrypt_update(clients["c0"], np.zeros(3), 1.0, 0)
    assert isinstance(ts.ckks_vector_from(clients["c0"].context, upd.ciphertexts[0]), ts.CKKSVector)


def test_packed_aggregate_exact_at_full_capacity(run):
    """max_clients contributions at the top of the range and max_weight: digits fill up but never carry."""
    _, clients, server = run
    p = QuantizedPacking.for_params(PARAMS, 10, 1.0, 8)
    n = PARAMS.slots * p.digits_per_slot
    ups = {
        f"s{i}": encrypt_update(
            clients["c0"], np.full(n, 1.0 if i % 2 else 0.999), 1.0, 1, client_id=f"s{i}", packing=p
        )
        for i in range(8)
    }
    res = aggregate_encrypted(server, ups, round_id=1, num_values=n, packing=p)
    assert res.rejected == {}
    out = decrypt_aggregate(clients["c1"], res.aggregate, packing=p)
    assert np.max(np.abs(out - (1.0 + 0.999) / 2)) <= p.error_bound(8, 8.0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 300), k=st.integers(1, 4), seed=st.integers(0, 2**16), noised=st.booleans())
def test_fixed_point_decryption_is_exact(run, n, k, seed, noised):
    """Fixed-point exact mode: the decrypted sum equals the sum of the grid-rounded weighted values
    bit for bit (the CKKS error is rounded away), also after server-side plaintext noise, and
    the weighted mean is within k * 2^-(f+1) / W of the float mean."""
    from secure_fedvlp.encryption.packing import fixed_point_bits_for

    _, clients, server = run
    f = fixed_point_bits_for(PARAMS, 8)
    rng = np.random.default_rng(seed)
    vals = rng.normal(0, 2, size=(k, n))
    weights = rng.uniform(1.0, 300.0, size=k).tolist()
    ups = _encrypt_all(clients, vals, weights, fixed_point_bits=f)
    res = aggregate_encrypted(server, ups, round_id=1, num_values=n, fixed_point_bits=f)
    agg = res.aggregate
    grid = [np.ldexp(np.rint(np.ldexp(np.asarray(v) * w, f)), -f) for v, w in zip(vals, weights, strict=True)]
    expected_sum = np.sum(grid, axis=0)
    if noised:
        noise = rng.normal(0, 3.0, size=n)
        agg = add_plaintext_noise(agg, noise)
        expected_sum = expected_sum + np.ldexp(np.rint(np.ldexp(noise, f)), -f)
    out = decrypt_aggregate(clients["c1"], agg, fixed_point_bits=f)
    assert np.array_equal(out * sum(weights), expected_sum) or np.allclose(
        out, expected_sum / sum(weights), rtol=0, atol=1e-15
    )
    if not noised:
        assert np.max(np.abs(out - _mean(vals, weights))) <= k * 2.0 ** -(f + 1) / sum(weights) + 1e-12
    with pytest.raises(CiphertextError, match="codec"):  # the grid is part of the codec
        decrypt_aggregate(clients["c1"], agg)


# ---------------------------------------------------------------------- signed contributions
SIGNED_FIELDS = {
    "round": {"round_id": 2},
    "stage": {"stage": "align"},
    "site": {"client_id": "c1"},
    "weight": {"weight": 0.75},
    "layout": {"layout_hash": "f" * 32},
    "codec": {"codec": "exact/s30/f16"},
    "nonce": {"nonce": "1" * 32},
    "num_values": {"num_values": 11},
    "fingerprint": {"fingerprint": "0" * 32},
}


@pytest.mark.parametrize("field", sorted(SIGNED_FIELDS) + ["ciphertext"])
def test_changing_any_signed_field_or_the_ciphertext_breaks_the_signature(run, field):
    """A signed contribution verifies as sent; a copy with any header field or ciphertext byte changed does not."""
    from secure_fedvlp.encryption import load_signing_public_keys
    from secure_fedvlp.encryption.auth import verify_statement

    b, clients, server = run
    keys = load_signing_public_keys(b.out_dir, server.fingerprint)
    upd = encrypt_update(
        clients["c0"], np.ones(10), 0.5, 1, stage="full", weight_slot=True, fixed_point_bits=16, nonce="a" * 32
    )
    verify_statement(EncryptedUpdate.from_bytes(upd.to_bytes()).signed_header(), keys, "c0")
    if field == "ciphertext":
        ct = bytearray(upd.ciphertexts[0])
        ct[-5] ^= 1
        bad = dataclasses.replace(upd, ciphertexts=(bytes(ct),))
    else:
        bad = dataclasses.replace(upd, **SIGNED_FIELDS[field])
    with pytest.raises(CiphertextError):
        verify_statement(bad.signed_header(), keys, bad.client_id or "c0")


# --------------------------------------------------------------------------- the delta protocol
def _signed_round(run, vals, weights, round_id, packing=None, fixed_point_bits=None, ids=None):
    from secure_fedvlp.encryption import ReplayGuard, load_signing_public_keys, new_nonce

    b, clients, server = run
    keys = load_signing_public_keys(b.out_dir, server.fingerprint)
    ids = ids or IDS[: len(vals)]
    nonces = {cid: new_nonce() for cid in ids}
    ups = {
        cid: encrypt_update(
            clients[cid],
            v,
            w,
            round_id,
            stage="full",
            packing=packing,
            fixed_point_bits=fixed_point_bits,
            weight_slot=True,
            nonce=nonces[cid],
        )
        for cid, v, w in zip(ids, vals, weights, strict=True)
    }
    res = aggregate_encrypted(
        server,
        {c: u.to_bytes() for c, u in ups.items()},
        round_id=round_id,
        num_values=len(vals[0]),
        stage="full",
        packing=packing,
        fixed_point_bits=fixed_point_bits,
        weight_slot=True,
        public_keys=keys,
        nonces=nonces,
        replay=ReplayGuard(),
    )
    assert res.rejected == {}
    return res.aggregate, keys


@pytest.mark.parametrize("seed", [0, 1])
def test_delta_protocol_mean_equals_the_plaintext_mean_of_the_quantised_updates_bit_for_bit(run, seed):
    """The decrypted mean of packed, signed, weighted deltas equals, bit for bit, the plaintext mean computed from
    the same quantised integers; against the float mean of the clipped deltas it is within the stated bound
    ``n * step / 2 / W``."""
    from secure_fedvlp.encryption import check_and_decrypt
    from secure_fedvlp.encryption.packing import (
        decode_sums,
        delta_packing,
        encode_chunks,
        packed_digit_sums,
        quantize_weight,
        split_weight_slots,
    )

    _, clients, _ = run
    packing = delta_packing(PARAMS, 4, 0.25)
    rng = np.random.default_rng(seed)
    n = 9000  # three vectors of 4095 x 3 values, the last one partly filled
    vals = [rng.uniform(-0.3, 0.3, n) for _ in range(3)]  # some beyond the bound: clipped
    raw = rng.uniform(1, 50, 3)
    weights = [quantize_weight(w / raw.max(), packing) for w in raw]
    agg, keys = _signed_round(run, vals, weights, 7, packing=packing)
    got = check_and_decrypt(clients["c2"], agg, keys, min_contributors=2, packing=packing)
    # the plaintext computation from the same integers
    ints = sum(
        packed_digit_sums(
            split_weight_slots(
                np.concatenate(encode_chunks(v, w, PARAMS.slots, packing, weight_slot=True)), PARAMS.slots
            )[0],
            n,
            packing,
        )
        for v, w in zip(vals, weights, strict=True)
    )
    want = decode_sums(
        np.concatenate([np.asarray(c, dtype=np.float64) for c in _repack(ints, packing, PARAMS.slots)]),
        n,
        float(sum(weights)),
        packing,
    )
    assert np.array_equal(got, want)
    clipped = [np.clip(v, -packing.bound, packing.bound) for v in vals]
    exact = sum(w * c for w, c in zip(weights, clipped, strict=True)) / sum(weights)
    assert np.max(np.abs(got - exact)) <= packing.error_bound(3, sum(weights)) * (1 + 1e-9)


def _repack(digit_sums, packing, slots):
    """Integer digit sums back into packed slot values (no weight slot), to decode them as the sites do."""
    k, d = packing.digits_per_slot, packing.digit_bits
    pad = np.zeros(-(-digit_sums.size // k) * k, dtype=np.int64)
    pad[: digit_sums.size] = digit_sums
    packed = np.sum(pad.reshape(-1, k) << (np.arange(k, dtype=np.int64) * d), axis=1)
    return [packed.astype(np.float64)]


def test_exact_codec_aggregates_are_checked_like_packed_ones(run, tmp_path):
    """Exact (fixed-point) codec: a foreign-key contribution, a scaled aggregate, a weight encrypted other than
    signed and an overflow of the modulus are each refused by check_and_decrypt with its reason."""
    from secure_fedvlp.encryption import check_and_decrypt
    from secure_fedvlp.encryption.auth import sign_statement

    b, clients, server = run
    f = 16
    rng = np.random.default_rng(0)
    vals = [rng.uniform(-1, 1, 500) for _ in range(3)]
    agg, keys = _signed_round(run, vals, [1.0, 2.0, 3.0], 8, fixed_point_bits=f)

    def check(a):
        return check_and_decrypt(clients["c0"], a, keys, min_contributors=2, fixed_point_bits=f, value_bound=1.0)

    check(agg)  # honest: accepted
    scaled = dataclasses.replace(agg, vectors=[v + v for v in agg.vectors])
    with pytest.raises(CiphertextError, match="decrypted total weight"):
        check(scaled)
    # a contribution under another CKKS key, fingerprint copied, signed by c1
    other = init_keys(tmp_path / "other", ["c1"], PARAMS)
    foreign = dataclasses.replace(
        load_client_context(other.client_paths["c1"]),
        fingerprint=server.fingerprint,
        context_id=clients["c1"].context_id,
        site="c1",
        signing_key=clients["c1"].signing_key,
    )
    mixed = dict(clients, c1=foreign)
    agg2, _ = _signed_round((b, mixed, server), vals, [1.0, 2.0, 3.0], 9, fixed_point_bits=f)
    with pytest.raises(CiphertextError, match="off their grid"):
        check(agg2)
    # weight 100 encrypted, weight 1 signed
    liar = encrypt_update(
        clients["c0"], vals[0], 100.0, 10, stage="full", fixed_point_bits=f, weight_slot=True, nonce="n" * 32
    )
    liar = dataclasses.replace(liar, weight=1.0)
    liar = dataclasses.replace(
        liar, signature=sign_statement(liar.signed_header(), clients["c0"].signing_key).signature
    )
    honest, _ = _signed_round(run, vals[1:], [2.0, 3.0], 10, fixed_point_bits=f, ids=["c1", "c2"])
    summed = dataclasses.replace(
        honest,
        vectors=[
            a + v
            for a, v in zip(
                honest.vectors, validate(liar, server, expected_round=10, expected_num_values=500)[0], strict=True
            )
        ],
        contributions=(liar.signed_header(), *honest.contributions),
        contributors=("c0", *honest.contributors),
        total_weight=1.0 + honest.total_weight,
    )
    with pytest.raises(CiphertextError, match="decrypted total weight"):
        check(summed)
    # two contributions whose sum overflows the 60-bit modulus
    big = [np.full(500, 2.0**27.9), np.full(500, 2.0**27.9)]
    agg3, _ = _signed_round(run, big, [1.0, 1.0], 11, fixed_point_bits=f)
    with pytest.raises(CiphertextError, match="decrypted total weight|off their grid|magnitude"):
        check(agg3)
