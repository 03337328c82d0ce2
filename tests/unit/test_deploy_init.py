"""``secure-fedvlp deploy init``: the scripted Deployment Engine (the loopback run of these scripts is
``tests/integration/test_deployment.py``)."""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

from secure_fedvlp.cli import main

REPO = Path(__file__).resolve().parents[2]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _command(script: Path) -> list[str]:
    """The last line of a start script, split as the shell would (after ``exec`` / the environment)."""
    words = shlex.split(script.read_text().strip().splitlines()[-1])
    return words[words.index("exec") + 1 :] if "exec" in words else words


def test_deploy_init_writes_every_party_its_material_and_a_start_script(tmp_path, capsys):
    out = tmp_path / "dep"
    argv = ["deploy", "init", str(out), "--sites", "site1,site2", "--config", "configs/tiny.toml"]
    argv += ["--set", "data.synthetic.heldout_site=false", "--port", "19093"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    scripts = ["superlink.sh", "register.sh", "supernode-site1.sh", "supernode-site2.sh", "run.sh"]
    assert [Path(line.strip()).name for line in printed.splitlines() if line.strip().endswith(".sh")] == scripts

    assert _mode(out) == 0o700 and all(_mode(out / s) == 0o700 for s in scripts)
    assert {p.name: _mode(p) for p in (out / "pki").iterdir()} == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
        "server.crt": 0o644,
        "server.key": 0o600,
    }
    assert _mode(out / "nodes" / "site1.key") == 0o600 and _mode(out / "keys") == 0o700
    assert all(_mode(p) == 0o600 for p in (out / "keys").glob("client-*.key"))
    binding = json.loads((out / "keys" / "node_binding.json").read_text())
    assert sorted(binding["nodes"].values()) == ["site1", "site2"]

    link = _command(out / "superlink.sh")
    assert link[link.index("--port") + 1] == "19093" and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(out / "pki" / "server.crt")
    assert "--disable-runtime-dependency-installation" in link
    node = _command(out / "supernode-site2.sh")
    assert node[node.index("--superlink") + 1] == "127.0.0.1:19093" and node[node.index("--port") + 1] == "19095"
    assert node[node.index("--root-certificates") + 1] == str(out / "pki" / "ca.crt")
    assert node[node.index("--auth-supernode-private-key") + 1] == str(out / "nodes" / "site2.key")
    assert node[node.index("--node-config") + 1] == "site='site2'"
    register = (out / "register.sh").read_text()
    assert f"supernode register {out / 'nodes' / 'site1.pub'} deploy --name site1" in register
    run = _command(out / "run.sh")
    cfg = " ".join(run[i + 1] for i, w in enumerate(run) if w == "--run-config")
    assert f'config-path="{REPO / "configs" / "tiny.toml"}"' in cfg and f"encryption.key_dir={out / 'keys'}" in cfg
    assert f'node-binding="{out / "keys" / "node_binding.json"}"' in cfg and f'run-dir="{out / "run"}"' in cfg
    conn = (out / "flwr-cli" / "config.toml").read_text()
    assert 'address = "127.0.0.1:19093"' in conn and f'root-certificates = "{out / "pki" / "ca.crt"}"' in conn


def test_deploy_init_refuses_in_one_line_before_writing(tmp_path, capsys):
    out = tmp_path / "dep"
    out.mkdir()
    (out / "keep").write_text("x")
    base = ["deploy", "init", str(out), "--config", "configs/tiny.toml"]
    assert main([*base, "--sites", "site1,site2"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main([*base, "--sites", "site1,site1", "--overwrite"]) == 2
    assert "distinct site names" in capsys.readouterr().err
    assert main([*base, "--sites", "site1", "--overwrite", "--set", "federation.num_rounds=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_rounds" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep"]  # nothing was written
