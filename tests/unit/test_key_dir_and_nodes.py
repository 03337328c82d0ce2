"""A key directory is checked before a run starts (from headers only); sites are bound to node keys."""

import os
import shutil
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.node_pb2 import NodeInfo

from secure_fedvlp.encryption.keys import init_keys
from secure_fedvlp.encryption.params import preset
from secure_fedvlp.errors import KeyMaterialError
from secure_fedvlp.flower.nodes import NodeBinding, load_node_binding, node_key_fingerprint, write_node_binding
from secure_fedvlp.wrappers.encryption.keydir import check_key_dir
from secure_fedvlp.wrappers.encryption.settings import EncryptionSettings

SITES = ["site1", "site2"]


def _settings(kdir, name="sum_only_128"):
    return EncryptionSettings(preset=name, fixed_point_bits=20, max_contributions=3, n_threads=1, key_dir=kdir)


@pytest.fixture
def kdir(tmp_path):
    d = tmp_path / "keys"
    init_keys(d, SITES, preset("sum_only_128"))
    os.chmod(d, 0o700)
    return d


def test_a_sound_key_dir_passes(kdir):
    assert check_key_dir(_settings(kdir), SITES)["fingerprint"]


def test_every_problem_is_named_in_one_line(kdir, tmp_path):
    other = tmp_path / "other"
    init_keys(other, SITES, preset("sum_only_128"))
    os.chmod(kdir, 0o755)  # directory open to others
    os.chmod(kdir / "client-site1.key", 0o644)  # a secret key readable by others
    shutil.copy(other / "client-site2.key", kdir / "client-site2.key")  # another run's key
    with pytest.raises(KeyMaterialError) as err:
        check_key_dir(_settings(kdir), SITES + ["site3"])
    msg = str(err.value)
    assert "\n" not in msg
    assert "mode 0755" in msg and "client-site1.key has mode 0644" in msg
    assert "client-site2.key belongs to another key set" in msg and "client-site3.key is missing" in msg
    assert "secure-fedvlp keys init --out" in msg


def test_a_server_file_posing_as_a_client_key_and_a_preset_mismatch(kdir):
    shutil.copy(kdir / "server.ctx", kdir / "client-site1.key")
    os.chmod(kdir / "client-site1.key", 0o600)
    with pytest.raises(KeyMaterialError, match="client-site1.key is a 'server' file, expected a client file"):
        check_key_dir(_settings(kdir), SITES)
    with pytest.raises(KeyMaterialError, match="not those of preset 'sum_only_128_n4096'"):
        check_key_dir(_settings(kdir, "sum_only_128_n4096"), ["site2"])


def test_the_check_never_reads_a_secret_key_body(kdir):
    """Only headers are read: a client key whose body is gone still passes the header checks."""
    from secure_fedvlp.wrappers.encryption.keydir import read_key_header

    path = kdir / "client-site1.key"
    full = read_key_header(path)
    data = path.read_bytes()
    cut = 12 + struct.unpack(">I", data[8:12])[0]  # magic, header length, JSON header
    path.write_bytes(data[:cut])  # header only, no TenSEAL body
    assert read_key_header(path) == full
    check_key_dir(_settings(kdir), SITES)


def _node_key(tmp_path, name):
    key = ec.generate_private_key(ec.SECP384R1())
    pub = tmp_path / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pub, pem


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_nodes(self):
        return [NodeInfo(node_id=nid, public_key=pk) for nid, pk in self.nodes.items()]


def test_node_binding_accepts_bound_nodes_and_refuses_the_rest(tmp_path):
    (p1, pem1), (p2, pem2), (_, pem3) = (_node_key(tmp_path, n) for n in ("a", "b", "c"))
    binding = write_node_binding(tmp_path / "node_binding.json", {"site1": p1, "site2": p2})
    assert load_node_binding(tmp_path / "node_binding.json") == binding
    assert binding[node_key_fingerprint(pem1)] == "site1"
    check = NodeBinding(binding, _Grid({11: pem1, 12: pem2, 13: pem3, 14: b""}))
    assert check(11, "site1") is None and check(12, "site2") is None
    assert "its key is bound to site 'site1'" in check(11, "site2")  # an authenticated node claiming another site
    assert "bound to no site" in check(13, "site1")  # a key nobody bound
    assert "no authenticated key" in check(14, "site1")  # node authentication off


def test_node_binding_refuses_one_key_for_two_sites_and_non_ec_keys(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    p1, _ = _node_key(tmp_path, "a")
    with pytest.raises(KeyMaterialError, match="bound to both"):
        write_node_binding(tmp_path / "b.json", {"site1": p1, "site2": p1})
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(KeyMaterialError, match="ECDSA"):
        write_node_binding(tmp_path / "b.json", {"site1": ed})
