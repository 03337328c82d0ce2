"""Synthetic federation: deterministic, cached, and heterogeneous as configured."""

import numpy as np
import pytest

from secure_fedvlp.data import FINDINGS, SyntheticSpec, generate_federation, site_style
from secure_fedvlp.data.synthetic import NEGATIONS, NORMAL, SYNONYMS
from secure_fedvlp.errors import ConfigError

SMALL = SyntheticSpec(
    num_sites=3, train_per_site=40, val_per_site=8, test_per_site=16, public_size=8, image_size=32, seed=5
)


def _arrays(fed):
    return [
        (s.name, split.images, split.labels, split.reports)
        for s in fed.all_sites()
        for split in (s.train, s.val, s.test)
    ]


def test_deterministic_by_seed():
    a, b = generate_federation(SMALL), generate_federation(SMALL)
    for (n1, i1, l1, r1), (n2, i2, l2, r2) in zip(_arrays(a), _arrays(b), strict=True):
        assert n1 == n2 and np.array_equal(i1, i2) and np.array_equal(l1, l2) and r1 == r2
    c = generate_federation(SyntheticSpec(**{**SMALL.__dict__, "seed": 6}))
    assert not np.array_equal(a.sites[0].train.images, c.sites[0].train.images)


def test_cache_hit_and_corrupt_cache_regenerated(tmp_path):
    first = generate_federation(SMALL, cache_dir=tmp_path)
    files = list(tmp_path.glob("synthetic-*.npz"))
    assert len(files) == 1
    again = generate_federation(SMALL, cache_dir=tmp_path)
    for x, y in zip(_arrays(first), _arrays(again), strict=True):
        assert np.array_equal(x[1], y[1]) and x[3] == y[3]
    fresh = generate_federation(SMALL)
    np.testing.assert_allclose(first.sites[0].train.images, fresh.sites[0].train.images, atol=1 / 65535)
    sidecar = files[0].with_suffix(".json")
    assert sidecar.is_file() and '"seed": 5' in sidecar.read_text()
    files[0].write_bytes(b"not a zip")
    repaired = generate_federation(SMALL, cache_dir=tmp_path)
    assert np.array_equal(repaired.sites[0].train.images, first.sites[0].train.images)
    sidecar.write_text("{truncated")
    assert generate_federation(SMALL, cache_dir=tmp_path).sites[1].val.reports == first.sites[1].val.reports
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries behind


def test_site_intensity_statistics_follow_scanner_style():
    spec = SyntheticSpec(
        num_sites=4, train_per_site=60, val_per_site=4, test_per_site=4, public_size=0, image_size=32, seed=0
    )
    fed = generate_federation(spec)
    stds = [s.train.images.std() for s in fed.sites]
    contrasts = [site_style(spec, i)["contrast"] for i in range(4)]
    # image contrast follows the configured scanner contrast (rank order), and sites differ
    assert np.argmax(stds) == np.argmax(contrasts) and np.argmin(stds) == np.argmin(contrasts)
    assert max(stds) - min(stds) > 0.03


def test_prevalence_skew_grows_as_alpha_shrinks():
    def spread(alpha):
        spec = SyntheticSpec(
            num_sites=4,
            train_per_site=150,
            val_per_site=2,
            test_per_site=2,
            public_size=0,
            image_size=16,
            dirichlet_alpha=alpha,
            heldout_site=False,
            seed=2,
        )
        prev = np.stack([s.train.prevalence()[1:] for s in generate_federation(spec).sites])
        return prev.std(axis=0).mean()

    assert spread(0.2) > 2 * spread(100.0)


def _mentions(report, finding):
    low = report.lower()
    return any(
        p.format(side=side).split(" ")[-1] in low and p.format(side=side).lower() in low
        for p in SYNONYMS[finding]
        for side in ("left", "right")
    )


def test_reports_consistent_with_labels_and_masks():
    fed = generate_federation(SMALL)
    for s in fed.sites:
        ds = s.train
        for i in range(len(ds)):
            lab = ds.labels[i]
            assert lab[0] == (lab[1:].sum() == 0)  # no_finding exclusive
            for k, f in enumerate(FINDINGS[1:]):
                if lab[k + 1]:
                    assert _mentions(ds.reports[i], f), (f, ds.reports[i])
            if lab[0]:
                assert any(n in ds.reports[i].lower() for n in NORMAL)
            assert (ds.masks[i].sum() > 0) == bool(lab[1:].sum() > 0)
    assert all(NEGATIONS)


def test_missing_text_and_heldout_options():
    spec = SyntheticSpec(**{**SMALL.__dict__, "missing_text_fraction": 0.5, "heldout_site": False})
    fed = generate_federation(spec)
    assert fed.heldout is None
    last = fed.sites[-1].train
    frac = 1 - last.has_text.mean()
    assert 0.25 < frac < 0.75 and all(r == "" for r, h in zip(last.reports, last.has_text, strict=True) if not h)
    assert fed.sites[0].train.has_text.all()
    assert generate_federation(SMALL).heldout.role == "heldout"


@pytest.mark.parametrize(
    "field,value", [("num_sites", 0), ("dirichlet_alpha", 0.0), ("image_size", 8), ("missing_text_fraction", 1.0)]
)
def test_spec_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SyntheticSpec(**{field: value})
