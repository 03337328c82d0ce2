"""CreamFL's ensemble under CKKS equals the plaintext one within the stated bound; the server holds only ciphertexts.

Real TenSEAL contexts and ciphertexts; the end-to-end run goes through the real ClientApp and its
encryption mod (tests/loopback.py transport).
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import MessageType

from secure_fedvlp.encryption import (
    EncryptedUpdate,
    aggregate_encrypted,
    encrypt_update,
    init_keys,
    load_client_context,
    load_server_context,
    preset,
)
from secure_fedvlp.encryption.packing import fixed_point_bits_for
from secure_fedvlp.errors import ProtocolError
from secure_fedvlp.objectives.creamfl import contrastive_scores, ensemble, shifted_weights
from secure_fedvlp.wrappers.encryption.ensemble import (
    decrypt_ensemble,
    ensemble_error_bound,
    ensemble_layout_hash,
    ensemble_record_key,
    ensemble_vector,
)
from secure_fedvlp.wrappers.encryption.records import record_blob
from tests.unit.test_creamfl import hetero_cfg
from tests.unit.test_encryption_flower import _keys, run

PARAMS = preset()


class _Site:
    def __init__(self, ctx, site, bits):
        self.ctx, self.site, self.fixed_point_bits, self.max_clients = ctx, site, bits, 4


def test_ckks_ensemble_equals_the_plaintext_one_within_the_bound(tmp_path):
    ids = ["c0", "c1", "c2"]
    keys = init_keys(tmp_path, ids, PARAMS)
    ctxs = {c: load_client_context(p) for c, p in keys.client_paths.items()}
    server = load_server_context(keys.server_path)  # the server's key-less context
    assert not server.can_decrypt
    bits = fixed_point_bits_for(PARAMS, 4)
    gen = torch.Generator().manual_seed(0)
    m, d = 10, 6
    reps = F.normalize(torch.randn(3, m, d, generator=gen), dim=-1).double()
    bank = F.normalize(torch.randn(m, d, generator=gen), dim=-1).double()
    floor = 1e-4
    updates = {
        c: encrypt_update(
            ctxs[c],
            ensemble_vector(reps[i].numpy(), bank.numpy(), floor),
            1.0,
            3,
            client_id=c,
            stage="creamfl-image",
            layout_hash=ensemble_layout_hash(m, d),
            fixed_point_bits=bits,
            max_clients=4,
        )
        for i, c in enumerate(ids)
    }
    agg = aggregate_encrypted(
        server,
        updates,
        round_id=3,
        num_values=m * d + m,
        stage="creamfl-image",
        layout_hash=ensemble_layout_hash(m, d),
        fixed_point_bits=bits,
    ).aggregate
    got = decrypt_ensemble(_Site(ctxs["c1"], "c1", bits), agg, m, d, min_contributors=2)
    plain, _ = ensemble(reps, bank)
    w = shifted_weights(contrastive_scores(reps, bank), m, floor).sum(0).numpy()
    bound = ensemble_error_bound(3, bits, w)
    err = np.abs(got - plain.numpy()).max(axis=1)
    assert (err <= bound).all(), (err, bound)
    assert bound.max() < 1e-3  # the stated bound is small at this grid
    # a key holder refuses an aggregate of too few contributors
    one = aggregate_encrypted(
        server,
        {"c0": updates["c0"]},
        round_id=3,
        num_values=m * d + m,
        stage="creamfl-image",
        layout_hash=ensemble_layout_hash(m, d),
        fixed_point_bits=bits,
    ).aggregate
    with pytest.raises(ProtocolError, match="min_contributors"):
        decrypt_ensemble(_Site(ctxs["c1"], "c1", bits), one, m, d, min_contributors=2)


def test_encrypted_creamfl_run_matches_the_plaintext_ensembles(tmp_path):
    """Same data and seeds: the server's ensembles of the encrypted run are the plaintext run's within the bound,
    every representation it received was a ciphertext, and min_contributors applies per modality."""
    extra = {"creamfl": {"client_model": "tiny_client", "server_steps": 1, "public_batch_size": 6}}
    enc = hetero_cfg(tmp_path / "e", encryption={"enabled": True, "min_contributors": 2}, **extra)
    plain = hetero_cfg(tmp_path / "e", **extra)
    _keys(enc, tmp_path / "enc")
    s_enc, r_enc, rec_enc, grid = run(enc, tmp_path / "enc", encrypted=True, rounds=1)
    s_plain, *_ = run(plain, tmp_path / "plain", encrypted=False, rounds=1)
    for m in ("image", "text"):  # two contributors each (paired + one single-modality site)
        a, b = s_enc.ensembles[m], s_plain.ensembles[m]
        assert a is not None and b is not None
        assert float((a - b).abs().max()) < 1e-3  # the bound of ensemble_error_bound at this grid is below 1e-3
    for reply in grid.replies:
        if reply.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            assert "representations" not in reply.content.array_records  # only ciphertexts
            assert all(k.startswith("representations.") for k in reply.content.array_records)
    assert all(r["status"] == "ok" for r in rec_enc.rows if r.get("phase") == "train")


# ------------------------------------------------------------------ the server never holds one site's representations
LONE = {  # site1 is the only site holding images: its image representations have no one to hide among
    "num_sites": 3,
    "heldout_site": True,
    "train_per_site": 20,
    "val_per_site": 4,
    "test_per_site": 12,
    "public_size": 12,
    "image_size": 32,
    "seed": 3,
    "site_modalities": ["paired", "text", "text"],
}


@pytest.fixture(scope="module")
def lone_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("creamfl-lone")
    extra = {"creamfl": {"client_model": "tiny_client", "server_steps": 1, "public_batch_size": 6}}
    enc = hetero_cfg(tmp / "e", data={"synthetic": LONE}, encryption={"enabled": True, "min_contributors": 2}, **extra)
    plain = hetero_cfg(tmp / "e", data={"synthetic": LONE}, **extra)
    _keys(enc, tmp / "enc")
    encrypted = run(enc, tmp / "enc", encrypted=True, rounds=1)
    clear = run(plain, tmp / "plain", encrypted=False, rounds=1)
    return encrypted, clear


def _site1_reps(strategy, grid):
    site = {nid: s.site for nid, s in strategy.sites.items()}
    (reply,) = [
        m
        for m in grid.replies
        if m.metadata.message_type == MessageType.TRAIN and site[m.metadata.src_node_id] == "site1"
    ]
    return {k: v.numpy() for k, v in reply.content["representations"].items()}


def _arrays_held(strategy, grid):
    """Every float array the server received or keeps: all reply records, and its ensembles."""
    out = [v.numpy() for v in strategy.ensembles.values() if v is not None]
    for m in grid.replies:
        if m.has_error():
            continue
        for rec in m.content.array_records.values():
            out += [a.numpy() for a in rec.values()]
    return [a for a in out if a.dtype.kind == "f"]


def test_under_ckks_the_server_never_holds_one_sites_representations_in_clear(lone_runs, caplog):
    """Per modality, min_contributors applies: site1's image representations, the only ones, are never decrypted.

    The curious server then does what it can with what it holds: it takes site1's image ciphertext from site1's
    reply and asks each key-holding site to decrypt it as an "aggregate"; every site refuses.
    """
    (s_enc, _, rec, grid), (s_plain, _, _, grid_plain) = lone_runs
    site1 = _site1_reps(s_plain, grid_plain)  # what site1 sends in clear without CKKS (same seeds, same data)
    assert set(site1) == {"image", "text"}
    assert s_enc.ensembles["image"] is None  # one contributor: the aggregate is discarded, never decrypted
    assert s_enc.ensembles["text"] is not None  # three contributors: the text ensemble is released
    assert float(np.abs(s_enc.ensembles["text"].numpy() - site1["text"]).max()) > 1e-2
    for a in _arrays_held(s_enc, grid):
        for r in site1.values():
            assert a.shape != r.shape or float(np.abs(a - r).max()) > 1e-2, "the server holds site1's representations"
    # the attack: site1's lone ciphertext, presented to the key holders as an aggregate of the round
    site = {nid: s.site for nid, s in s_enc.sites.items()}
    (reply,) = [
        m
        for m in grid.replies
        if m.metadata.message_type == MessageType.TRAIN and site[m.metadata.src_node_id] == "site1"
    ]
    blob = record_blob(reply.content[ensemble_record_key("image")])
    lone = aggregate_encrypted(
        s_enc.encryption_ctx,
        {"site1": EncryptedUpdate.from_bytes(blob)},
        round_id=1,
        num_values=12 * 32 + 12,
        stage="creamfl-image",
        layout_hash=ensemble_layout_hash(12, 32),
        fixed_point_bits=s_enc.encryption_bits,
    ).aggregate
    assert lone is not None and lone.contributors == ("site1",)
    before = len(grid.replies)
    with caplog.at_level("ERROR"):
        assert s_enc.decrypt_by_key_holder(1, lone, "image") is None
    answers = grid.replies[before:]
    assert len(answers) == 3 and all(m.has_error() for m in answers)  # site1, site2, site3 all refuse
    assert caplog.text.count("fewer than encryption.min_contributors") == 3


def test_a_server_that_lies_about_the_contributors_gets_one_sites_representations(lone_runs):
    """The limit, shown: the contributor list of an aggregate is the server's word.  A server that labels site1's
    ciphertext, added to itself, as the sum of two sites gets site1's image representations decrypted (the ratio
    of sums cancels the doubling).  CKKS protects against an honest-but-curious server, not a lying one; only DP
    bounds what these representations tell about a record."""
    (s_enc, _, rec, grid), (s_plain, _, _, grid_plain) = lone_runs
    site1 = _site1_reps(s_plain, grid_plain)
    site = {nid: s.site for nid, s in s_enc.sites.items()}
    (reply,) = [
        m
        for m in grid.replies
        if m.metadata.message_type == MessageType.TRAIN and site[m.metadata.src_node_id] == "site1"
    ]
    upd = EncryptedUpdate.from_bytes(record_blob(reply.content[ensemble_record_key("image")]))
    lone = aggregate_encrypted(
        s_enc.encryption_ctx,
        {"site1": upd},
        round_id=1,
        num_values=12 * 32 + 12,
        stage="creamfl-image",
        layout_hash=ensemble_layout_hash(12, 32),
        fixed_point_bits=s_enc.encryption_bits,
    ).aggregate
    forged = dataclasses.replace(lone, contributors=("site1", "site2"), vectors=[v + v for v in lone.vectors])
    got = s_enc.decrypt_by_key_holder(1, forged, "image")
    assert got is not None
    assert float(np.abs(got.numpy() - site1["image"]).max()) < 1e-3


def _encrypted_pair(tmp_path, reps, banks, floor=1e-4):
    """Two sites' encrypted contributions (each against the bank it was sent), summed by the server."""
    keys = init_keys(tmp_path, ["a", "b"], PARAMS)
    ctxs = {c: load_client_context(p) for c, p in keys.client_paths.items()}
    server = load_server_context(keys.server_path)
    bits = fixed_point_bits_for(PARAMS, 4)
    m, d = reps[0].shape
    common = dict(stage="creamfl-image", layout_hash=ensemble_layout_hash(m, d), fixed_point_bits=bits)
    updates = {
        c: encrypt_update(ctxs[c], ensemble_vector(r, g, floor), 1.0, 2, client_id=c, max_clients=4, **common)
        for c, r, g in zip(("a", "b"), reps, banks, strict=True)
    }
    agg = aggregate_encrypted(server, updates, round_id=2, num_values=m * d + m, **common).aggregate
    return ctxs, bits, agg


def test_a_key_holder_among_two_contributors_recovers_the_other_sites_representations(tmp_path):
    """The limit, shown: the decrypted aggregate is ``[sum w r, sum w]``; a key-holding contributor subtracts its
    own ``[w r, w]`` and divides, and holds the other site's representations (min_contributors = 2 stops one
    contributor, not this)."""
    gen = torch.Generator().manual_seed(1)
    m, d = 8, 6
    reps = [F.normalize(torch.randn(m, d, generator=gen), dim=-1).double().numpy() for _ in range(2)]
    bank = F.normalize(torch.randn(m, d, generator=gen), dim=-1).double().numpy()
    ctxs, bits, agg = _encrypted_pair(tmp_path, reps, [bank, bank])
    from secure_fedvlp.encryption import decrypt_aggregate

    flat = np.asarray(decrypt_aggregate(ctxs["a"], agg, total_weight=1.0, fixed_point_bits=bits), np.float64)
    mine = ensemble_vector(reps[0], bank, 1e-4)  # site a knows its own contribution
    other = flat - mine
    recovered = other[: m * d].reshape(m, d) / other[m * d :, None]
    assert np.abs(recovered - reps[1]).max() < 1e-3


def test_a_crafted_global_bank_drives_a_sites_weights_to_the_floor(tmp_path):
    """The limit, shown: a site checks the global bank's shape and finiteness, not that it is the server model's.
    A server that sends site b a scaled random bank pushes b's con_w weights to the floor, and the decrypted
    ensemble of two honest contributors is then site a's representations on nearly every item."""
    gen = torch.Generator().manual_seed(2)
    m, d = 64, 8
    reps = [F.normalize(torch.randn(m, d, generator=gen), dim=-1).double().numpy() for _ in range(2)]
    honest = F.normalize(torch.randn(m, d, generator=gen), dim=-1).double().numpy()
    crafted = 100.0 * F.normalize(torch.randn(m, d, generator=gen), dim=-1).double().numpy()
    ctxs, bits, agg = _encrypted_pair(tmp_path, reps, [honest, crafted])
    assert agg.contributors == ("a", "b")  # an honest contributor list
    got = decrypt_ensemble(_Site(ctxs["a"], "a", bits), agg, m, d, min_contributors=2)
    err = np.abs(got - reps[0]).max(axis=1)
    assert (err < 1e-2).mean() >= 0.9, err
