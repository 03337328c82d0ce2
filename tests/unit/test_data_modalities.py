"""Sites declare what they hold (paired, image-only, text-only), in the synthetic federation and in manifests.

A site missing a modality holds no data for it (reports dropped or images zeroed, with ``has_text`` /
``has_image`` False in every split), the declaration survives the on-disk cache, and a manifest names it
per row, consistently per site, with a one-line error naming the file, row and value otherwise.
"""

import csv

import numpy as np
import pytest
from PIL import Image

from secure_fedvlp.config import parse_config
from secure_fedvlp.data import SyntheticSpec, generate_federation, load_manifest
from secure_fedvlp.errors import ConfigError, DataError

SPEC = SyntheticSpec(
    num_sites=3,
    train_per_site=12,
    val_per_site=4,
    test_per_site=6,
    public_size=4,
    image_size=32,
    seed=2,
    site_modalities=("paired", "image", "text"),
)


def _check(fed):
    paired, image, text = fed.sites
    assert [s.modality for s in fed.sites] == ["paired", "image", "text"]
    assert fed.heldout.modality == "paired"
    for split in ("train", "val", "test"):
        p, i, t = getattr(paired, split), getattr(image, split), getattr(text, split)
        assert p.has_image.all() and p.has_text.all()
        assert i.has_image.all() and not i.has_text.any() and all(r == "" for r in i.reports)
        assert i.images.std() > 0  # the images are kept
        assert t.has_text.all() and not t.has_image.any() and not t.images.any()
        assert all(t.reports)  # the reports are kept
        assert t.labels.shape == i.labels.shape == p.labels.shape  # every site keeps its finding labels
    assert fed.public.has_image.all() and fed.public.has_text.all()


def test_synthetic_sites_hold_only_their_declared_modality():
    _check(generate_federation(SPEC))


def test_the_modality_survives_the_cache(tmp_path):
    generate_federation(SPEC, cache_dir=tmp_path)
    _check(generate_federation(SPEC, cache_dir=tmp_path))  # read back from the cache


def test_dropping_a_modality_changes_nothing_else():
    paired = generate_federation(SyntheticSpec(**{**SPEC.__dict__, "site_modalities": ()}))
    mixed = generate_federation(SPEC)
    assert np.array_equal(paired.sites[1].train.images, mixed.sites[1].train.images)
    assert paired.sites[2].train.reports == mixed.sites[2].train.reports
    assert np.array_equal(paired.sites[2].train.labels, mixed.sites[2].train.labels)


@pytest.mark.parametrize(
    ("mods", "needle"),
    [(("paired", "audio"), "site_modalities"), (("paired", "image", "text", "image"), "names 4 sites")],
)
def test_bad_site_modalities_are_refused_naming_the_key(mods, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({"data": {"synthetic": {"num_sites": 3, "site_modalities": list(mods)}}})


def _manifest(tmp_path, rows):
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(tmp_path / name)
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "report", "site", "split", "labels", "modality"])
        w.writeheader()
        w.writerows(rows)
    return path


def _row(image, report, site, modality, split="train", labels="cardiomegaly"):
    return {"image": image, "report": report, "site": site, "split": split, "labels": labels, "modality": modality}


def test_manifest_declares_modalities_per_site(tmp_path):
    path = _manifest(
        tmp_path,
        [
            _row("a.png", "Enlarged heart.", "pairs", ""),
            _row("b.png", "", "images", "image"),
            _row("", "Small effusion.", "reports", "text", labels="pleural_effusion"),
            _row("missing.png", "No findings.", "reports", "text", labels="no_finding"),  # never read
        ],
    )
    fed = load_manifest(path, image_size=16)
    by = {s.name: s for s in fed.sites}
    assert {n: s.modality for n, s in by.items()} == {"images": "image", "pairs": "paired", "reports": "text"}
    assert by["images"].train.has_image.all() and not by["images"].train.has_text.any()
    rep = by["reports"].train
    assert rep.has_text.all() and not rep.has_image.any() and not rep.images.any()
    assert rep.reports == ["Small effusion.", "No findings."]


def test_manifest_refuses_a_site_with_two_modalities_and_an_unknown_one(tmp_path):
    path = _manifest(
        tmp_path,
        [
            _row("a.png", "x.", "s1", "image"),
            _row("b.png", "y.", "s1", "paired"),
            _row("c.png", "z.", "s2", "audio"),
        ],
    )
    with pytest.raises(DataError) as err:
        load_manifest(path, image_size=16)
    text = str(err.value)
    assert "row 3" in text and "'audio'" in text and "'modality'" in text
    path2 = _manifest(tmp_path, [_row("a.png", "x.", "s1", "image"), _row("b.png", "y.", "s1", "paired")])
    with pytest.raises(DataError, match=r"m.csv, row 2.*declared 'image' elsewhere but 'paired'"):
        load_manifest(path2, image_size=16)
