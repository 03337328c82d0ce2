"""Attacks on CKKS aggregation with correct-looking headers, through the real strategy and the real client mod.

One encrypted federation (real ClientApp with the encryption mod, real strategy, real TenSEAL
ciphertexts, real tiny model; only the transport is in-process) runs an honest round; each test then
plays further rounds in which an attacker rewrites replies the real sites produced, as a network
attacker, a site holding its own keys or the server would, and checks that the contribution is
dropped by the server with a reason, or that the aggregate is refused by the sites with a reason
(the site then keeps the previous model it accepted).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from secure_fedvlp.encryption import (
    AggregateCiphertext,
    EncryptedUpdate,
    encrypt_update,
    init_keys,
    load_client_context,
    preset,
)
from secure_fedvlp.encryption.aggregate import MAX_GRID_RESIDUAL
from secure_fedvlp.encryption.auth import sign_statement
from secure_fedvlp.encryption.envelope import encode_chain
from secure_fedvlp.encryption.packing import codec_id, decode_sums, encode_chunks, grid_residual, split_weight_slots
from secure_fedvlp.flower.client_app import get_runtime
from secure_fedvlp.flower.runtime import RunSetup
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, QUERY, SITE_INFO_QUERY
from secure_fedvlp.wrappers.encryption import CIPHERTEXT_KEY, encryption_settings, is_encrypted
from secure_fedvlp.wrappers.encryption.records import CHAIN_KEY, NONCE_KEY, WEIGHT_KEY, blob_record
from tests.unit.test_encryption_flower import _keys, enc_cfg, newest_aggregate, run

TRAIN_NODES = (1, 2)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacks")
    cfg = enc_cfg(tmp, federation={"num_rounds": 40})  # min_contributors = 1: one honest site keeps a round going
    run_dir = tmp / "run"
    _keys(cfg, run_dir)
    strategy, result, rec, grid = run(cfg, run_dir, encrypted=True, rounds=1)
    assert is_encrypted(result.arrays)
    return SimpleNamespace(
        cfg=cfg,
        run_dir=run_dir,
        strategy=strategy,
        global_arrays=result.arrays,
        rec=rec,
        grid=grid,
        rounds=itertools.count(2),
    )


def runtime(fed, nid):
    setup = RunSetup(fed.cfg, fed.run_dir)
    return get_runtime(lambda ctx: setup, fed.grid.contexts[nid])


def site_of(fed, nid):
    return fed.strategy.sites[nid].site


def blob(reply) -> bytes:
    return reply.content[ARRAYS_KEY][CIPHERTEXT_KEY].numpy().tobytes()


def put(reply, data: bytes):
    reply.content[ARRAYS_KEY] = blob_record(data)
    return reply


def resign(upd: EncryptedUpdate, key) -> EncryptedUpdate:
    return dataclasses.replace(upd, signature=sign_statement(upd.signed_header(), key).signature)


def train(fed, rnd):
    """Round ``rnd``'s train messages through the real sites (training, then the encryption mod)."""
    s = fed.strategy
    msgs = list(s.configure_train(rnd, fed.global_arrays, s.stage_config(rnd, "full"), fed.grid))
    replies = fed.grid.send_and_receive(msgs)
    by_node = {r.metadata.src_node_id: r for r in replies}
    cfgs = {m.metadata.dst_node_id: m.content[CONFIG_KEY] for m in msgs}
    assert all(not r.has_error() for r in replies)
    return by_node, cfgs


def aggregate(fed, rnd, replies):
    """The real strategy's aggregation of ``replies``: (new global record or None, {site: reason dropped})."""
    n = len(fed.rec.rows)
    arrays, _ = fed.strategy.aggregate_train(rnd, list(replies), stage="full")
    dropped = {r["site"]: r["reason"] for r in fed.rec.rows[n:] if r.get("status") == "dropped"}
    return arrays, dropped


def site_check(fed, nid, aggregate_bytes: bytes):
    """Deliver an aggregate as the next version of the encrypted global model to node ``nid`` through the real
    client app (its encryption mod); the refusals the site logs."""
    enc = runtime(fed, nid).encryption
    record = blob_record(encode_chain(enc.memory["version"], [aggregate_bytes]), CHAIN_KEY)
    before = len(enc.refused())
    previous = dict(enc.memory["previous"])
    msg = Message(
        RecordDict({ARRAYS_KEY: record, CONFIG_KEY: ConfigRecord({QUERY: SITE_INFO_QUERY})}),
        dst_node_id=nid,
        message_type=MessageType.QUERY,
    )
    [reply] = fed.grid.send_and_receive([msg])
    assert not reply.has_error()
    refused = enc.refused()[before:]
    if refused:  # fail closed: the site keeps the model it accepted before
        assert all(np.array_equal(enc.memory["previous"][k], previous[k]) for k in previous)
    return refused


def foreign_context(fed, tmp_path, site, signing_key):
    """A context under *another* CKKS secret key, with this run's fingerprint and run id copied into it."""
    other = init_keys(tmp_path / "other", [site], preset(fed.cfg.encryption.preset))
    foreign = load_client_context(other.client_paths[site])
    real = runtime(fed, 1).encryption.ctx
    return dataclasses.replace(
        foreign, fingerprint=real.fingerprint, context_id=real.context_id, site=site, signing_key=signing_key
    )


def planned(cfg, reply) -> float:
    """The weight the server expects of a site: its planned weight, else the example count it reported."""
    return float(cfg[WEIGHT_KEY]) if WEIGHT_KEY in cfg else float(EncryptedUpdate.from_bytes(blob(reply)).weight)


def forged(fed, ctx, rnd, cfg, *, weight, values=None):
    """A contribution for ``rnd`` made with ``ctx``, signed by ``ctx.signing_key`` over the issued nonce."""
    s = fed.strategy
    n = s.encryption_layout.num_values
    vec = np.zeros(n) if values is None else values
    return encrypt_update(
        ctx,
        vec,
        weight,
        rnd,
        client_id=ctx.site,
        stage="full",
        layout_hash=s.encryption_layout.layout_hash(),
        packing=s.encryption_packing,
        weight_slot=True,
        nonce=str(cfg[NONCE_KEY]),
    )


def raw_update(fed, ctx, rnd, cfg, chunks, *, weight):
    """A contribution whose plaintext slots the attacker chose freely, under the run's codec, signed by ``ctx``."""
    import tenseal as ts

    s = fed.strategy
    packing = s.encryption_packing
    blobs = tuple(ts.ckks_vector(ctx.context, list(c), float(2**packing.scale_bits)).serialize() for c in chunks)
    upd = EncryptedUpdate(
        fingerprint=ctx.fingerprint,
        round_id=rnd,
        stage="full",
        client_id=ctx.site,
        num_values=s.encryption_layout.num_values,
        layout_hash=s.encryption_layout.layout_hash(),
        codec=codec_id(ctx.params, packing, None, True),
        weight=weight,
        ciphertexts=blobs,
        nonce=str(cfg[NONCE_KEY]),
    )
    return resign(upd, ctx.signing_key)


# ------------------------------------------------------------------------------------- honest
def test_honest_round_is_accepted_and_every_site_accepts_its_aggregate(fed):
    rnd = next(fed.rounds)
    replies, _ = train(fed, rnd)
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert dropped == {} and is_encrypted(arrays)
    newest = newest_aggregate(arrays)
    agg = AggregateCiphertext.from_bytes(newest, runtime(fed, 1).encryption.ctx)
    assert [h.site for h in agg.contributions] == ["site1", "site2"]
    assert agg.total_weight == sum(h.weight for h in agg.contributions)
    assert agg.codec.startswith("packed/") and agg.codec.endswith("/ws")  # the delta protocol, weight in every vector
    for nid in (1, 2, 3):  # the training sites and the held-out site
        assert site_check(fed, nid, newest) == []
    # the measured residual of an honest packed sum from the integers, against the threshold a site applies
    sk = runtime(fed, 1).encryption.ctx.context.secret_key()
    raw = np.concatenate([v.decrypt(sk) for v in agg.vectors])
    assert grid_residual(raw, 0) < MAX_GRID_RESIDUAL / 2


# ------------------------------------------------------------------------------- at the server
def test_foreign_key_ciphertext_with_copied_fingerprint_from_an_outsider_is_dropped(fed, tmp_path):
    """A ciphertext under another CKKS key, the run's fingerprint copied, signed by a key the manifest does not list."""
    rnd = next(fed.rounds)
    replies, cfgs = train(fed, rnd)
    ctx = foreign_context(fed, tmp_path, "site1", Ed25519PrivateKey.generate())
    put(replies[1], forged(fed, ctx, rnd, cfgs[1], weight=planned(cfgs[1], replies[1])).to_bytes())
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert list(dropped) == ["site1"] and "signature does not verify" in dropped["site1"]
    assert is_encrypted(arrays)  # site2's contribution went on


def test_relabelled_round_is_dropped(fed):
    """Site1's honest round-r contribution relabelled as round r+1 (with r+1's nonce), its signature copied."""
    rnd = next(fed.rounds)
    old, _ = train(fed, rnd)
    rnd2 = next(fed.rounds)
    replies, cfgs = train(fed, rnd2)
    upd = EncryptedUpdate.from_bytes(blob(old[1]))
    put(replies[1], dataclasses.replace(upd, round_id=rnd2, nonce=str(cfgs[1][NONCE_KEY])).to_bytes())
    _, dropped = aggregate(fed, rnd2, replies.values())
    assert list(dropped) == ["site1"] and "signature does not verify" in dropped["site1"]


def test_relabelled_site_is_dropped(fed):
    """Site2's contribution sent as site1's: relabelled with the signature copied, or re-signed by site1."""
    rnd = next(fed.rounds)
    replies, _ = train(fed, rnd)
    theirs = EncryptedUpdate.from_bytes(blob(replies[2]))
    put(replies[1], dataclasses.replace(theirs, client_id="site1").to_bytes())
    _, dropped = aggregate(fed, rnd, replies.values())
    assert list(dropped) == ["site1"] and "signature does not verify" in dropped["site1"]

    rnd = next(fed.rounds)
    replies, cfgs = train(fed, rnd)
    theirs = EncryptedUpdate.from_bytes(blob(replies[2]))
    mine = dataclasses.replace(theirs, client_id="site1", nonce=str(cfgs[1][NONCE_KEY]))
    put(replies[1], resign(mine, runtime(fed, 1).encryption.ctx.signing_key).to_bytes())  # site1 holds its own key
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert sorted(dropped) == ["site1", "site2"] and all("same ciphertext" in r for r in dropped.values())
    assert arrays is None  # neither copy is summed: which site made it cannot be told


def test_replayed_signed_message_from_an_earlier_round_is_dropped(fed):
    """Site1's whole signed reply message of round r, sent again in round r+1."""
    rnd = next(fed.rounds)
    old, _ = train(fed, rnd)
    assert aggregate(fed, rnd, old.values())[1] == {}  # round r accepted both
    rnd2 = next(fed.rounds)
    replies, _ = train(fed, rnd2)
    replies[1] = old[1]
    _, dropped = aggregate(fed, rnd2, replies.values())
    assert list(dropped) == ["site1"]
    why = dropped["site1"]
    assert "replay" in why and "nonce differs" in why and "already received" in why


def test_swapped_signatures_are_dropped(fed):
    rnd = next(fed.rounds)
    replies, _ = train(fed, rnd)
    a, b = (EncryptedUpdate.from_bytes(blob(replies[n])) for n in TRAIN_NODES)
    put(replies[1], dataclasses.replace(a, signature=b.signature).to_bytes())
    put(replies[2], dataclasses.replace(b, signature=a.signature).to_bytes())
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert sorted(dropped) == ["site1", "site2"] and all("signature does not verify" in r for r in dropped.values())
    assert arrays is None


def test_header_weight_other_than_planned_is_dropped(fed):
    """Site1 signs a header weight other than the weight the server planned for it."""
    rnd = next(fed.rounds)
    replies, cfgs = train(fed, rnd)
    ctx = runtime(fed, 1).encryption.ctx
    put(replies[1], forged(fed, ctx, rnd, cfgs[1], weight=planned(cfgs[1], replies[1]) / 2).to_bytes())
    _, dropped = aggregate(fed, rnd, replies.values())
    assert list(dropped) == ["site1"] and "differs from the weight" in dropped["site1"]


# ---------------------------------------------------------------------------------- at the sites
def test_foreign_key_ciphertext_signed_by_a_site_is_refused_by_every_site(fed, tmp_path, caplog):
    """A key holder signs a ciphertext made under another CKKS key: the server cannot tell, the sites can."""
    rnd = next(fed.rounds)
    replies, cfgs = train(fed, rnd)
    ctx = foreign_context(fed, tmp_path, "site1", runtime(fed, 1).encryption.ctx.signing_key)
    put(replies[1], forged(fed, ctx, rnd, cfgs[1], weight=planned(cfgs[1], replies[1])).to_bytes())
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert dropped == {} and is_encrypted(arrays)
    with caplog.at_level(logging.WARNING, logger="secure_fedvlp.wrappers.encryption.client"):
        for nid in (1, 2, 3):
            [why] = site_check(fed, nid, newest_aggregate(arrays))
            assert "off their grid" in why
    assert "keeps the previous model" in caplog.text


def test_weight_encrypted_other_than_signed_is_refused_by_every_site(fed):
    """Site1 encrypts with weight 100x its planned weight and signs a header with the planned weight."""
    rnd = next(fed.rounds)
    replies, cfgs = train(fed, rnd)
    ctx = runtime(fed, 1).encryption.ctx
    w = planned(cfgs[1], replies[1])
    packing = fed.strategy.encryption_packing
    liar = dataclasses.replace(packing, max_weight=1000.0)  # the attacker's own encoder: no weight limit
    # every value at -bound: all digits 0 at any weight, so only the weight slot carries the weight 100 x w
    lowest = np.full(fed.strategy.encryption_layout.num_values, -packing.bound)
    chunks = encode_chunks(lowest, 100 * w, ctx.slots, liar, weight_slot=True)
    put(replies[1], raw_update(fed, ctx, rnd, cfgs[1], chunks, weight=w).to_bytes())
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert dropped == {}  # the header is exactly what the server planned
    for nid in (1, 2, 3):
        [why] = site_check(fed, nid, newest_aggregate(arrays))
        assert "decrypted total weight" in why


@pytest.mark.parametrize("factor", [2, 10])
def test_aggregate_scaled_with_the_keyless_server_context_is_refused(fed, factor):
    """The server (key-less context, additions only) multiplies an honest aggregate by 2 or 10."""
    rnd = next(fed.rounds)
    replies, _ = train(fed, rnd)
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert dropped == {}
    agg = AggregateCiphertext.from_bytes(newest_aggregate(arrays), fed.strategy.encryption_ctx)
    agg.vectors = [sum([v] * (factor - 1), v) for v in agg.vectors]
    refused = [site_check(fed, nid, agg.to_bytes()) for nid in (1, 2, 3)]
    assert all(len(r) == 1 and ("decrypted total weight" in r[0] or "off their grid" in r[0]) for r in refused)


def test_modulus_overflow_is_refused_by_every_site(fed):
    """Two key holders skip the public clip and send values whose sum overflows the 60-bit modulus."""
    rnd = next(fed.rounds)
    replies, cfgs = train(fed, rnd)
    s = fed.strategy
    capacity_bits = s.encryption_ctx.params.data_modulus_bits - 2 - s.encryption_packing.scale_bits
    for nid in TRAIN_NODES:  # each slot holds 1.5x half the capacity: alone it fits, the sum wraps modulo q
        ctx = runtime(fed, nid).encryption.ctx
        n_vec = len(EncryptedUpdate.from_bytes(blob(replies[nid])).ciphertexts)
        chunks = [np.full(ctx.slots, 0.75 * 2.0**capacity_bits) for _ in range(n_vec)]
        put(
            replies[nid],
            raw_update(fed, ctx, rnd, cfgs[nid], chunks, weight=planned(cfgs[nid], replies[nid])).to_bytes(),
        )
    arrays, dropped = aggregate(fed, rnd, replies.values())
    assert dropped == {}
    for nid in (1, 2, 3):
        [why] = site_check(fed, nid, newest_aggregate(arrays))
        assert any(k in why for k in ("decrypted total weight", "off their grid", "digit")), why


def test_aggregate_with_a_removed_or_invented_contributor_is_refused(fed):
    rnd = next(fed.rounds)
    replies, _ = train(fed, rnd)
    arrays, _ = aggregate(fed, rnd, replies.values())
    agg = AggregateCiphertext.from_bytes(newest_aggregate(arrays), fed.strategy.encryption_ctx)
    # the server drops site2's signed header (and its weight) but keeps its ciphertext in the sum
    fewer = dataclasses.replace(
        agg,
        contributions=agg.contributions[:1],
        contributors=agg.contributors[:1],
        total_weight=agg.contributions[0].weight,
    )
    [why] = site_check(fed, 1, fewer.to_bytes())
    assert "decrypted total weight" in why
    # the server invents a contributor: a header it signed with a key the manifest does not list
    fake = dataclasses.replace(agg.contributions[1], site="site3", signature="")
    fake = sign_statement(fake, Ed25519PrivateKey.generate())
    more = dataclasses.replace(
        agg,
        contributions=(*agg.contributions, fake),
        contributors=(*agg.contributors, "site3"),
        total_weight=agg.total_weight + fake.weight,
    )
    [why] = site_check(fed, 1, more.to_bytes())
    assert "signature does not verify" in why or "no signing public key" in why


# --------------------------------------------------------------------------------- public clip
def test_public_clip_bounds_every_value_and_the_weight_before_encryption(fed):
    """A site clips each delta to [-delta_bound, delta_bound] before it quantises, and refuses a weight above 1."""
    import tenseal as ts

    enc = runtime(fed, 1).encryption
    packing = enc.packing
    first = enc.layout.entries[0].name
    start = {k: np.array(v, copy=True) for k, v in enc.memory["previous"].items()}
    moved = {k: np.array(v, copy=True) for k, v in start.items()}
    moved[first].flat[0] += 1e6
    moved[first].flat[1] -= 1e6
    record = enc.encrypt_delta(moved, start, 1.0, 999, "full", "b" * 32)
    upd = EncryptedUpdate.from_bytes(blob_of_record(record))
    sk = enc.ctx.context.secret_key()
    slots = np.asarray(ts.ckks_vector_from(enc.ctx.context, upd.ciphertexts[0]).decrypt(sk))
    data, weight_slots = split_weight_slots(slots, enc.ctx.slots)
    values = decode_sums(data, 3, 1.0, packing)
    assert values[0] == pytest.approx(packing.bound) and values[1] == pytest.approx(-packing.bound)
    assert weight_slots[0] == pytest.approx(2.0**16)  # weight 1 on the 2**-16 weight grid
    # with max_clients contributions of weight <= 1 every digit sum fits its digit: no carry, no overflow
    assert packing.max_clients * packing.levels < 2**packing.digit_bits
    with pytest.raises(ValueError, match="outside"):
        enc.encrypt_delta(moved, start, 1.5, 999, "full", "b" * 32)


def blob_of_record(record) -> bytes:
    return record[CIPHERTEXT_KEY].numpy().tobytes()


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_sites_refuse_a_poisoned_aggregate_train_from_their_previous_model_and_recover(tmp_path, caplog):
    """A whole run: in round 1 site1 signs a ciphertext under another CKKS key.  The server sums it (it cannot
    tell); in round 2 every site refuses that aggregate, trains from the model it accepted before, and the
    round-2 aggregate of the honest contributions decrypts and passes every check."""
    from tests.unit.test_encryption_flower import decrypt_final

    cfg = enc_cfg(tmp_path, federation={"num_rounds": 2})
    run_dir = tmp_path / "run"
    _keys(cfg, run_dir)
    setup = RunSetup(cfg, run_dir)

    def poison(reply):
        upd = EncryptedUpdate.from_bytes(blob(reply))
        if upd.round_id != 1:
            return reply
        real = get_runtime(lambda ctx: setup, SimpleNamespace(node_id=1)).encryption.ctx
        other = init_keys(tmp_path / "other", ["site1"], preset(cfg.encryption.preset))
        ctx = dataclasses.replace(
            load_client_context(other.client_paths["site1"]),
            fingerprint=real.fingerprint,
            context_id=real.context_id,
            site="site1",
            signing_key=real.signing_key,
        )
        bad = encrypt_update(
            ctx,
            np.zeros(upd.num_values),
            upd.weight,
            1,
            stage=upd.stage,
            layout_hash=upd.layout_hash,
            packing=encryption_settings(cfg, run_dir).packing,
            weight_slot=True,
            nonce=upd.nonce,
        )
        return put(reply, bad.to_bytes())

    with caplog.at_level(logging.WARNING, logger="secure_fedvlp.wrappers.encryption.client"):
        strategy, result, rec, grid = run(cfg, run_dir, encrypted=True, rounds=2, tamper=(1, poison))
    stats = {s["round"]: s for s in strategy.encryption_stats}
    assert stats[1]["accepted"] == ["site1", "site2"]  # the server cannot tell
    assert stats[2]["accepted"] == ["site1", "site2"]  # round 2 goes on from the previous model
    for nid in (1, 2, 3):
        enc = get_runtime(lambda ctx: setup, grid.contexts[nid]).encryption
        assert enc.refused() and all("off their grid" in why for why in enc.refused())
    assert "keeps the previous model" in caplog.text
    final = decrypt_final(cfg, run_dir, result.arrays)  # the honest round-2 aggregate passes every check
    assert all(np.all(np.isfinite(v)) for v in final.values())
