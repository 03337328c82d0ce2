"""Key material: party split, file modes, refusal of secret keys on the server, fingerprints."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import tenseal as ts
from cryptography.exceptions import InvalidSignature

from secure_fedvlp.encryption import (
    CKKSParams,
    context_fingerprint,
    init_keys,
    load_client_context,
    load_manifest,
    load_server_context,
    preset,
    security_level,
)
from secure_fedvlp.encryption import keys as keys_mod
from secure_fedvlp.errors import ConfigError, KeyMaterialError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return init_keys(tmp_path_factory.mktemp("keys"), ["site-a", "site-b", "site_c"], preset())


# ------------------------------------------------------------------------------------- params
def test_presets_meet_128_bit_security():
    assert security_level(preset("sum_only_128")) == 256  # 100 bits <= 118 for N=8192
    assert security_level(preset("sum_only_128_pk")) == 256
    assert security_level(preset("sum_only_128_n4096")) == 128  # 109 bits, exactly the bound
    assert security_level(poly_modulus_degree=8192, total_log_q=219) == 0
    assert security_level(poly_modulus_degree=16384, total_log_q=438) == 128


def test_params_validation_collects_every_problem():
    with pytest.raises(ConfigError) as ei:
        CKKSParams(5000, (70,), 80, 0)
    msg = str(ei.value)
    assert "poly_modulus_degree" in msg and "at least two primes" in msg and "20..60" in msg
    assert "n_threads" in msg
    with pytest.raises(ConfigError, match="128-bit"):
        CKKSParams(4096, (60, 60), 30)
    with pytest.raises(ConfigError, match="head room"):
        CKKSParams(8192, (40, 40), 38)
    with pytest.raises(ConfigError, match="Unknown CKKS parameter 'scale'"):
        CKKSParams.from_dict({**preset().to_dict(), "scale": 3})
    assert CKKSParams.from_dict(preset().to_dict()) == preset()
    with pytest.raises(ConfigError, match="Known presets"):
        preset("nope")


# --------------------------------------------------------------------------------------- files
def test_client_key_files_are_mode_0600(bundle):
    for path in bundle.client_paths.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_new_key_directory_is_private(tmp_path):
    b = init_keys(tmp_path / "fresh", ["a"], preset())
    assert stat.S_IMODE(os.stat(b.out_dir).st_mode) & 0o077 == 0


def test_manifest_records_run_and_files(bundle):
    m = load_manifest(bundle.out_dir)
    assert m["fingerprint"] == bundle.fingerprint and m["context_id"] == bundle.context_id
    assert m["security_bits"] == 256
    assert set(m["client_files"]) == {"site-a", "site-b", "site_c"}
    assert "secret" not in json.dumps(m).lower()


def test_refuses_to_overwrite_keys_unless_asked(tmp_path):
    first = init_keys(tmp_path, ["a"], preset())
    with pytest.raises(KeyMaterialError, match="overwrite"):
        init_keys(tmp_path, ["a"], preset())
    second = init_keys(tmp_path, ["a"], preset(), overwrite=True)
    assert second.fingerprint != first.fingerprint
    assert stat.S_IMODE(os.stat(second.client_paths["a"]).st_mode) == 0o600
    assert load_client_context(second.client_paths["a"]).fingerprint == second.fingerprint


def test_bad_client_ids_rejected(tmp_path):
    with pytest.raises(ConfigError) as ei:
        init_keys(tmp_path, ["ok", "../evil", "ok"], preset())
    assert "must match" in str(ei.value) and "unique" in str(ei.value)


# ------------------------------------------------------------------------------ party split
def test_server_context_holds_no_secret_key_and_cannot_decrypt(bundle):
    server = load_server_context(bundle.server_path)
    client = load_client_context(bundle.client_paths["site-a"])
    assert not server.context.has_secret_key() and not server.context.is_private()
    assert not server.can_decrypt and client.can_decrypt
    vec = ts.ckks_vector(client.context, [1.0, 2.0, 3.0])
    on_server = ts.ckks_vector_from(server.context, vec.serialize())
    with pytest.raises(ValueError, match="secret_key"):
        on_server.decrypt()
    # The server cannot encrypt either (symmetric preset): it only adds.
    with pytest.raises(ValueError):
        ts.ckks_vector(server.context, [1.0])
    # Server file is small: parameters only, no relin/galois/public keys.
    assert os.path.getsize(bundle.server_path) < 4096


def test_server_refuses_client_key_file(bundle):
    with pytest.raises(KeyMaterialError, match="client"):
        load_server_context(bundle.client_paths["site-a"])


def test_server_refuses_server_file_that_contains_a_secret_key(tmp_path):
    params = preset()
    ctx = keys_mod.make_context(params)
    cid = "00" * 16
    fp = context_fingerprint(ctx, cid)
    body = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    blob = keys_mod._frame({"context_id": cid, "params": params.to_dict(), "fingerprint": fp, "role": "server"}, body)
    path = tmp_path / "server.ctx"
    path.write_bytes(blob)
    with pytest.raises(KeyMaterialError, match="secret key"):
        load_server_context(path)


def test_asymmetric_server_context_has_public_key_only(tmp_path):
    b = init_keys(tmp_path, ["a"], preset("sum_only_128_pk"))
    server = load_server_context(b.server_path)
    assert server.context.has_public_key() and not server.context.has_secret_key()
    assert not server.context.has_relin_keys() and not server.context.has_galois_keys()
    assert load_client_context(b.client_paths["a"]).fingerprint == server.fingerprint


def test_group_readable_client_key_refused_or_warned(tmp_path):
    b = init_keys(tmp_path, ["a"], preset())
    os.chmod(b.client_paths["a"], 0o640)
    with pytest.raises(KeyMaterialError, match="0640"):
        load_client_context(b.client_paths["a"])
    with pytest.warns(UserWarning, match="0640"):
        ctx = load_client_context(b.client_paths["a"], strict_permissions=False)
    assert ctx.can_decrypt


def test_truncated_or_corrupt_key_file_refused(tmp_path):
    b = init_keys(tmp_path, ["a"], preset())
    data = b.client_paths["a"].read_bytes()
    trunc = tmp_path / "t.key"
    fd = os.open(trunc, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, data[:-100])
    os.close(fd)
    with pytest.raises(KeyMaterialError, match="truncated"):
        load_client_context(trunc)
    bad = bytearray(data)
    bad[-50] ^= 0xFF
    corrupt = tmp_path / "c.key"
    fd = os.open(corrupt, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, bytes(bad))
    os.close(fd)
    with pytest.raises(KeyMaterialError, match="corrupt"):
        load_client_context(corrupt)


# ------------------------------------------------------------------------------ fingerprints
def test_fingerprint_stable_across_serialize_deserialize(bundle):
    client = load_client_context(bundle.client_paths["site-b"])
    server = load_server_context(bundle.server_path)
    assert client.fingerprint == server.fingerprint == bundle.fingerprint
    again = ts.context_from(client.context.serialize(save_secret_key=True))
    assert context_fingerprint(again, bundle.context_id) == bundle.fingerprint
    again_srv = ts.context_from(server.context.serialize(save_public_key=False))
    assert context_fingerprint(again_srv, bundle.context_id) == bundle.fingerprint
    assert len(bundle.fingerprint) == 32 and int(bundle.fingerprint, 16) >= 0


def test_runs_with_equal_parameters_have_different_fingerprints(tmp_path):
    a = init_keys(tmp_path / "a", ["x"], preset())
    b = init_keys(tmp_path / "b", ["x"], preset())
    assert a.fingerprint != b.fingerprint


def test_client_can_encrypt_and_decrypt(bundle):
    client = load_client_context(bundle.client_paths["site_c"])
    v = ts.ckks_vector(client.context, [0.5, -1.25])
    np.testing.assert_allclose(v.decrypt(), [0.5, -1.25], atol=1e-5)


# ------------------------------------------------------------------------------ signing keys
def test_each_site_gets_its_own_signing_key_and_the_manifest_lists_the_public_keys(bundle):
    """The key authority issues one Ed25519 key pair per site; the manifest lists the public halves only."""
    from secure_fedvlp.encryption import load_signing_public_keys

    ctxs = {cid: load_client_context(p) for cid, p in bundle.client_paths.items()}
    public = load_signing_public_keys(bundle.out_dir, bundle.fingerprint)
    assert set(public) == set(ctxs)
    raw = {cid: c.signing_key.private_bytes_raw() for cid, c in ctxs.items()}
    assert len(set(raw.values())) == len(raw)  # distinct per site (the CKKS secret key is shared)
    for cid, c in ctxs.items():
        assert c.site == cid
        msg = b"statement"
        public[cid].verify(c.signing_key.sign(msg), msg)  # the listed key is this site's
        others = [k for s, k in public.items() if s != cid]
        for k in others:
            with pytest.raises(InvalidSignature):
                k.verify(c.signing_key.sign(msg), msg)
    manifest = json.dumps(load_manifest(bundle.out_dir))
    assert not any(r.hex() in manifest for r in raw.values())  # no private signing key in the manifest
    server = load_server_context(bundle.server_path)
    assert server.signing_key is None and server.site is None
    assert not any(r in bundle.server_path.read_bytes() for r in raw.values())
    # a check of the key directory reads only the headers: they name the site but hold no signing key
    from secure_fedvlp.wrappers.encryption.keydir import read_key_header

    for cid, path in bundle.client_paths.items():
        header = json.dumps(read_key_header(path))
        assert f'"site": "{cid}"' in header and raw[cid].hex() not in header and 'signing_key"' not in header


def test_manifest_of_another_run_or_without_signing_keys_is_refused(bundle, tmp_path):
    from secure_fedvlp.encryption import load_signing_public_keys

    with pytest.raises(KeyMaterialError, match="not this run"):
        load_signing_public_keys(bundle.out_dir, "0" * 32)
    m = load_manifest(bundle.out_dir)
    del m["signing_public_keys"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(KeyMaterialError, match="keys init"):
        load_signing_public_keys(tmp_path, bundle.fingerprint)
