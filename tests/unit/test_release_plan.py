"""A method owns its release plan: the server executes it, DP calibration consumes it.

The two must agree for every registered method and schedule, or a DP run is over-noised (it plans
more steps than it takes) or runs out of budget mid-run (it takes more than it planned).  These
tests would fail on a calibration that re-derives a method's schedule by name.
"""

import pytest

from secure_fedvlp.config import parse_config
from secure_fedvlp.privacy import epsilon_from_events
from secure_fedvlp.privacy.events import DPSGDEvent, GaussianEvent
from secure_fedvlp.wire import LOCAL_STEPS
from secure_fedvlp.wrappers.compose import release_plan, strategy_class
from secure_fedvlp.wrappers.dpsgd import client_noise_multiplier
from tests.loopback import private_methods

TARGET = 8.0
TOLERANCE = 0.01  # calibrate_noise_multiplier's default epsilon_tolerance
ROUNDS = 3

#: (train.local_steps, feddra.stage1_steps, feddra.stage2_steps); stage2 = 0 means "train.local_steps".
SCHEDULES = [(2, 1, 0), (2, 1, 6), (6, 2, 2), (4, 3, 1)]


def _cfg(method, schedule, anchors, accountant="rdp"):
    local, s1, s2 = schedule
    return parse_config(
        {
            "run": {"device": "cpu"},
            "data": {"synthetic": {"num_sites": 2, "public_size": 8}},
            "model": {"name": "tiny"},
            "train": {"local_steps": local, "batch_size": 8, "objective": "decomposable"},
            "federation": {"method": method, "num_rounds": ROUNDS},
            "feddra": {"stage1_steps": s1, "stage2_steps": s2},
            "privacy": {"enabled": True, "target_epsilon": TARGET, "accountant": accountant},
            "anchors": {"enabled": anchors, "noise_multiplier": 6.0, "trust_server": True},
        }
    )


def _server_schedule(cfg):
    """The DP-SGD jobs and queries the server will send a site in each round, read off the strategy."""
    strategy = strategy_class(cfg)(cfg)
    jobs = {
        r: [(s.stage, int(strategy.stage_config(r, s.stage)[LOCAL_STEPS])) for s in strategy.plan.stages]
        for r in range(1, ROUNDS + 1)
    }
    return strategy, jobs


@pytest.mark.parametrize("anchors", [False, True], ids=["plain", "anchors"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "local{}-s1_{}-s2_{}".format(*s))
@pytest.mark.parametrize("method", private_methods())
def test_calibration_spends_the_target_over_the_planned_rounds(method, schedule, anchors):
    cfg = _cfg(method, schedule, anchors)
    plan = release_plan(cfg)
    z, q = client_noise_multiplier(cfg, plan, 200)
    strategy, jobs = _server_schedule(cfg)
    p = cfg.privacy
    events = []
    for r in range(1, ROUNDS + 1):
        events += [DPSGDEvent(z, q, steps, p.clip_norm, r, stage=stage) for stage, steps in jobs[r]]
        events += [
            GaussianEvent(p.report_clip, p.report_noise_multiplier * p.report_clip, kind, r) for kind in plan.reports
        ]
        events += [ev.__class__(**{**ev.__dict__, "round": r}) for ev in plan.releases]
    eps = epsilon_from_events(events, p.delta)
    assert eps <= TARGET, f"{method}: the run would spend {eps:.4f} > {TARGET}"
    assert eps >= TARGET - TOLERANCE, f"{method}: over-noised, spends {eps:.4f} of {TARGET}"


@pytest.mark.parametrize("method", private_methods())
def test_the_server_sends_the_steps_the_plan_declares(method):
    """FedAID trains feddra.stage2_steps per round (not train.local_steps): the plan says so, and so does
    the server's train config."""
    cfg = _cfg(method, (2, 1, 6), anchors=False)
    _, jobs = _server_schedule(cfg)
    expected = {
        "feddra": [("align", 1), ("full", 6)],
        "fedaid": [("full", 6)],
        "fedsm": [("global", 2), ("person", 2), ("select", 1)],  # the selector: one step per round
    }.get(method, [("full", 2)])
    assert all(j == expected for j in jobs.values())
    assert [(s.stage, s.steps) for s in release_plan(cfg).stages] == expected


def test_pld_calibration_never_exceeds_the_target():
    cfg = _cfg("feddra", (2, 1, 6), anchors=True, accountant="pld")
    plan = release_plan(cfg)
    z, q = client_noise_multiplier(cfg, plan, 200)
    p = cfg.privacy
    events = plan.events(
        ROUNDS,
        noise_multiplier=z,
        sample_rate=q,
        clip_norm=p.clip_norm,
        report_clip=p.report_clip,
        report_noise_multiplier=p.report_noise_multiplier,
    )
    assert epsilon_from_events(events, p.delta, "pld") <= TARGET
