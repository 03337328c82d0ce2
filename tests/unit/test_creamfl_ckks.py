"""CreamFL's ensemble under CKKS equals the plaintext one within the stated bound; the server holds only ciphertexts.

Real TenSEAL contexts and ciphertexts; the end-to-end run goes through the real ClientApp and its
encryption mod (tests/loopback.py transport).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import MessageType

from secure_fedvlp.encryption import (
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
    ensemble_vector,
)
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
