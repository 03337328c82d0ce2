"""`secure-fedvlp keys init`: client files hold the secret key (0600); the server file holds none."""

import stat

import pytest

from secure_fedvlp.cli import main
from secure_fedvlp.encryption.keys import load_client_context, load_server_context
from secure_fedvlp.errors import KeyMaterialError


def test_keys_init_writes_private_client_files_and_public_server_file(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out), "--clients", "site1,site2"]) == 0
    text = capsys.readouterr().out
    assert "fingerprint" in text and "no secret key" in text and "signing public keys" in text
    from secure_fedvlp.encryption import load_manifest

    assert sorted(load_manifest(out)["signing_public_keys"]) == ["site1", "site2"]
    client_files = sorted(p for p in out.rglob("*") if p.is_file() and "site" in p.name)
    assert len(client_files) == 2
    for p in client_files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert load_client_context(p) is not None
    server = [p for p in out.rglob("*") if p.is_file() and "server" in p.name]
    ctx = load_server_context(server[0])
    assert ctx is not None
    with pytest.raises(KeyMaterialError):  # a client file is never accepted as the server's
        load_server_context(client_files[0])


def test_keys_init_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out), "--clients", "a"]) == 0
    assert main(["keys", "init", "--out", str(out), "--clients", "a"]) == 2
    assert "error" in capsys.readouterr().err
