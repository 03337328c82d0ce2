"""Downstream evaluation: label fractions, the linear probe, Dice (MONAI), the decoder, and masks in manifests."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss
from PIL import Image

from secure_fedvlp.data import load_manifest
from secure_fedvlp.data.images import decode_siim_rle
from secure_fedvlp.data.spec import SyntheticSpec
from secure_fedvlp.data.synthetic import generate_federation
from secure_fedvlp.data.types import FINDINGS
from secure_fedvlp.errors import DataError, ProtocolError
from secure_fedvlp.evaluation.downstream import (
    ProbeSettings,
    evaluate_decoder,
    label_fraction_indices,
    linear_probe,
    site_downstream,
    train_decoder,
)
from secure_fedvlp.models import create_model
from secure_fedvlp.models.segmentation import dice_loss, encoder_features, feature_channels, per_image_dice


def test_dice_counts_empty_on_empty_as_one_and_scores_overlap():
    masks = torch.zeros(4, 1, 4, 4)
    masks[1, 0, :2, :2] = 1  # 4 lesion pixels
    masks[2, 0, :2, :2] = 1
    masks[3, 0, :2, :2] = 1
    logits = torch.full((4, 1, 4, 4), -5.0)  # image 0: empty on empty; image 1: empty on lesion
    logits[2, 0, :2, :2] = 5.0  # image 2: exact
    logits[3, 0, :2, :] = 5.0  # image 3: 8 predicted, 4 right -> 2*4/(8+4)
    np.testing.assert_allclose(per_image_dice(logits, masks).numpy(), [1.0, 0.0, 1.0, 2 * 4 / 12], atol=1e-6)
    logits[0, 0, 3, 3] = 0.1  # sigmoid 0.525 > 0.5: one false pixel on an empty mask scores 0
    assert per_image_dice(logits, masks)[0] == 0.0
    assert isinstance(dice_loss(), DiceLoss)
    with pytest.raises(ValueError, match="shapes differ"):
        per_image_dice(logits, masks[:2])


def test_label_fractions_are_seeded_subsamples():
    a = label_fraction_indices(200, 0.1, seed=0)
    assert len(a) == 20 and len(set(a)) == 20 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, label_fraction_indices(200, 0.1, seed=0))
    assert not np.array_equal(a, label_fraction_indices(200, 0.1, seed=1))
    assert len(label_fraction_indices(200, 0.001, seed=0)) == 1  # at least one record
    np.testing.assert_array_equal(label_fraction_indices(7, 1.0, seed=3), np.arange(7))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        label_fraction_indices(10, 0.0, seed=0)


def test_linear_probe_separates_a_linear_signal_and_scores_constant_findings_as_chance():
    rng = np.random.default_rng(0)
    n, d = 300, 8
    y = (rng.random((n, len(FINDINGS))) < 0.3).astype(np.float32)
    x = rng.normal(size=(n, d)) * 0.3
    x[:, : len(FINDINGS)] += 2.0 * y  # finding f is readable off feature f
    full = linear_probe(x[:200], y[:200], x[200:], y[200:], fraction=1.0, seed=0)
    assert full["auroc_macro"] > 0.95 and full["num_train"] == 200 and full["constant_findings"] == 0
    one = linear_probe(x[:200], y[:200], x[200:], y[200:], fraction=0.005, seed=0)  # one record: one class each
    assert one["num_train"] == 1 and one["constant_findings"] == len(FINDINGS)
    assert one["auroc_macro"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def site_and_model(tmp_path_factory):
    spec = SyntheticSpec(
        num_sites=1, train_per_site=48, val_per_site=2, test_per_site=24, public_size=0, image_size=32, seed=5
    )
    fed = generate_federation(spec, tmp_path_factory.mktemp("cache"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("tiny")
    return fed.sites[0], model


def test_decoder_on_a_frozen_encoder_learns_the_lesion_masks(site_and_model):
    site, model = site_and_model
    enc = model.image_encoder
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    feats = encoder_features(enc, site.train.images[:3])
    assert [f.shape[1] for f in feats] == feature_channels(enc)
    settings = ProbeSettings(seeds=1, seg_steps=30, seg_batch_size=8, seg_width=8)
    dec = train_decoder(enc, site.train, settings=settings, seed=0)
    dice = evaluate_decoder(enc, dec, site.test)
    assert dice.shape == (len(site.test),) and ((dice >= 0) & (dice <= 1)).all()
    lesion = site.test.masks.reshape(len(site.test), -1).any(1)
    assert dice[lesion].mean() > 0.3  # far above an all-empty prediction, which scores 0 on every lesion
    assert all(torch.equal(p, before[n]) for n, p in enc.named_parameters())  # the encoder stayed frozen


def test_site_downstream_reports_flat_metrics_per_fraction(site_and_model):
    site, model = site_and_model
    settings = ProbeSettings(fractions=(0.1, 1.0), seeds=2, seg_steps=5)
    out = site_downstream(model, site, tasks=["linear", "segmentation"], settings=settings)
    assert out["linear@0.1/num_train"] == 5 and out["linear@1/num_train"] == 48
    assert 0 <= out["linear@1/auroc_macro"] <= 1 and out["linear@1/auroc_macro/std"] == 0.0
    assert 0 <= out["segmentation/dice"] <= 1 and "segmentation/dice_lesion/std" in out
    assert all(isinstance(v, float) for v in out.values())
    with pytest.raises(ValueError, match="unknown downstream task"):
        site_downstream(model, site, tasks=["detection"], settings=settings)


def _rle(mask: np.ndarray) -> str:
    """SIIM-ACR encoding (relative starts, column-major) of a bool mask, written independently of the decoder."""
    flat = mask.T.reshape(-1)
    runs, pos, i = [], 0, 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            runs += [i - pos, j - i]
            pos, i = j, j
        else:
            i += 1
    return " ".join(map(str, runs)) if runs else "-1"


def test_siim_rle_round_trips_and_rejects_bad_runs():
    rng = np.random.default_rng(1)
    m = rng.random((6, 9)) < 0.3
    np.testing.assert_array_equal(decode_siim_rle(_rle(m), 6, 9), m)
    assert not decode_siim_rle("-1", 4, 4).any()
    with pytest.raises(ValueError, match="pairs"):
        decode_siim_rle("3 2 1", 4, 4)
    with pytest.raises(ValueError, match="past the end"):
        decode_siim_rle("10 10", 4, 4)


def test_manifest_mask_column_png_and_rle(tmp_path):
    img = np.full((16, 16), 100, np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    lesion = np.zeros((16, 16), bool)
    lesion[2:6, 3:9] = True
    Image.fromarray((lesion * 255).astype(np.uint8)).save(tmp_path / "a_mask.png")
    rows = [
        {"image": "a.png", "report": "x", "site": "A", "split": "train", "labels": "nodule", "mask": "a_mask.png"},
        {"image": "a.png", "report": "y", "site": "A", "split": "train", "labels": "", "mask": _rle(lesion)},
        {"image": "a.png", "report": "z", "site": "A", "split": "test", "labels": "", "mask": "-1"},
        {"image": "a.png", "report": "w", "site": "B", "split": "train", "labels": "", "mask": ""},
    ]
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fed = load_manifest(path, image_size=8)
    a = fed.site("A")
    expected = lesion.reshape(8, 2, 8, 2).any(axis=(1, 3))  # max-pooled to 8 x 8
    np.testing.assert_array_equal(a.train.masks[0], expected)
    np.testing.assert_array_equal(a.train.masks[1], expected)  # the RLE gives the same mask as the PNG
    assert not a.test.masks.any() and fed.site("B").train.masks is None  # not annotated: no masks
    rows[0]["mask"] = "missing.png"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=r"m\.csv.*row 1.*'mask'.*missing\.png"):
        load_manifest(path, image_size=8)


# ----------------------------------------------------------------------------- a finished run, evaluated


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("federation-cache")


def _finished_run(tmp_path, cache, release="clear"):
    """A run directory as `secure-fedvlp run` leaves it: resolved config, metrics, the final parameters."""
    from secure_fedvlp.build import build_model
    from secure_fedvlp.config import config_to_dict, dump_toml, parse_config
    from secure_fedvlp.models.state import federated_state

    cfg = parse_config(
        {
            "run": {"seed": 0, "device": "cpu"},
            "data": {
                "cache_dir": str(cache),
                "synthetic": {
                    "num_sites": 2,
                    "heldout_site": True,
                    "train_per_site": 30,
                    "val_per_site": 2,
                    "test_per_site": 12,
                    "public_size": 4,
                    "image_size": 32,
                    "seed": 3,
                    "heldout_train_size": 12,
                },
            },
            "model": {"name": "tiny"},
            "eval": {"release": release, "downstream_fractions": [0.1, 1.0], "downstream_seeds": 2},
        }
    )
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(cfg)))
    (run_dir / "metrics.jsonl").write_text("")
    state = federated_state(build_model(cfg))
    rng = np.random.default_rng(0)
    state = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in state.items()}
    np.savez(run_dir / "model" / "federated_params.npz", **state)
    return run_dir, cfg


FAST = ProbeSettings(fractions=(0.1, 1.0), seeds=2, seg_steps=2, seg_batch_size=4, seg_width=4)


def test_evaluate_run_releases_site_metrics_into_the_report(tmp_path, data_cache):
    """Each site evaluates the untrained and final models on its own records; the report shows them per site,
    worst training site and held-out site, and names the metrics as released without DP."""
    from secure_fedvlp.evaluation.downstream_run import evaluate_run
    from secure_fedvlp.evaluation.report import write_report
    from secure_fedvlp.layout import RunLayout

    run_dir, cfg = _finished_run(tmp_path, data_cache)
    out = evaluate_run(run_dir, tasks=["linear", "segmentation"], settings=FAST)
    assert set(out["sites"]) == {"site1", "site2", "heldout"} and out["sites"]["heldout"]["role"] == "heldout"
    for site in out["sites"].values():
        assert set(site["models"]) == {"untrained", "final"}  # no public start in this run
        assert {"linear@0.1/auroc_macro", "linear@1/auroc_macro", "segmentation/dice"} <= set(site["models"]["final"])
    layout = RunLayout(run_dir)
    kept = [json.loads(line) for line in layout.site_downstream("site1").read_text().splitlines()]
    assert [r["key"]["model"] for r in kept] == ["untrained", "final"]
    md = write_report(run_dir).read_text()
    assert "## Downstream evaluation" in md and "| heldout | heldout | segmentation/dice |" in md
    rep = json.loads(layout.report_json.read_text())
    summary = rep["downstream"]["summary"]["linear@1/auroc_macro"]["final"]
    assert summary["worst_site"] in ("site1", "site2") and set(summary["heldout"]) == {"heldout"}
    assert any("downstream evaluation metrics" in line for line in rep["not_covered"])
    # asked again: the same numbers, from the site's record (nothing new is computed or released)
    again = evaluate_run(run_dir, tasks=["linear", "segmentation"], settings=FAST)
    assert again["sites"] == out["sites"]
    assert len(layout.site_downstream("site1").read_text().splitlines()) == 2


def test_a_run_from_a_public_start_reports_it_beside_the_untrained_model(tmp_path, data_cache):
    """A run with ``pretrain.enabled`` (its config names the run's own public start as ``model.init_checkpoint``)
    is evaluated downstream for three models: the seeded untrained one, the public start and the final one."""
    from secure_fedvlp.build import build_model
    from secure_fedvlp.config import config_to_dict, dump_toml
    from secure_fedvlp.evaluation.downstream_run import encoder_hash, evaluate_run, reference_models
    from secure_fedvlp.layout import RunLayout, load_run
    from secure_fedvlp.models.checkpoint import full_state, save_checkpoint

    run_dir, cfg = _finished_run(tmp_path, data_cache)
    layout = RunLayout(run_dir)
    rng = np.random.default_rng(1)
    public = {
        k: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in full_state(build_model(cfg)).items()
    }
    save_checkpoint(public, layout.public_start)
    with_start = dataclasses.replace(
        cfg,
        pretrain=dataclasses.replace(cfg.pretrain, enabled=True),
        model=dataclasses.replace(cfg.model, init_checkpoint=str(layout.public_start)),
    )
    (run_dir / "config.toml").write_text(dump_toml(config_to_dict(with_start)))
    layout.report_json.write_text(json.dumps({"public_start": {"source": "synthetic", "epsilon": 0.0}}))
    models = dict(reference_models(load_run(run_dir)))
    assert list(models) == ["untrained", "public_start", "final"]
    digests = {name: encoder_hash(build()) for name, build in models.items()}
    assert len(set(digests.values())) == 3
    assert digests["untrained"] == encoder_hash(build_model(cfg))  # the seeded model, not the public start
    out = evaluate_run(run_dir, tasks=["linear"], settings=FAST)
    for site in out["sites"].values():
        assert set(site["models"]) == {"untrained", "public_start", "final"}


def test_local_release_keeps_downstream_metrics_at_the_site(tmp_path, data_cache):
    from secure_fedvlp.evaluation.downstream_run import evaluate_run
    from secure_fedvlp.layout import RunLayout

    run_dir, _ = _finished_run(tmp_path, data_cache, release="local")
    out = evaluate_run(run_dir, tasks=["linear"], settings=FAST, sites=["site2"])
    assert out["sites"] == {
        "site2": {"role": "train", "models": {"untrained": "kept_at_site", "final": "kept_at_site"}}
    }
    assert "linear@1/auroc_macro" in (RunLayout(run_dir).site_downstream("site2").read_text())
    assert "auroc" not in RunLayout(run_dir).downstream_results.read_text()


def test_a_site_evaluates_one_encoder_per_model_name(tmp_path, data_cache):
    """A second, different 'final' model (a server probing a site's records with crafted encoders) is refused,
    as is an 'untrained' model that is not the seeded one."""
    from secure_fedvlp.evaluation.downstream_run import evaluate_run
    from secure_fedvlp.layout import RunLayout

    run_dir, _ = _finished_run(tmp_path, data_cache)
    evaluate_run(run_dir, tasks=["linear"], settings=FAST, sites=["site1"])
    path = RunLayout(run_dir).model_params
    crafted = {k: v * 1.5 for k, v in np.load(path).items()}
    np.savez(path, **crafted)
    with pytest.raises(ProtocolError, match="site1: model 'final' was already evaluated with another image encoder"):
        evaluate_run(run_dir, tasks=["linear"], settings=FAST, sites=["site1"])
    from secure_fedvlp.build import build_federation, build_model
    from secure_fedvlp.evaluation.downstream_run import SiteDownstream, encoder_hash
    from secure_fedvlp.layout import load_run

    cfg = load_run(run_dir).cfg
    site = build_federation(cfg).site("site2")
    runner = SiteDownstream(RunLayout(run_dir), site, encoder_hash(build_model(cfg)))
    fake = build_model(cfg)
    with torch.no_grad():
        next(fake.image_encoder.parameters()).add_(1.0)
    with pytest.raises(ProtocolError, match="not the seeded initial model"):
        runner.evaluate("untrained", fake, ["linear"], FAST, "cpu")


def test_cli_evaluate_and_its_errors(tmp_path, data_cache, capsys):
    from secure_fedvlp.cli import main

    run_dir, _ = _finished_run(tmp_path, data_cache)
    assert (
        main(["evaluate", str(run_dir), "--tasks", "linear", "--fractions", "0.5", "--seeds", "1", "--sites", "site1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "## Downstream evaluation" in out and "linear@0.5/auroc_macro" in out
    assert main(["evaluate", str(run_dir), "--tasks", "detection"]) == 2
    assert "detection" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir), "--fractions", "0,1"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    (run_dir / "model" / "federated_params.npz").unlink()
    (run_dir / "model" / "global_model.ckks").write_bytes(b"x")
    assert main(["evaluate", str(tmp_path / "run"), "--tasks", "linear", "--seeds", "1", "--fractions", "0.2"]) == 2
    assert "secure-fedvlp export" in capsys.readouterr().err


def test_pooled_segmentation_reference_is_scored_at_every_site(tmp_path, data_cache):
    from secure_fedvlp.evaluation.downstream_run import evaluate_run

    run_dir, _ = _finished_run(tmp_path, data_cache)
    one = ProbeSettings(fractions=(1.0,), seeds=1, seg_steps=2, seg_batch_size=4, seg_width=4)
    out = evaluate_run(run_dir, tasks=["segmentation_pooled"], settings=one)
    for site in ("site1", "site2", "heldout"):
        got = out["sites"][site]["models"]["final"]
        assert set(got) == {
            "segmentation_pooled/dice",
            "segmentation_pooled/dice/std",
            "segmentation_pooled/dice_lesion",
            "segmentation_pooled/dice_lesion/std",
        }
        assert 0 <= got["segmentation_pooled/dice"] <= 1
