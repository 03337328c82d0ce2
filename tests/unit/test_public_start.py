"""The public start: non-private pre-training on a public corpus before the federation, loaded by every party.

Tiny model and data, a few steps. What is checked: the checkpoint round-trips and every party builds the
same round-0 model; a bad checkpoint is a clear error naming the file (also through the CLI, before any
site starts); the content-addressed cache is reused (no second training); the synthetic public corpus
differs from every site while the sites' data do not change; the report carries the three references;
the configuration is validated like the rest.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_fedvlp.build import build_model
from secure_fedvlp.cli import main
from secure_fedvlp.config import config_to_dict, dump_toml, load_config, parse_config, resolve_paths
from secure_fedvlp.data import FINDINGS, SyntheticSpec, generate_federation
from secure_fedvlp.data.synthetic import (
    NEGATIONS,
    NORMAL,
    PRETRAIN_NEGATIONS,
    PRETRAIN_NORMAL,
    PRETRAIN_TERMS,
    SYNONYMS,
    generate_pretrain_corpus,
    pretrain_style,
)
from secure_fedvlp.errors import CheckpointError, ConfigError
from secure_fedvlp.flower.eval_guard import model_hash
from secure_fedvlp.methods import public_start as ps
from secure_fedvlp.models.checkpoint import full_state, read_checkpoint, save_checkpoint, state_hash
from secure_fedvlp.models.state import federated_state

PRETRAIN = {"enabled": True, "steps": 3, "batch_size": 8, "log_every": 0}


def tiny(tmp_path, **extra):
    """The tiny test federation with a 32-record public pre-training corpus and a 3-step public start."""
    data = {
        "run": {"seed": 0, "device": "cpu"},
        "data": {
            "cache_dir": str(tmp_path / "cache"),
            "synthetic": {
                "num_sites": 2,
                "train_per_site": 20,
                "val_per_site": 4,
                "test_per_site": 12,
                "public_size": 8,
                "pretrain_size": 32,
                "image_size": 32,
                "seed": 3,
            },
        },
        "model": {"name": "tiny"},
        "train": {"local_steps": 2, "batch_size": 6},
        "federation": {"num_rounds": 1},
        "pretrain": dict(PRETRAIN),
    }
    for k, v in extra.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data)


def with_checkpoint(cfg, path):
    return resolve_paths(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=str(path))))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """One public start of the tiny config, trained into a module-wide cache."""
    tmp = tmp_path_factory.mktemp("public-start")
    cfg = tiny(tmp)
    return cfg, ps.cached_public_start(cfg)


# --------------------------------------------------------------------------- the checkpoint


def test_the_checkpoint_round_trips_and_every_party_builds_the_same_model(start):
    """Server, sites, evaluation and export all call build_model(cfg): with the checkpoint they build one model,
    frozen parts included, whose federated hash (what each site's evaluation guard checks) is the public start's."""
    cfg, got = start
    assert got.trained and got.path.is_file() and ps.info_path(got.path).is_file()
    arrays, meta = read_checkpoint(got.path)
    assert meta["state_hash"] == got.info["state_hash"] == state_hash(arrays)
    run_cfg = with_checkpoint(cfg, got.path)
    server, site = build_model(run_cfg), build_model(run_cfg)
    assert state_hash(full_state(server)) == state_hash(full_state(site)) == got.info["state_hash"]
    assert model_hash(federated_state(server)) == model_hash(federated_state(site))
    untrained = build_model(run_cfg, untrained=True)
    assert model_hash(federated_state(untrained)) != model_hash(federated_state(server))
    # every party builds the seeded model first, so the untrained reference is the same everywhere too
    assert state_hash(full_state(untrained)) == state_hash(full_state(build_model(cfg, untrained=True)))
    # only the heads travel, but the frozen towers are the public start's, not the seeded ones
    heads = dataclasses.replace(run_cfg, model=dataclasses.replace(run_cfg.model, trainable="heads"))
    m = build_model(heads)
    assert set(federated_state(m)) < set(federated_state(server))
    conv = "image_encoder.stem.0.weight"
    assert not m.get_parameter(conv).requires_grad
    assert torch.equal(m.get_parameter(conv), server.get_parameter(conv))
    assert not torch.equal(m.get_parameter(conv), untrained.get_parameter(conv))


def test_a_torch_checkpoint_loads_like_the_npz(start, tmp_path):
    cfg, got = start
    arrays, _ = read_checkpoint(got.path)
    pt = tmp_path / "start.pt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in arrays.items()}}, pt)
    a, b = build_model(with_checkpoint(cfg, pt)), build_model(with_checkpoint(cfg, got.path))
    assert state_hash(full_state(a)) == state_hash(full_state(b))


def _write_state(path, state):
    save_checkpoint(state, path)
    return path


@pytest.mark.parametrize("fault", ["missing key", "unexpected key", "wrong shape", "non-finite"])
def test_a_checkpoint_that_does_not_fit_names_the_file_and_the_key(start, tmp_path, fault):
    cfg, got = start
    arrays, _ = read_checkpoint(got.path)
    name = "image_head.weight"
    if fault == "missing key":
        arrays.pop(name)
    elif fault == "unexpected key":
        arrays["extra.weight"] = np.zeros(3, np.float32)
        name = "extra.weight"
    elif fault == "wrong shape":
        arrays[name] = arrays[name][:, :-1]
    else:
        arrays[name] = arrays[name].copy()
        arrays[name][0, 0] = np.nan
    bad = _write_state(tmp_path / "bad.npz", arrays)
    with pytest.raises(CheckpointError) as err:
        build_model(with_checkpoint(cfg, bad))
    text = str(err.value)
    assert str(bad) in text and name in text and "model.init_checkpoint" in text
    if fault == "wrong shape":
        assert "shape" in text


def test_a_checkpoint_that_is_not_one_is_a_clear_error(start, tmp_path):
    cfg, got = start
    cases = {
        "does not exist": tmp_path / "nowhere.npz",
        "is not a file": tmp_path / "dir.npz",
        "not a readable .npz": tmp_path / "garbage.npz",
        "not a readable torch checkpoint": tmp_path / "garbage.pt",
    }
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip archive")
    (tmp_path / "garbage.pt").write_bytes(b"nor a torch file")
    for why, path in cases.items():
        with pytest.raises(CheckpointError, match=why) as err:
            build_model(with_checkpoint(cfg, path))
        assert str(path) in str(err.value)
    other = tmp_path / "other-model.npz"
    arrays, _ = read_checkpoint(got.path)
    save_checkpoint(arrays, other, meta={"model": "demo"})
    with pytest.raises(CheckpointError, match="written for model 'demo'"):
        build_model(with_checkpoint(cfg, other))
    with pytest.raises(ConfigError, match=r"'model.init_checkpoint' must name a \.npz or \.pt file"):
        tiny(tmp_path, model={"init_checkpoint": "start.txt"})


def test_the_cli_checks_the_checkpoint_before_any_site_starts(tmp_path, capsys):
    """Exit status 2 and one line naming the file and the key, no traceback, and no Flower run started."""
    cfg = tiny(tmp_path, pretrain={"enabled": False})
    arrays = full_state(build_model(cfg))
    arrays.pop("text_head.bias")
    bad = _write_state(tmp_path / "bad.npz", arrays)
    run_dir = tmp_path / "run"
    rc = main(
        [
            "run",
            "configs/tiny.toml",
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--set",
            f"model.init_checkpoint={json.dumps(str(bad))}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(bad) in err[0] and "text_head.bias" in err[0] and "Traceback" not in err[0]
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_relative_checkpoint_path_is_made_absolute_for_every_party(start, tmp_path, monkeypatch):
    cfg, got = start
    monkeypatch.chdir(got.path.parent)
    rel = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=got.path.name))
    resolved = resolve_paths(rel)
    assert resolved.model.init_checkpoint == str(got.path.resolve())
    monkeypatch.chdir(tmp_path)  # a client in another working directory reads the same file
    assert state_hash(full_state(build_model(resolved))) == got.info["state_hash"]


def test_a_users_checkpoint_is_checked_and_installed_as_the_public_start(start, tmp_path):
    """model.init_checkpoint given (a .pt state dict here): nothing is trained; the CLI's step checks it, keeps it
    in the run in the package's format and describes it as a public checkpoint, with the hash of what it holds."""
    import logging

    from secure_fedvlp.cli import _prepare_public_start

    cfg, got = start
    arrays, _ = read_checkpoint(got.path)
    pt = tmp_path / "user.pt"
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, pt)
    user = with_checkpoint(dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, enabled=False)), pt)
    n0 = ps.TRAINING_RUNS[0]
    run_cfg = _prepare_public_start(user, tmp_path / "run", logging.getLogger("test"))
    dest = tmp_path / "run" / "model" / "public_start.npz"
    assert run_cfg.model.init_checkpoint == str(dest.resolve()) and ps.TRAINING_RUNS[0] == n0
    info = json.loads(dest.with_suffix(".json").read_text())
    assert info["source"] == "checkpoint" and info["public"] and Path(info["origin"]).resolve() == pt.resolve()
    assert info["state_hash"] == read_checkpoint(dest)[1]["state_hash"] == got.info["state_hash"]
    assert state_hash(full_state(build_model(run_cfg))) == got.info["state_hash"]


def test_pretrain_enabled_without_a_checkpoint_is_refused_by_the_apps(tmp_path):
    """The public start is made before the Flower apps start; an app never trains it silently."""
    with pytest.raises(ConfigError, match="secure-fedvlp pretrain"):
        build_model(tiny(tmp_path))


# --------------------------------------------------------------------------- the cache


def test_the_cache_is_reused_and_keyed_by_what_determines_the_start(start, tmp_path):
    cfg, got = start
    before = (ps.TRAINING_RUNS[0], got.path.stat().st_mtime_ns, hashlib.sha256(got.path.read_bytes()).hexdigest())
    again = ps.cached_public_start(cfg)
    assert not again.trained and again.path == got.path and again.info["state_hash"] == got.info["state_hash"]
    after = (ps.TRAINING_RUNS[0], got.path.stat().st_mtime_ns, hashlib.sha256(got.path.read_bytes()).hexdigest())
    assert after == before  # nothing trained, the file untouched
    key = ps.public_start_key(cfg)
    # what does not determine the public start does not change its key
    for section, change in (("model", {"trainable": "heads"}), ("pretrain", {"log_every": 7}), ("train", {"lr": 0.5})):
        other = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **change)})
        assert ps.public_start_key(other) == key, section
    # what determines it does
    for section, change in (
        ("run", {"seed": 1}),
        ("pretrain", {"steps": 4}),
        ("pretrain", {"lr": 2e-3}),
        ("model", {"name": "demo"}),
    ):
        other = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **change)})
        assert ps.public_start_key(other) != key, (section, change)
    bigger = dataclasses.replace(cfg.data, synthetic=dataclasses.replace(cfg.data.synthetic, pretrain_size=40))
    assert ps.public_start_key(dataclasses.replace(cfg, data=bigger)) != key


def test_a_fixed_pretrain_seed_holds_one_public_start_across_run_seeds(tmp_path):
    """pretrain.seed = k: runs of different run.seed share the start (key, seeded model, description); -1 follows
    run.seed, and the start of run.seed k is the start of pretrain.seed k."""
    runs = [tiny(tmp_path, run={"seed": s}, pretrain={"seed": 5}) for s in (0, 1)]
    assert ps.public_start_key(runs[0]) == ps.public_start_key(runs[1])
    assert ps.public_start_key(tiny(tmp_path, pretrain={"seed": 6})) != ps.public_start_key(runs[0])
    assert ps.public_start_key(tiny(tmp_path, run={"seed": 5})) == ps.public_start_key(runs[0])
    assert ps.public_start_key(tiny(tmp_path, run={"seed": 1})) != ps.public_start_key(tiny(tmp_path))
    pcfg = [ps.pretrain_config(c) for c in runs]
    assert pcfg[0].run.seed == pcfg[1].run.seed == 5
    a, b = (federated_state(build_model(c)) for c in pcfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="pretrain.seed"):
        tiny(tmp_path, pretrain={"seed": -2})


def test_a_sweeps_cells_share_one_public_start(tmp_path):
    """Two runs (two sweep cells) of one config: the public start is trained once, and each run holds the same
    file as its model.init_checkpoint, with the description beside it."""
    import logging

    from secure_fedvlp.cli import _prepare_public_start

    cfg = tiny(tmp_path)
    n0 = ps.TRAINING_RUNS[0]
    log = logging.getLogger("test")
    a = _prepare_public_start(cfg, tmp_path / "cell-a", log)
    b = _prepare_public_start(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.5)), tmp_path / "cell-b", log
    )
    assert ps.TRAINING_RUNS[0] == n0 + 1
    for run_cfg, cell in ((a, "cell-a"), (b, "cell-b")):
        path = tmp_path / cell / "model" / "public_start.npz"
        assert run_cfg.model.init_checkpoint == str(path.resolve())
        info = json.loads(path.with_suffix(".json").read_text())
        assert info["public"] is True and info["epsilon_spent"] == 0.0 and info["source"] == "synthetic"
        assert info["steps"] == 3 and info["corpus_size"] == 32
    assert os.path.samefile(a.model.init_checkpoint, b.model.init_checkpoint) or (
        read_checkpoint(a.model.init_checkpoint)[1]["state_hash"]
        == read_checkpoint(b.model.init_checkpoint)[1]["state_hash"]
    )
    # a corrupted cache entry is trained again rather than used
    cached = ps.cache_path(cfg)
    cached.unlink()
    cached.write_bytes(b"broken")
    assert ps.cached_public_start(cfg).trained and ps.TRAINING_RUNS[0] == n0 + 2


def test_the_pretrain_command_writes_a_checkpoint_for_deployment(tmp_path, capsys):
    """`secure-fedvlp pretrain CONFIG --out FILE`: the file and its description; a config naming it builds it."""
    out = tmp_path / "dist" / "start.npz"
    sets = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic.pretrain_size=16",
        "pretrain.steps=2",
        "pretrain.batch_size=8",
        "pretrain.log_every=1",
    ]
    rc = main(["pretrain", "configs/tiny.toml", "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file() and "no privacy budget was spent" in text
    assert "public start: step 2/2" in text  # progress lines
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["public"] and info["epsilon_spent"] == 0.0 and info["steps"] == 2
    cfg = load_config(
        "configs/tiny.toml", [*sets, f"model.init_checkpoint={json.dumps(str(out))}", "pretrain.enabled=true"]
    )
    assert state_hash(full_state(build_model(cfg))) == info["state_hash"]
    assert main(["pretrain", "configs/tiny.toml", "--out", str(tmp_path / "x.bin")]) == 2


# --------------------------------------------------------------------------- the public corpus


#: The demo's sites (seed 0: the same styles and prevalences), fewer and smaller records.
SPEC = SyntheticSpec(num_sites=4, train_per_site=100, val_per_site=4, test_per_site=8, image_size=32, seed=0)


def test_the_sites_data_do_not_change_when_a_public_corpus_is_added(tmp_path):
    plain = generate_federation(SPEC)
    with_corpus = generate_federation(dataclasses.replace(SPEC, pretrain_size=600))
    for a, b in zip(plain.all_sites(), with_corpus.all_sites(), strict=True):
        for split in ("train", "val", "test"):
            x, y = getattr(a, split), getattr(b, split)
            assert np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels)
            assert x.reports == y.reports and x.record_ids == y.record_ids
    assert np.array_equal(plain.public.images, with_corpus.public.images)
    # the sites' cache file is the same file (its key leaves the corpus out); the corpus has its own
    generate_federation(SPEC, cache_dir=tmp_path)
    generate_federation(dataclasses.replace(SPEC, pretrain_size=600), cache_dir=tmp_path)
    generate_pretrain_corpus(dataclasses.replace(SPEC, pretrain_size=600), cache_dir=tmp_path)
    assert (
        len(list(tmp_path.glob("synthetic-*.npz"))) == 2 and len(list(tmp_path.glob("synthetic-pretrain-*.npz"))) == 1
    )


def test_the_tiny_sites_labels_and_reports_are_those_of_before_the_public_corpus():
    """Golden digest of the tiny federation's labels and reports (configs/tiny.toml's spec), measured before the
    public corpus existed: adding it must not move one draw of the sites' random streams."""
    spec = SyntheticSpec(
        num_sites=2, train_per_site=24, val_per_site=8, test_per_site=16, public_size=16, image_size=32, seed=1
    )
    h = hashlib.sha256()
    for s in generate_federation(dataclasses.replace(spec, pretrain_size=64)).all_sites():
        for split in ("train", "val", "test"):
            d = getattr(s, split)
            h.update(d.labels.astype(np.uint8).tobytes())
            h.update(json.dumps(d.reports).encode())
    assert h.hexdigest() == "0e7a87c760c243b22ef0a1d51709ea324e0eee59fc435059c7e0e969f37a0c8e"


def _phrases(table):
    return {p.format(side=side).lower() for phrases in table.values() for p in phrases for side in ("right", "left")}


def test_the_public_corpus_has_its_own_style_wording_and_prevalence():
    spec = dataclasses.replace(SPEC, pretrain_size=1024)
    corpus = generate_pretrain_corpus(spec)
    fed = generate_federation(spec)
    assert len(corpus) == 1024 and corpus.masks is None
    # wording: structured reports, no site phrase in them and no public phrase in the sites'
    assert all(r.startswith("Findings: ") and " Impression: " in r for r in corpus.reports)
    site_text = " ".join(r.lower() for s in fed.all_sites() for d in (s.train, s.test) for r in d.reports)
    public_text = " ".join(r.lower() for r in corpus.reports)
    site_words = _phrases(SYNONYMS) | _phrases(NEGATIONS) | {p.lower() for p in NORMAL}
    public_words = _phrases(PRETRAIN_TERMS) | _phrases(PRETRAIN_NEGATIONS) | {p.lower() for p in PRETRAIN_NORMAL}
    assert not any(p in public_text for p in site_words), [p for p in site_words if p in public_text]
    assert not any(p in site_text for p in public_words), [p for p in public_words if p in site_text]

    # style: a clean, neutral scanner (no noise, blur, tone or offset); every site's scanner shows in its pixels
    style = pretrain_style(spec)
    assert (style["noise"], style["blur"], style["contrast"], style["gamma"], style["offset"]) == (0, 0, 1, 1, 0)

    def corners(images):  # outside the body: the render's plain background, 0.08, before the scanner's style
        return np.concatenate([images[:, :3, :3].ravel(), images[:, -3:, -3:].ravel()])

    assert np.allclose(corners(corpus.images), 0.08, atol=1e-6)
    for s in fed.sites:
        c = corners(s.train.images)
        assert c.std() > 1e-3 or abs(c.mean() - 0.08) > 0.01, s.name
    # prevalence: cardiomegaly and nodule rare (about 2 %) in the corpus, common at the demo's sites
    prev = dict(zip(FINDINGS, corpus.prevalence(), strict=True))
    assert prev["cardiomegaly"] < 0.05 and prev["nodule"] < 0.05 and prev["pleural_effusion"] > 0.15
    pooled = dict(zip(FINDINGS, np.concatenate([s.train.labels for s in fed.sites]).mean(0), strict=True))
    assert pooled["cardiomegaly"] > 0.2 and pooled["nodule"] > 0.2
    # deterministic, and cached apart from the sites
    again = generate_pretrain_corpus(spec)
    assert np.array_equal(again.images, corpus.images) and again.reports == corpus.reports


# --------------------------------------------------------------------------- the report


def test_the_report_carries_untrained_public_start_and_final(start, tmp_path):
    """A run from the public start (real ClientApp and strategy on the in-process transport): every site,
    held-out included, evaluated the untrained reference and the public start (round 0); report.json has the
    three references per site, their means and worst sites, and the public start's block."""
    from secure_fedvlp.evaluation.report import RunRecorder, write_report
    from tests.unit.test_methods_contract import run_method

    cfg, got = start
    run_cfg = with_checkpoint(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path))), got.path
    )
    strategy, result, rec, grid, init = run_method(run_cfg, tmp_path, rounds=1)
    refs = [r for r in rec.rows if r["phase"] == "evaluate" and r.get("reference") == "untrained"]
    assert {r["site"] for r in refs} == {"site1", "site2", "heldout"} and all(r["status"] == "ok" for r in refs)
    run_dir = tmp_path / "run"
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(run_cfg)))
    recorder = RunRecorder(run_dir)
    for row in rec.rows:
        recorder.record(row)
    write_report(run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    for name, site in rep["sites"].items():
        for ref in ("untrained", "public_start", "final"):
            assert "zs_auroc_macro" in site[ref], (name, ref)
        assert site["untrained"] != site["public_start"]
    assert rep["heldout"]["heldout"]["public_start"]
    s = rep["summary_train_sites"]["zs_auroc_macro"]
    assert {"mean_untrained", "mean_public_start", "mean_final", "worst_public_start"} <= set(s)
    block = rep["public_start"]
    assert block["public"] is True and block["epsilon_spent"] == 0.0 and block["source"] == "synthetic"
    assert block["steps"] == 3 and block["corpus_size"] == 32 and block["hash"] == got.info["state_hash"]
    assert rep["evaluation"]["max_evaluations_per_site"] == run_cfg.federation.num_rounds + 2
    md = (run_dir / "report.md").read_text()
    assert "## Public start" in md and "untrained -> public start -> final" in md
    assert "no privacy budget was spent" in md


def test_a_run_without_a_public_start_reports_as_before(tmp_path):
    from secure_fedvlp.evaluation.report import RunRecorder, write_report
    from tests.unit.test_methods_contract import run_method, tiny_cfg

    cfg = tiny_cfg(tmp_path, "fedavg")
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=1)
    assert not any("reference" in r for r in rec.rows)
    run_dir = tmp_path / "run"
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    recorder = RunRecorder(run_dir)
    for row in rec.rows:
        recorder.record(row)
    write_report(run_dir)
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["public_start"] is None and all(v["public_start"] == {} for v in rep["sites"].values())
    assert "## Public start" not in (run_dir / "report.md").read_text()


# --------------------------------------------------------------------------- the configuration


def test_the_pretrain_section_is_validated_naming_every_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        tiny(
            tmp_path,
            pretrain={"steps": 0, "batch_size": 1, "lr": 0.0, "text_lr": -1.0, "weight_decay": -0.1, "log_every": -1},
        )
    text = str(err.value)
    for key, value in (
        ("pretrain.steps", "0"),
        ("pretrain.batch_size", "1"),
        ("pretrain.lr", "0.0"),
        ("pretrain.text_lr", "-1.0"),
        ("pretrain.weight_decay", "-0.1"),
        ("pretrain.log_every", "-1"),
    ):
        assert f"'{key}'" in text and f"Found {value}" in text, key
    with pytest.raises(ConfigError, match=r"'pretrain.manifest_path' is required"):
        tiny(tmp_path, pretrain={"source": "manifest"})
    with pytest.raises(ConfigError, match=r"'pretrain.source' must be one of"):
        tiny(tmp_path, pretrain={"source": "internet"})
    with pytest.raises(ConfigError, match=r"unknown key 'pretrain.epochs'"):
        tiny(tmp_path, pretrain={"epochs": 3})
    with pytest.raises(ConfigError, match=r"'data.synthetic.pretrain_size' must be >= pretrain.batch_size = 8"):
        parse_config({"data": {"synthetic": {"pretrain_size": 4}}, "pretrain": dict(PRETRAIN)})
    with pytest.raises(ConfigError, match=r"'data.synthetic.pretrain_size' must be an integer >= 0. Found -1"):
        parse_config({"data": {"synthetic": {"pretrain_size": -1}}})
    # with a checkpoint given, no corpus is needed: the checkpoint is the public start
    cfg = parse_config({"pretrain": dict(PRETRAIN), "model": {"init_checkpoint": "start.npz"}})
    assert cfg.pretrain.enabled and cfg.model.init_checkpoint == "start.npz"
    shipped = load_config("configs/demo_public.toml")
    assert shipped.pretrain.enabled and shipped.data.synthetic.pretrain_size == 4096 and shipped.privacy.enabled


def test_a_manifest_is_a_public_corpus_too(tmp_path):
    """pretrain.source = "manifest": every record of the manifest, whatever its site or split; its hash is in the
    public start's key."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,report,site,split,Cardiomegaly"]
    for i in range(10):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,report number {i},{'a' if i % 2 else 'b'},{'train' if i < 6 else 'test'},{i % 2}")
    manifest = tmp_path / "public.csv"
    manifest.write_text("\n".join(rows) + "\n")
    cfg = tiny(tmp_path, pretrain={"source": "manifest", "manifest_path": str(manifest), "batch_size": 4, "steps": 2})
    corpus = ps.public_corpus(cfg)
    assert len(corpus) == 10 and corpus.images.shape[1:] == (32, 32)
    key = ps.public_start_key(cfg)
    got = ps.cached_public_start(cfg)
    assert got.trained and got.info["source"] == "manifest" and got.info["corpus_size"] == 10
    manifest.write_text(manifest.read_text().replace("report number 3", "report three"))
    assert ps.public_start_key(cfg) != key  # another manifest, another public start
    missing = tiny(tmp_path, pretrain={"source": "manifest", "manifest_path": str(tmp_path / "none.csv")})
    with pytest.raises(Exception, match="pretrain.manifest_path"):
        ps.public_corpus(missing)


def test_a_public_start_at_chance_level_is_recognised():
    """In-batch InfoNCE over B pairs scores log B when every embedding is the same (a collapsed model); the run
    warns then instead of starting every site from a model that learned nothing."""
    import math

    from secure_fedvlp.methods.public_start import at_chance

    assert at_chance(math.log(64), 64) and at_chance(4.159, 64) and at_chance(4.2, 64)
    assert not at_chance(3.2, 64) and not at_chance(float("nan"), 64) and not at_chance(0.7, 1)
