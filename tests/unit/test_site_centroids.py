"""The site's report centroids: a Gaussian release of sensitivity 1, recorded before it is made, made once per run,
and a per-sample decomposable objective on top of it (train.objective = "site_centroids")."""

import numpy as np
import pytest
import torch

from secure_fedvlp.config import parse_config
from secure_fedvlp.errors import ConfigError, PrivacyBudgetExhausted
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models import create_model
from secure_fedvlp.privacy import site_centroids as sc
from tests.unit.test_dp_recipe import _batch, _Public, _Site, assert_opacus_clips_each_records_true_gradient


def _unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------ the release itself
def test_one_record_moves_the_sums_by_at_most_one_whatever_it_is():
    """The sensitivity the ledger records (1) holds for the record an attacker would pick: one that opens an empty
    bin, one that joins the largest bin, one equal to a bin centre, one pointing away from every bin."""
    bins = sc.public_bins(_unit(40, seed=1), 6)
    site = _unit(200, seed=2)
    base = sc.bin_sums(site.float(), bins)
    worst = [bins[0].double(), -bins[0].double(), site[0], torch.nn.functional.normalize(torch.ones(8), dim=0)]
    worst += list(_unit(50, seed=3))
    for r in worst:
        added = sc.bin_sums(torch.cat([site, r[None]]).float(), bins)
        assert float((added - base).norm()) <= 1.0 + 1e-6
    removed = sc.bin_sums(site[1:].float(), bins)
    assert float((base - removed).norm()) == pytest.approx(1.0, abs=1e-6)


def test_a_report_embedding_that_is_not_unit_norm_is_refused():
    """Its contribution would exceed the sensitivity the ledger records."""
    bins = sc.public_bins(_unit(20), 4)
    with pytest.raises(ValueError, match="norm 1"):
        sc.bin_sums(torch.cat([_unit(5), 3 * _unit(1, seed=9)]).float(), bins)
    with pytest.raises(ValueError, match="match the bins"):
        sc.bin_sums(_unit(5, d=4).float(), bins)


def test_the_release_adds_gaussian_noise_of_the_recorded_sigma():
    sums = torch.zeros(64, 128, dtype=torch.float64)
    noised = sc.release(sums, 10.0, torch.Generator().manual_seed(0))
    assert float(noised.std()) == pytest.approx(10.0, rel=0.05) and abs(float(noised.mean())) < 0.5
    assert torch.equal(sc.release(sums + 1, 0.0, None), sums + 1)
    with pytest.raises(ValueError, match="generator"):
        sc.release(sums, 1.0, None)


def test_public_bins_are_deterministic_unit_vectors_and_centroids_drop_empty_bins():
    pub = _unit(30, seed=4)
    a, b = sc.public_bins(pub, 5), sc.public_bins(pub, 5)
    assert torch.equal(a, b) and a.shape == (5, 8)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(5))
    released = torch.zeros(5, 8, dtype=torch.float64)
    released[1, 0], released[3, 2] = 4.0, -2.0
    c = sc.centroids_of(released)
    assert c.shape == (2, 8) and float(c[0, 0]) == 1.0 and float(c[1, 2]) == -1.0
    with pytest.raises(ValueError, match="no non-zero row"):
        sc.centroids_of(torch.zeros(3, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ the objective
def _cfg(**privacy):
    return parse_config(
        {
            "model": {"name": "tiny", "trainable": "image_head"},
            "train": {"objective": "site_centroids", "site_centroids": 4, "batch_size": 4},
            "privacy": privacy,
        }
    )


def _setup(cfg, tmp_path=None):
    torch.manual_seed(0)
    m = create_model("tiny")
    m.restrict_trainable("image_head")
    site = _Site(["Cardiomegaly. No effusion.", "Left nodule. Right effusion. Normal heart.", "Clear lungs.", "x. y."])
    trainer = LocalTrainer(cfg, torch.device("cpu"), public=_Public(16, seed=1))
    trainer.release_dir = tmp_path
    return m, site, trainer


def test_a_records_loss_and_gradient_do_not_depend_on_its_batch_mates():
    m, site, trainer = _setup(_cfg())
    state = trainer.begin(m, TrainTask(1, "full", 1), {}, dataset=site)
    x = torch.from_numpy(site.images).unsqueeze(1)
    base = trainer.compute_loss(m, _batch(m, x, site.reports, [0, 1, 2, 3]), state, reduction="none")["loss"]
    grads = []
    for images, texts, index in (
        (x[:2], site.reports[:2], [0, 1]),
        (torch.cat([x[:1], torch.rand(2, 1, 32, 32)]), [site.reports[0], "q", "r"], [0, 3, 2]),
    ):
        m.zero_grad()
        loss = trainer.compute_loss(m, _batch(m, images, texts, index), state, reduction="none")["loss"]
        torch.testing.assert_close(loss[0], base[0])
        loss[0].backward()
        grads.append(m.image_head.weight.grad.clone())
        assert all(p.grad is None for p in m.text_head.parameters())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_clips_each_records_true_gradient(mode):
    """The norms Opacus computes equal each record's gradient norm taken alone; the clipped sum equals the hand-made
    one."""
    m, site, trainer = _setup(_cfg())
    state = trainer.begin(m, TrainTask(1, "full", 1), {}, dataset=site)
    batch = _batch(m, torch.from_numpy(site.images).unsqueeze(1), site.reports, [0, 1, 2, 3])
    assert_opacus_clips_each_records_true_gradient(m, trainer, state, batch, mode)


def test_the_centroids_are_the_sites_reports_not_the_public_ones():
    """Without noise, each centroid is the normalised sum of the site's report embeddings of one bin, and a site
    with other reports gets other centroids."""
    from secure_fedvlp.models.embed import embed_texts

    m, site, trainer = _setup(_cfg())
    c = trainer.site_centroids(m, TrainTask(1, "full", 1), site)
    pub = embed_texts(m, [r for r in trainer.public.reports if r], 64, torch.device("cpu"))
    emb = embed_texts(m, site.reports, 64, torch.device("cpu"))
    expected = sc.centroids_of(sc.bin_sums(emb, sc.public_bins(pub, 4)))
    torch.testing.assert_close(c, expected)
    other = trainer.site_centroids(m, TrainTask(1, "full", 1), _Site(["Pneumothorax.", "Large left effusion."] * 2))
    assert c.shape != other.shape or not torch.allclose(c, other)


# ------------------------------------------------------------------------------------------ accounting
def _dp_job(tmp_path, **train):
    """A tiny synthetic site and its DP trainer (the real Opacus engine), centroids kept in ``tmp_path``."""
    from secure_fedvlp.build import build_federation, build_model
    from secure_fedvlp.wrappers.compose import release_plan
    from secure_fedvlp.wrappers.dpsgd import DPTrainer, client_noise_multiplier
    from tests.unit.test_methods_contract import tiny_cfg

    privacy = {"enabled": True, "target_epsilon": 8.0, "grad_sample_mode": "ghost"}
    privacy.update(train.pop("privacy", {}))
    cfg = tiny_cfg(
        tmp_path,
        "fedavg",
        privacy=privacy,
        train={"objective": "site_centroids", "site_centroids": 3, "batch_size": 8, **train},
        model={"name": "tiny", "trainable": "image_head"},
        federation={"num_rounds": 3},
    )
    fed = build_federation(cfg)
    model = build_model(cfg)
    inner = LocalTrainer(cfg, torch.device("cpu"), fed.public)
    inner.release_dir = tmp_path / "site1"
    declared = cfg.require_declared_size("site1")
    z, q = client_noise_multiplier(cfg, release_plan(cfg), inner.declared_training_size(declared))
    dp = DPTrainer(inner, tmp_path / "ledger.jsonl", "site1", z, q, cfg.privacy, declared_size=declared)
    return cfg, model, fed.sites[0].train, dp


def test_under_dp_the_release_is_recorded_before_it_is_made_and_made_once_per_run(tmp_path):
    cfg, m, site, dp = _dp_job(tmp_path)
    made = []
    real = sc.bin_sums

    def watched(emb, bins):
        made.append([getattr(e, "what", type(e).__name__) for e in dp.ledger.events()])  # the ledger at that moment
        return real(emb, bins)

    sc.bin_sums = watched
    try:
        for r in (1, 2, 3):
            dp.fit(m, site, TrainTask(r, "full", 1), torch.Generator().manual_seed(r), {})
    finally:
        sc.bin_sums = real
    assert len(made) == 1 and made[0].count(sc.WHAT) == 1  # recorded before the sums existed, and made once
    releases = [e for e in dp.ledger.events() if getattr(e, "what", None) == sc.WHAT]
    assert len(releases) == 1 and releases[0].round == 1
    assert releases[0].sigma == sc.site_centroids_sigma(cfg) and releases[0].sensitivity == 1.0
    kept = torch.load(tmp_path / "site1" / sc.FILE, weights_only=True)
    assert kept.ndim == 2 and 1 <= kept.shape[0] <= 3
    assert dp.ledger.epsilon() <= cfg.privacy.target_epsilon + 1e-9  # the calibration left room for it


def test_a_budget_that_cannot_afford_the_release_makes_none(tmp_path):
    """A ledger that already holds another release: the DP-SGD job still fits, the centroid release does not; the
    ledger refuses it and nothing is computed, noised or kept."""
    from secure_fedvlp.privacy.events import GaussianEvent

    cfg, m, site, dp = _dp_job(tmp_path, site_centroids_budget_share=0.9, privacy={"noise_multiplier": 50.0})
    dp.ledger.record(GaussianEvent(sensitivity=1.0, sigma=1.0, what="an earlier release", round=0))
    with pytest.raises(PrivacyBudgetExhausted):
        dp.fit(m, site, TrainTask(1, "full", 1), torch.Generator().manual_seed(0), {})
    assert not (tmp_path / "site1" / sc.FILE).exists()
    assert not [e for e in dp.ledger.events() if getattr(e, "what", None) == sc.WHAT]


def test_the_calibrated_dp_sgd_noise_pays_for_the_release():
    from secure_fedvlp.wrappers.compose import release_plan
    from secure_fedvlp.wrappers.dpsgd import client_noise_multiplier

    with_release = _cfg(enabled=True, target_epsilon=1.0)
    plan = release_plan(with_release)
    assert [e.what for e in plan.once] == [sc.WHAT]
    z_with, _ = client_noise_multiplier(with_release, plan, 400)
    z_without, _ = client_noise_multiplier(with_release, plan.__class__(stages=plan.stages), 400)
    assert z_with > z_without
    assert plan.once[0].sigma == sc.site_centroids_sigma(with_release) and plan.once[0].sensitivity == 1.0
    # the release alone spends its share of the budget (the calibration never overshoots)
    from secure_fedvlp.privacy.accountant import epsilon_from_events

    alone = epsilon_from_events([plan.once[0]], 1e-5, "rdp")
    assert 0.24 <= alone <= 0.25 + 1e-9
    assert release_plan(_cfg()).once == ()  # without DP nothing is released, so nothing is planned


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"model": {"trainable": "heads"}}, "model.trainable"),
        ({"train": {"site_centroids_budget_share": 1.0}}, "train.site_centroids_budget_share"),
        ({"train": {"report_negatives": 2}}, "train.report_negatives"),
        ({"train": {"site_centroids": 0}}, "train.site_centroids"),
        ({"train": {"site_centroids_budget_share": float("nan")}}, "train.site_centroids_budget_share"),
    ],
)
def test_configs_where_the_objective_does_not_apply_are_refused_with_the_key_named(overrides, key):
    data = {"model": {"name": "tiny", "trainable": "image_head"}, "train": {"objective": "site_centroids"}}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(data)


def test_an_empty_site_releases_no_centroid_and_a_noised_release_is_finite():
    with pytest.raises(ValueError, match="no non-zero row"):
        sc.centroids_of(sc.release(torch.zeros(2, 4, dtype=torch.float64), 0.0, None))
    assert np.isfinite(
        sc.centroids_of(
            sc.release(torch.zeros(2, 4, dtype=torch.float64), 1.0, torch.Generator().manual_seed(1))
        ).numpy()
    ).all()
