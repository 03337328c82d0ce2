"""DP-SGD on the real model: per-sample gradients, decomposability, pitfalls, ledger and budgets."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from secure_fedvlp.build import build_federation, build_model
from secure_fedvlp.config import parse_config
from secure_fedvlp.errors import ConfigError, PrivacyBudgetExhausted
from secure_fedvlp.methods.feddra import FedDRATrainer
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models import create_model
from secure_fedvlp.models.state import federated_state, make_collate
from secure_fedvlp.objectives import AnchorGuidanceLoss, DecomposableContrastiveLoss, InfoNCELoss
from secure_fedvlp.privacy import replay
from secure_fedvlp.wire import arrays_to_numpy
from secure_fedvlp.wrappers.compose import release_plan
from secure_fedvlp.wrappers.dpsgd import DPTrainer, client_noise_multiplier
from tests.unit.test_methods_contract import run_method, tiny_cfg


def _batch(model, n=5, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    texts = [
        "no acute findings",
        "small left effusion. no pneumothorax",
        "the heart is enlarged",
        "right apical pneumothorax",
        "a nodular density in the left lung",
        "patchy right airspace disease",
    ]
    tok = model.tokenize([texts[(seed + i) % len(texts)] for i in range(n)])
    return torch.rand(n, 1, size, size, generator=g), tok["input_ids"], tok["attention_mask"]


def _banks(dim, k=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1),
        torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1),
    )


def _loss_fn(model, anchor_out, banks):
    loss, anchor = DecomposableContrastiveLoss(), AnchorGuidanceLoss("mse")

    def f(m, x, ids, mask, idx):
        out = m(x, ids, mask)
        total = loss(out["image_emb"], out["text_emb"], model.logit_scale, *banks)["loss"]
        return (
            total
            + anchor(out["image_emb"], out["text_emb"], anchor_out["image_emb"][idx], anchor_out["text_emb"][idx])[
                "loss"
            ]
        )

    return f


def _per_sample_opacus(model, f, x, ids, mask, mode):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    try:
        f(gsm, x, ids, mask, slice(None)).backward()
        return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)


def _per_sample_reference(model, f, x, ids, mask):
    """Microbatch of one: ordinary autograd on each record alone."""
    out = {n: [] for n, p in model.named_parameters() if p.requires_grad}
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        keep = ids[i : i + 1, : int(mask[i].sum())]
        f(model, x[i : i + 1], keep, mask[i : i + 1, : keep.shape[1]], slice(i, i + 1)).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                out[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def _check_per_sample(model, mode, size):
    model.train()
    for m in model.modules():  # dropout off so the reference and Opacus see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x, ids, mask = _batch(model, n=4, size=size)
    with torch.no_grad():
        anchor_out = model(x, ids, mask)
        anchor_out = {k: v + 0.01 for k, v in anchor_out.items()}
    f = _loss_fn(model, anchor_out, _banks(model.spec.embed_dim))
    ours = _per_sample_opacus(model, f, x, ids, mask, mode)
    ref = _per_sample_reference(model, f, x, ids, mask)
    assert ours.keys() == ref.keys() and len(ours) > 10
    for n in ours:
        # Under loss_reduction="mean" Opacus rescales by the batch size, so grad_sample[i] is
        # the gradient of record i's own loss: exactly the microbatch-of-one gradient.
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_match_microbatch_of_one_tiny(mode):
    torch.manual_seed(0)
    _check_per_sample(create_model("tiny"), mode, 32)


@pytest.mark.slow
def test_per_sample_gradients_match_microbatch_of_one_real_minilm():
    torch.manual_seed(0)
    _check_per_sample(create_model("demo"), "hooks", 64)


def _record0_grad(model, loss_kind, others_seed):
    x, ids, mask = _batch(model, n=4, seed=0)
    x2, ids2, mask2 = _batch(model, n=4, seed=others_seed)
    # record 0 fixed; records 1..3 replaced
    L = max(ids.shape[1], ids2.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, L - t.shape[1]))  # noqa: E731
    ids_b, mask_b = pad(ids2).clone(), pad(mask2).clone()
    ids_b[0], mask_b[0] = pad(ids)[0], pad(mask)[0]
    xb = x2.clone()
    xb[0] = x[0]
    banks = _banks(model.spec.embed_dim)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        out = gsm(xb, ids_b, mask_b)
        if loss_kind == "decomposable":
            loss = DecomposableContrastiveLoss()(out["image_emb"], out["text_emb"], model.logit_scale, *banks)["loss"]
        else:
            loss = InfoNCELoss()(out["image_emb"], out["text_emb"], model.logit_scale)["loss"]
        loss.backward()
        return torch.cat([p.grad_sample[0].reshape(-1) for p in model.parameters() if p.requires_grad])
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)


def test_decomposable_loss_record_gradient_independent_of_batch_and_coupled_loss_is_not():
    torch.manual_seed(0)
    model = create_model("tiny")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    a, b = _record0_grad(model, "decomposable", 1), _record0_grad(model, "decomposable", 3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    c, d = _record0_grad(model, "infonce", 1), _record0_grad(model, "infonce", 3)
    assert (c - d).abs().max() > 1e-3


def test_coupled_objective_with_dp_is_a_config_error_that_explains_why():
    with pytest.raises(ConfigError, match="per-sample clipping does not bound"):
        parse_config({"privacy": {"enabled": True}, "train": {"objective": "infonce"}})


# -- the two Opacus pitfalls, root-caused (docs/opacus_pitfalls.md) -------------------


class _ClipWithRawScale(torch.nn.Module):
    """CLIP-style: towers plus a raw logit_scale parameter on the module itself."""

    def __init__(self, text):
        super().__init__()
        self.img = torch.nn.Linear(4, 8)
        self.text = text
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))


def test_pitfall_raw_parameter_on_custom_module_rejects_model_with_buffers():
    tiny = create_model("tiny")
    raw = _ClipWithRawScale(tiny.text_encoder)  # the BERT tower holds buffers (position ids)
    errors = GradSampleModule.validate(raw, strict=False)
    assert errors and "buffers" in str(errors[0])
    assert GradSampleModule.validate(tiny, strict=False) == []  # LogitScale module + grad sampler: accepted


def test_pitfall_eval_mode_text_tower_gives_no_activations_and_factory_returns_train_mode():
    model = create_model("tiny")
    assert model.training and model.text_encoder.encoder.training
    model.text_encoder.encoder.eval()  # what transformers' from_pretrained returns
    x, ids, mask = _batch(model, n=3)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        out = gsm(x, ids, mask)
        with pytest.raises(ValueError, match="No activations detected"):
            out["text_emb"].sum().backward()
    finally:
        gsm._close()


# -- DPTrainer: ledger before release, budgets ------------------------------------------


def _dp_setup(tmp_path, **privacy):
    cfg = tiny_cfg(
        tmp_path,
        "fedavg",
        privacy={"enabled": True, "noise_multiplier": 1.0, **privacy},
        train={"objective": "decomposable"},
    )
    fed = build_federation(cfg)
    model = build_model(cfg)
    inner = LocalTrainer(cfg, torch.device("cpu"), fed.public)
    declared = cfg.require_declared_size("site1")
    z, q = client_noise_multiplier(cfg, release_plan(cfg), inner.declared_training_size(declared))
    return (
        cfg,
        fed,
        model,
        DPTrainer(inner, tmp_path / "ledger.jsonl", "site1", z, q, cfg.privacy, declared_size=declared),
    )


def test_dp_fit_records_event_before_training_and_replay_matches(tmp_path):
    cfg, fed, model, dp = _dp_setup(tmp_path)
    before = federated_state(model)
    m = dp.fit(model, fed.sites[0].train, TrainTask(1, "full", 3), torch.Generator().manual_seed(0), before)
    after = federated_state(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    events = dp.ledger.events()
    assert len(events) == 1 and events[0].steps == 3 and events[0].noise_multiplier == 1.0
    assert m["epsilon"] == pytest.approx(replay(tmp_path / "ledger.jsonl").get_epsilon(cfg.privacy.delta))
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_restarted_client_resumes_its_history_and_budget(tmp_path):
    """A client process that restarts (a new DPTrainer on the same ledger file) composes with what the
    earlier process spent: never a fresh accountant, and the budget counts the earlier rounds."""
    cfg, fed, model, dp = _dp_setup(tmp_path)
    dp.fit(model, fed.sites[0].train, TrainTask(1, "full", 3), torch.Generator().manual_seed(0), federated_state(model))
    first = dp.ledger.epsilon()
    _, _, model2, restarted = _dp_setup(tmp_path)  # same ledger path, new trainer, new model object
    m = restarted.fit(
        model2, fed.sites[0].train, TrainTask(2, "full", 3), torch.Generator().manual_seed(1), federated_state(model2)
    )
    events = restarted.ledger.events()
    assert [e.round for e in events] == [1, 2]
    assert m["epsilon"] > first
    assert m["epsilon"] == pytest.approx(replay(tmp_path / "ledger.jsonl").get_epsilon(cfg.privacy.delta))
    # a budget between one job's cost and two jobs' cost: the restarted trainer must refuse the second job
    budget = 0.5 * (first + m["epsilon"])
    _, _, model3, tight = _dp_setup(tmp_path / "tight", target_epsilon=budget)
    tight.fit(
        model3, fed.sites[0].train, TrainTask(1, "full", 3), torch.Generator().manual_seed(0), federated_state(model3)
    )
    _, _, model4, tight_restarted = _dp_setup(tmp_path / "tight", target_epsilon=budget)
    with pytest.raises(PrivacyBudgetExhausted):
        tight_restarted.fit(
            model4,
            fed.sites[0].train,
            TrainTask(2, "full", 3),
            torch.Generator().manual_seed(1),
            federated_state(model4),
        )
    assert len(tight_restarted.ledger.events()) == 1


@pytest.mark.parametrize("secure_mode", [False, True])
def test_noise_and_batches_are_unpredictable_unless_seeded(tmp_path, secure_mode):
    """The job generator is derived from run.seed, which the server holds: by default DP-SGD's batches and
    noise must not follow from it (two fits from the same job seed differ); seeded_randomness makes them
    reproducible (two fits agree exactly)."""

    def fit_once(sub, seeded):
        cfg, fed, model, dp = _dp_setup(tmp_path / sub, seeded_randomness=seeded, secure_mode=secure_mode)
        torch.manual_seed(0)
        dp.fit(
            model, fed.sites[0].train, TrainTask(1, "full", 2), torch.Generator().manual_seed(7), federated_state(model)
        )
        return federated_state(model), dp

    a, dp = fit_once("a", False)
    b, _ = fit_once("b", False)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    s1, _ = fit_once("s1", True)
    s2, _ = fit_once("s2", True)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    # the generators themselves: same job seed, different draws by default; equal when seeded
    g1, g2 = (
        dp.private_generators(torch.Generator().manual_seed(7)),
        dp.private_generators(torch.Generator().manual_seed(7)),
    )
    assert not torch.equal(torch.rand(8, generator=g1[0]), torch.rand(8, generator=g2[0]))
    assert not torch.equal(torch.randn(8, generator=g1[1]), torch.randn(8, generator=g2[1]))


def test_budget_refused_before_any_step(tmp_path):
    cfg, fed, model, dp = _dp_setup(tmp_path, target_epsilon=0.5)
    before = federated_state(model)
    with pytest.raises(PrivacyBudgetExhausted):
        dp.fit(model, fed.sites[0].train, TrainTask(1, "full", 500), torch.Generator().manual_seed(0), before)
    after = federated_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing trained
    assert len(dp.ledger.events()) == 0  # nothing recorded either


def test_calibrated_noise_fits_the_whole_run(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "feddra", privacy={"enabled": True, "target_epsilon": 4.0}, train={"objective": "decomposable"}
    )
    plan = release_plan(cfg)
    z, q = client_noise_multiplier(cfg, plan, 18)
    from secure_fedvlp.privacy import epsilon_from_events

    p = cfg.privacy
    events = plan.events(
        cfg.federation.num_rounds,
        noise_multiplier=z,
        sample_rate=q,
        clip_norm=p.clip_norm,
        report_clip=p.report_clip,
        report_noise_multiplier=p.report_noise_multiplier,
    )
    eps = epsilon_from_events(events, cfg.privacy.delta)
    assert eps <= 4.0 and eps > 3.9


def test_fedaid_calibrated_for_the_steps_it_trains(tmp_path):
    """FedAID trains feddra.stage2_steps per round; calibrated for train.local_steps instead, every site ran out
    of budget in round 2 of 3 (local_steps = 2, stage2_steps = 6).  Calibrated from its plan, the run spends
    its budget exactly over the planned rounds."""
    cfg = tiny_cfg(
        tmp_path,
        "fedaid",
        privacy={"enabled": True, "target_epsilon": 8.0},
        train={"objective": "decomposable", "local_steps": 2},
        feddra={"stage1_steps": 1, "stage2_steps": 6},
        federation={"num_rounds": 3},
    )
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=3)
    assert not [r for r in rec.rows if r.get("status") == "budget_exhausted"]
    ledgers = sorted((tmp_path / "run" / "clients").glob("*/privacy_ledger.jsonl"))
    assert len(ledgers) == 2
    for path in ledgers:
        acc = replay(path)
        assert [e.steps for e in acc.history if type(e).__name__ == "DPSGDEvent"] == [6, 6, 6]
        assert 8.0 - 0.01 <= acc.get_epsilon(cfg.privacy.delta) <= 8.0


def test_dp_run_end_to_end_ledgers_and_stopped_client(tmp_path):
    # FedAID under DP: training steps and noised DRO reports land in each client's ledger;
    # a budget too small for round 2 stops the clients, and the run goes on and says so.
    cfg = tiny_cfg(
        tmp_path,
        "fedaid",
        privacy={"enabled": True, "noise_multiplier": 1.5, "target_epsilon": 6.0},
        train={"objective": "decomposable"},
    )
    strategy, result, rec, grid, init = run_method(cfg, tmp_path, rounds=3)
    ledgers = sorted((tmp_path / "run" / "clients").glob("*/privacy_ledger.jsonl"))
    assert len(ledgers) == 2
    for path in ledgers:
        events = replay(path).history
        kinds = [type(e).__name__ for e in events]
        assert "DPSGDEvent" in kinds and "GaussianEvent" in kinds
        assert replay(path).get_epsilon(cfg.privacy.delta) <= 6.0
    stopped = [r for r in rec.rows if r.get("status") == "budget_exhausted"]
    assert stopped and strategy.stopped
    assert all(r["epsilon"] <= 6.0 for r in stopped)
    assert {r["round"] for r in stopped} == {3}  # rounds 1 and 2 fit the budget, round 3 does not


# -- ghost clipping (Opacus fast gradient clipping) ---------------------------------------


def _private_grad(model, per_record_loss_fn, mode, clip_norm, batch_size):
    """``.grad`` after one noise-free PrivateGradient backward in ``mode`` (and the ghost norms)."""
    from secure_fedvlp.wrappers.dpsgd import PrivateGradient

    params = [p for p in model.parameters() if p.requires_grad]
    pg = PrivateGradient(
        model,
        torch.optim.SGD(params, lr=0.0),
        mode=mode,
        clipping="flat",
        clip_norm=clip_norm,
        noise_multiplier=0.0,
        expected_batch_size=batch_size,
    )
    try:
        pg.zero_grad()
        pg.backward(per_record_loss_fn(pg.module))
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        norms = pg.module.per_sample_gradient_norms.detach().clone() if mode == "ghost" else None
        return grads, norms
    finally:
        pg.close()
        model.zero_grad(set_to_none=True)


def _assert_same_gradient(a, b):
    scale = max(float(v.abs().max()) for v in a.values())
    for n in a:
        # atol relative to the largest coordinate: some gradients are zero in exact arithmetic
        # (attention key biases: softmax ignores a per-query constant) and are rounding noise in both.
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_ghost_clipped_gradient_equals_hooks_on_the_demo_model(tmp_path):
    """Real demo model (GroupNorm CNN + MiniLM upper layer + heads + LogitScale), the FedDRA
    per-record objective (contrastive with public negatives + anchor guidance), noise 0:
    ghost clipping's clipped, summed gradient equals hooks mode's, with the clip norm set
    so that some records are clipped and some are not."""
    from secure_fedvlp.build import build_federation

    cfg = parse_config(
        {
            "model": {"name": "demo"},
            "run": {"device": "cpu", "seed": 0},
            "data": {
                "cache_dir": str(tmp_path / "cache"),
                "synthetic": {
                    "num_sites": 1,
                    "heldout_site": False,
                    "train_per_site": 8,
                    "val_per_site": 2,
                    "test_per_site": 2,
                    "public_size": 16,
                    "image_size": 64,
                },
            },
            "train": {"objective": "decomposable"},
            "federation": {"method": "feddra"},
            # a declared DRO slice of 2 of the 8 records, which a report noise multiplier of 0.5 allows
            "feddra": {"holdout_fraction": 0.25},
            "privacy": {"enabled": True, "report_noise_multiplier": 0.5},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fed = build_federation(cfg)
    trainer = FedDRATrainer(cfg, torch.device("cpu"), fed.public)
    site = trainer.training_subset(fed.sites[0].train)
    state = trainer.begin(model, TrainTask(1, "full", 1), federated_state(model), dataset=site)
    with torch.no_grad():  # move the model off the anchor so the guidance term has a gradient
        model.image_head.bias.add_(0.05)
        model.text_head.bias.sub_(0.05)
    batch = make_collate(model)([site[i] for i in range(6)])

    def per_record_loss(module):
        terms = trainer.compute_loss(module, batch, state, reduction="none")
        assert terms["loss"].shape == (6,) and terms["anchor"].shape == (6,)
        return terms["loss"]

    _, norms = _private_grad(model, per_record_loss, "ghost", 1e9, 6)
    clip = float(norms.median())
    assert float(norms.min()) < clip < float(norms.max()), norms  # clipping active for some records only
    hooks, _ = _private_grad(model, per_record_loss, "hooks", clip, 6)
    ghost, _ = _private_grad(model, per_record_loss, "ghost", clip, 6)
    assert len(hooks) > 20 and any(n.startswith("text_encoder.") for n in hooks)
    _assert_same_gradient(hooks, ghost)
    assert not any(
        hasattr(p, "_norm_sample") or getattr(p, "grad_sample", None) is not None for p in model.parameters()
    )


def test_ghost_mode_dp_round_matches_hooks_mode_and_accounts_alike(tmp_path):
    """A full FedDRA round under DP-SGD in ghost and in hooks mode (same seeds, noise on): same
    ledger (every DP-SGD and Gaussian event), same epsilon, and the same model up to rounding.
    Needs ``seeded_randomness``: by default the noise and the batches are unpredictable (CSPRNG)."""
    from secure_fedvlp.privacy import replay

    out = {}
    for mode in ("hooks", "ghost"):
        cfg = tiny_cfg(
            tmp_path / mode,
            "feddra",
            privacy={"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": mode, "seeded_randomness": True},
            train={"objective": "decomposable"},
        )
        strategy, result, rec, grid, init = run_method(cfg, tmp_path / mode)
        ledgers = {
            s: replay(tmp_path / mode / "run" / "clients" / s / "privacy_ledger.jsonl") for s in ("site1", "site2")
        }
        out[mode] = (result.arrays, {s: (a.history, a.get_epsilon(1e-5)) for s, a in ledgers.items()}, rec)
    assert out["hooks"][1] == out["ghost"][1]
    assert all(len(h) == 3 for h, _ in out["ghost"][1].values())  # align + full DP-SGD, one DRO report
    final_h, final_g = (arrays_to_numpy(out[m][0]) for m in ("hooks", "ghost"))
    for k in final_h:
        np.testing.assert_allclose(final_g[k], final_h[k], rtol=1e-3, atol=1e-4, err_msg=k)
    ok = [r for r in out["ghost"][2].rows if r["phase"] == "train" and r["status"] == "ok"]
    assert ok and all(r["epsilon"] > 0 for r in ok)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batch_releases_noise_only(tmp_path, monkeypatch, mode):
    from secure_fedvlp.wrappers import dpsgd

    cfg, fed, model, dp = _dp_setup(tmp_path, grad_sample_mode=mode)
    monkeypatch.setattr(dpsgd._PoissonBatches, "next", lambda self: [])
    before = federated_state(model)
    m = dp.fit(model, fed.sites[0].train, TrainTask(1, "full", 2), torch.Generator().manual_seed(0), before)
    after = federated_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # every parameter got noise
    assert m["steps"] == 2.0 and len(dp.ledger.events()) == 1


def test_ghost_with_per_layer_clipping_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be 'ghost' with privacy.clipping = 'per_layer'"):
        parse_config(
            {
                "privacy": {"enabled": True, "grad_sample_mode": "ghost", "clipping": "per_layer"},
                "train": {"objective": "decomposable"},
            }
        )


def test_private_gradient_needs_one_loss_per_record():
    from secure_fedvlp.wrappers.dpsgd import PrivateGradient

    lin = torch.nn.Linear(3, 1)
    pg = PrivateGradient(
        lin,
        torch.optim.SGD(lin.parameters(), lr=0.1),
        mode="ghost",
        clipping="flat",
        clip_norm=1.0,
        noise_multiplier=0.0,
        expected_batch_size=4,
    )
    try:
        with pytest.raises(ValueError, match="one loss per record"):
            pg.backward(pg.module(torch.randn(4, 3)).mean())
    finally:
        pg.close()


def test_decomposable_loss_positives_from_the_banks_model_remove_the_collapse_shortcut():
    """With the current model's own embeddings as positives, collapsing every embedding onto one
    direction away from the (stale) banks drives the loss to ~0 with nothing learned; with the
    global model's views as positives (what trainers pass) the same collapse scores near chance."""
    from secure_fedvlp.models.vlp import LogitScale

    g = torch.Generator().manual_seed(0)
    n = torch.nn.functional.normalize
    k, d, b = 32, 16, 8
    bank_v, bank_t = n(torch.randn(k, d, generator=g), dim=-1), n(torch.randn(k, d, generator=g), dim=-1)
    glob_v, glob_t = n(torch.randn(b, d, generator=g), dim=-1), n(torch.randn(b, d, generator=g), dim=-1)
    away = n(-(bank_v.mean(0) + bank_t.mean(0)), dim=0)
    collapsed = away.expand(b, d)
    scale = LogitScale(float(np.log(10.0)), learn=False)
    loss = DecomposableContrastiveLoss()
    shortcut = float(loss(collapsed, collapsed, scale, bank_v, bank_t)["loss"])
    honest = float(loss(collapsed, collapsed, scale, bank_v, bank_t, pos_image=glob_v, pos_text=glob_t)["loss"])
    assert shortcut < 0.1 and honest > 2.0


def test_trainer_decomposable_objective_needs_the_global_views(tmp_path):
    cfg, fed, model, dp = _dp_setup(tmp_path)
    site = dp.inner.training_subset(fed.sites[0].train)
    batch = make_collate(model)([site[i] for i in range(3)])
    with pytest.raises(ValueError, match="global model's view"):
        dp.inner.compute_loss(model, batch, dp.inner.begin(model, TrainTask(1, "full", 1), {}))
    state = dp.inner.begin(model, TrainTask(1, "full", 1), {}, dataset=site)
    terms = dp.inner.compute_loss(model, batch, state, reduction="none")
    # At the job's start the current model is the global one: the same loss as with its own positives.
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
            own = DecomposableContrastiveLoss()(
                out["image_emb"],
                out["text_emb"],
                model.logit_scale,
                state["neg_image"],
                state["neg_text"],
                reduction="none",
            )["loss"]
            views = dp.inner.compute_loss(model, batch, state, reduction="none")["loss"]
    finally:
        model.train()
    torch.testing.assert_close(views, own, rtol=1e-4, atol=1e-5)
    assert terms["loss"].shape == (3,)
