"""User-facing failures: one line on stderr, a non-zero exit, no traceback, nothing written first."""

import os
import shutil
import stat
from pathlib import Path

import pytest

from secure_fedvlp.cli import main

TINY = "configs/tiny.toml"


def _one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_occupied_run_dir_is_refused_and_left_untouched(tmp_path, capsys):
    """A rerun into a finished run's directory used to overwrite config.toml and the model and append to
    metrics.jsonl; now it is refused before anything is written."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.toml").write_text("# the run's own config\n")
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    (run / "model" / "federated_params.npz").write_bytes(b"trained")
    before = _snapshot(run)
    line = _one_line_error(capsys, main(["run", TINY, "--run-dir", str(run)]))
    assert "is not empty" in line and "--resume" in line and "--force" in line
    assert _snapshot(run) == before


def test_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("x")
    line = _one_line_error(capsys, main(["run", TINY, "--run-dir", str(f)]))
    assert f"--run-dir {f} is a file" in line


def test_resume_without_a_run_and_resume_with_force(tmp_path, capsys):
    line = _one_line_error(capsys, main(["run", TINY, "--run-dir", str(tmp_path / "none"), "--resume"]))
    assert "holds no run to resume" in line and not (tmp_path / "none").exists()
    line = _one_line_error(capsys, main(["run", TINY, "--run-dir", str(tmp_path), "--resume", "--force"]))
    assert "exclude each other" in line


def test_resume_with_another_config_names_the_key(tmp_path, capsys):
    from secure_fedvlp.config import config_to_dict, dump_toml, load_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(config_to_dict(load_config(TINY))))
    before = _snapshot(run)
    rc = main(["run", TINY, "--run-dir", str(run), "--resume", "--set", "federation.num_rounds=5"])
    line = _one_line_error(capsys, rc)
    assert "federation.num_rounds = 5" in line and "(the run has 2)" in line
    assert _snapshot(run) == before


def test_key_dir_inside_the_run_dir_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["run", TINY, "--run-dir", str(run), "--set", "encryption.enabled=true", "--key-dir", str(run / "k")])
    assert "inside the run directory" in _one_line_error(capsys, rc)
    assert not run.exists()


def test_export_without_an_encrypted_model(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(TINY, run / "config.toml")
    line = _one_line_error(capsys, main(["export", str(run), "--key", str(tmp_path / "k.key")]))
    assert "holds no encrypted final model" in line


def test_export_into_a_missing_directory_is_refused_before_decrypting(tmp_path, capsys):
    """The output directory is checked first: the (bogus) ciphertext and the (absent) key are never read."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    shutil.copy(TINY, run / "config.toml")
    (run / "model" / "global_model.ckks").write_bytes(b"not read")
    out = tmp_path / "missing" / "model.npz"
    line = _one_line_error(capsys, main(["export", str(run), "--key", str(tmp_path / "k.key"), "--out", str(out)]))
    assert f"the directory {out.parent} does not exist" in line


def test_keys_init_out_an_existing_file(tmp_path, capsys):
    f = tmp_path / "keys"
    f.write_text("x")
    line = _one_line_error(capsys, main(["keys", "init", "--out", str(f), "--clients", "a,b"]))
    assert f"--out {f} is a file" in line


def test_keys_init_overwrite_removes_stale_keys_and_keeps_the_dir_private(tmp_path, capsys):
    out = tmp_path / "keys"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)
    assert main(["keys", "init", "--out", str(out), "--clients", "a,b,c"]) == 0
    assert main(["keys", "init", "--out", str(out), "--clients", "a,b", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("client-*.key")) == ["client-a.key", "client-b.key"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.glob("client-*.key"))


def test_manifest_that_is_not_utf8(tmp_path, capsys):
    from secure_fedvlp.data.manifest import load_manifest
    from secure_fedvlp.errors import DataError

    m = tmp_path / "m.csv"
    m.write_bytes("image,report,site\na.png,caf\xe9,s1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m\.csv is not UTF-8 text \(invalid continuation byte at byte \d+\)"):
        load_manifest(m)


def test_image_path_outside_the_image_root(tmp_path):
    """A manifest row that points at ../secret.png (which exists) is a problem, not a record."""
    from secure_fedvlp.data.manifest import load_manifest
    from secure_fedvlp.errors import DataError

    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"\x89PNG")
    m = root / "m.csv"
    m.write_text(f"image,report,labels,site\n../secret.png,text,,s1\n{tmp_path / 'secret.png'},text,,s1\n")
    with pytest.raises(DataError) as err:
        load_manifest(m)
    assert str(err.value).count("is outside the image root") == 2
