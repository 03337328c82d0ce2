"""Events, accountants, calibration and budgets of the pure privacy core.

Golden value, closed forms, an independent implementation (dp_accounting) and hypothesis
properties, in the manner of Opacus ``tests/accountants_test.py``; the
accountant contract runs over every registered accountant (item 13).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from secure_fedvlp.errors import ConfigError, PrivacyBudgetExhausted, PrivacyError
from secure_fedvlp.privacy import (
    ACCOUNTANTS,
    DEFAULT_RDP_ORDERS,
    Budget,
    DPSGDEvent,
    GaussianEvent,
    InvalidPrivacyParameter,
    PostProcessingEvent,
    RDPAccountant,
    calibrate_gaussian_sigma,
    calibrate_noise_multiplier,
    check_release,
    epsilon_curve,
    epsilon_from_events,
    event_from_dict,
    make_accountant,
)
from secure_fedvlp.privacy.accountant import OPACUS_DEFAULT_ALPHAS

# Coarse PLD discretisation keeps the suite fast; pessimistic PLD stays an upper bound.
FAST = {"pld": {"value_discretization_interval": 1e-2}}
DELTA = 1e-5
FAST_SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def acc(name: str, events=()):
    return make_accountant(name, events, **FAST.get(name, {}))


# --------------------------------------------------------------------------- events

dpsgd_events = st.builds(
    DPSGDEvent,
    noise_multiplier=st.floats(0.3, 20.0),
    sample_rate=st.floats(0.0, 1.0),
    steps=st.integers(1, 5000),
    clip_norm=st.floats(1e-3, 100.0),
    round=st.integers(0, 1000),
    stage=st.sampled_from(["train", "align"]),
)
gaussian_events = st.builds(
    GaussianEvent,
    sensitivity=st.floats(1e-3, 10.0),
    sigma=st.floats(0.0, 100.0),
    what=st.sampled_from(["anchor_features", "dro_loss"]),
    round=st.integers(0, 1000),
    count=st.integers(1, 50),
)
pp_events = st.builds(PostProcessingEvent, what=st.just("public_reps"), round=st.integers(0, 1000))
any_event = st.one_of(dpsgd_events, gaussian_events, pp_events)


@given(any_event)
@settings(max_examples=60, deadline=None)
def test_event_json_round_trip(event):
    text = json.dumps(event.to_dict(), sort_keys=True)
    back = event_from_dict(json.loads(text))
    assert back == event and type(back) is type(event)


def test_event_validation_names_constraint_and_value_and_collects_all():
    with pytest.raises(InvalidPrivacyParameter, match=r"Sampling rate must be in \[0, 1\]. Found 1.5.") as ei:
        DPSGDEvent(noise_multiplier=-1.0, sample_rate=1.5, steps=0, clip_norm=0.0, round=-1)
    assert len(ei.value.problems) == 5
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, PrivacyError)
    with pytest.raises(InvalidPrivacyParameter, match="Sensitivity"):
        GaussianEvent(sensitivity=0.0, sigma=1.0, what="x", round=0)
    with pytest.raises(InvalidPrivacyParameter, match="finite"):
        GaussianEvent(sensitivity=1.0, sigma=math.inf, what="x", round=0)
    with pytest.raises(InvalidPrivacyParameter, match="integer"):
        DPSGDEvent(1.0, 0.1, True, 1.0, 0)  # bool is not an int here
    with pytest.raises(InvalidPrivacyParameter, match="non-empty"):
        PostProcessingEvent(what=" ", round=0)


def test_event_is_frozen_and_canonical():
    e = DPSGDEvent(1, 0.5, 10, 2, 3)
    assert isinstance(e.noise_multiplier, float) and e == DPSGDEvent(1.0, 0.5, 10, 2.0, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.steps = 11  # type: ignore[misc]
    assert GaussianEvent(2.0, 3.0, "a", 0).noise_multiplier == 1.5


def test_event_from_dict_rejects_bad_input():
    good = DPSGDEvent(1.0, 0.1, 10, 1.0, 0).to_dict()
    with pytest.raises(InvalidPrivacyParameter, match="Unknown key"):
        event_from_dict({**good, "extra": 1})
    with pytest.raises(InvalidPrivacyParameter, match="Missing key"):
        event_from_dict({k: v for k, v in good.items() if k != "steps"})
    with pytest.raises(InvalidPrivacyParameter, match="Event type must be one of"):
        event_from_dict({**good, "type": "laplace"})
    with pytest.raises(InvalidPrivacyParameter, match="Number of steps"):
        event_from_dict({**good, "steps": 2.5})
    with pytest.raises(InvalidPrivacyParameter):
        event_from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- contract suite

HISTORY_A = (
    DPSGDEvent(1.1, 0.02, 300, 1.0, 0),
    GaussianEvent(1.0, 8.0, "anchor_features", 0),
    PostProcessingEvent("public_reps", 0),
)
HISTORY_B = (DPSGDEvent(1.3, 0.03, 200, 1.0, 1), GaussianEvent(2.0, 30.0, "dro_loss", 1, count=2))


@pytest.fixture(params=sorted(ACCOUNTANTS))
def name(request):
    return request.param


def test_contract_empty_and_free(name):
    a = acc(name)
    assert a.get_epsilon(DELTA) == 0.0 and a.history == () and len(a) == 0
    a.compose(PostProcessingEvent("x", 0)).compose(DPSGDEvent(1.0, 0.0, 100, 1.0, 0))
    assert a.get_epsilon(DELTA) == 0.0 and len(a) == 2


def test_contract_get_epsilon_is_pure(name):
    """Opacus bug pytorch/opacus#535: a query must not mutate the accountant."""
    a = acc(name, HISTORY_A)
    before = (a.history, a.state_dict())
    e1, e2 = a.get_epsilon(DELTA), a.get_epsilon(DELTA)
    assert e1 == e2 > 0
    assert (a.history, a.state_dict()) == before
    p = a.projected_epsilon(DELTA, HISTORY_B)
    assert (a.history, a.state_dict()) == before and a.get_epsilon(DELTA) == e1
    assert p > e1


def test_contract_composition_equals_concatenation(name):
    split = acc(name, HISTORY_A).compose_all(HISTORY_B)
    whole = acc(name, HISTORY_A + HISTORY_B)
    projected = acc(name, HISTORY_A).projected_epsilon(DELTA, HISTORY_B)
    assert split.history == whole.history == HISTORY_A + HISTORY_B
    assert split.get_epsilon(DELTA) == pytest.approx(whole.get_epsilon(DELTA), rel=1e-9)
    assert projected == pytest.approx(whole.get_epsilon(DELTA), rel=1e-9)


def test_contract_state_dict_round_trip(name):
    a = acc(name, HISTORY_A + HISTORY_B)
    state = json.loads(json.dumps(a.state_dict()))
    b = acc(name)
    b.load_state_dict(state)
    assert b.history == a.history
    assert b.get_epsilon(DELTA) == pytest.approx(a.get_epsilon(DELTA), rel=1e-12)
    other = "rdp" if name != "rdp" else "pld"
    with pytest.raises(InvalidPrivacyParameter, match="cannot be loaded"):
        acc(other).load_state_dict(state)
    with pytest.raises(InvalidPrivacyParameter, match="missing key"):
        acc(name).load_state_dict({"mechanism": name})


def test_contract_copy_is_independent(name):
    a = acc(name, HISTORY_A)
    b = a.copy().compose_all(HISTORY_B)
    assert a.history == HISTORY_A and len(b) == len(HISTORY_A) + len(HISTORY_B)
    assert b.get_epsilon(DELTA) > a.get_epsilon(DELTA)


def test_contract_no_noise_is_infinite_and_bad_input(name):
    assert acc(name, [GaussianEvent(1.0, 0.0, "raw", 0)]).get_epsilon(DELTA) == math.inf
    assert acc(name, [DPSGDEvent(0.0, 0.1, 5, 1.0, 0)]).get_epsilon(DELTA) == math.inf
    for bad in (0.0, 1.0, -1e-5, math.nan, True):
        with pytest.raises(InvalidPrivacyParameter, match="Delta"):
            acc(name, HISTORY_A).get_epsilon(bad)
    with pytest.raises(TypeError, match="Event must be"):
        acc(name).compose({"type": "dpsgd"})  # type: ignore[arg-type]


def test_contract_gaussian_count_equals_repeated_releases(name):
    once = acc(name, [GaussianEvent(1.0, 4.0, "a", 0, count=3)]).get_epsilon(DELTA)
    thrice = acc(name, [GaussianEvent(1.0, 4.0, "a", r) for r in range(3)]).get_epsilon(DELTA)
    scaled = acc(name, [GaussianEvent(2.0, 8.0, "a", 0, count=3)]).get_epsilon(DELTA)
    # PLD discretises each release separately: agreement to 1e-3 there, exact for RDP.
    assert once == pytest.approx(thrice, rel=1e-3) and once == pytest.approx(scaled, rel=1e-9)


def test_make_accountant_unknown():
    with pytest.raises(InvalidPrivacyParameter, match="Accountant must be one of"):
        make_accountant("moments")


# --------------------------------------------------------------------------- RDP: golden, closed form, properties

GOLDEN = 7.32911117143  # Opacus tests/accountants_test.py: sigma 1.5, q 0.04, 2250 steps, delta 1e-5


def test_golden_value_rdp():
    e = DPSGDEvent(1.5, 0.04, 2250, 1.0, 0)
    ours = RDPAccountant([e]).get_epsilon(1e-5)
    assert ours == pytest.approx(GOLDEN, rel=1e-9)
    # Same number with Opacus' own default alphas and with Opacus' accountant itself:
    # the optimal order (3.9) is interior, so our extra large orders do not move it.
    assert RDPAccountant([e], orders=OPACUS_DEFAULT_ALPHAS).get_epsilon(1e-5) == pytest.approx(GOLDEN, rel=1e-9)
    from opacus.accountants import RDPAccountant as OpacusRDP

    o = OpacusRDP()
    o.history = [(1.5, 0.04, 2250)]
    assert o.get_epsilon(1e-5) == pytest.approx(ours, rel=1e-12)


def test_closed_form_gaussian_rdp():
    """Gaussian mechanism: RDP(alpha) = alpha / (2 z^2) per release."""
    z, k = 3.0, 4
    a = RDPAccountant([GaussianEvent(1.0, z, "a", 0, count=k)])
    expected = [k * o / (2 * z * z) for o in DEFAULT_RDP_ORDERS]
    assert list(a._rdp) == pytest.approx(expected, rel=1e-12)


@given(
    z=st.floats(0.6, 5.0),
    q=st.floats(1e-3, 0.2),
    steps=st.integers(1, 2000),
    factor=st.floats(1.2, 3.0),
)
@FAST_SETTINGS
def test_rdp_epsilon_monotone(z, q, steps, factor):
    def eps(z_, q_, k_):
        return epsilon_from_events([DPSGDEvent(z_, q_, k_, 1.0, 0)], DELTA)

    base = eps(z, q, steps)
    assert base >= 0.0
    assert eps(z, q, steps + int(steps * factor)) >= base  # more steps
    assert eps(z, min(1.0, q * factor), steps) >= base  # higher sampling rate
    assert eps(z * factor, q, steps) <= base  # more noise


@given(z=st.floats(1.0, 4.0), q=st.floats(1e-3, 0.1), steps=st.integers(1, 1000))
@settings(max_examples=10, deadline=None)
def test_rdp_agrees_with_dp_accounting_rdp(z, q, steps):
    """Opacus' RDP analysis vs Google's dp_accounting on the same orders: within 1% relative.

    Measured: < 0.71% over a random sweep with eps <= 20 (z >= 0.8).  Above eps ~ 15-20 the two
    part ways (up to 2x at z=0.6, q=0.2, 2000 steps) because dp_accounting drops small orders
    whose series fails to converge in 1000 iterations; Opacus' lower value there is consistent
    with PLD (PLD <= Opacus RDP <= dp_accounting RDP), so the regime is excluded, not hidden.
    """
    ev = [DPSGDEvent(z, q, steps, 1.0, 0)]
    ours = epsilon_from_events(ev, DELTA, "rdp")
    assume(ours <= 15.0)
    theirs = epsilon_from_events(ev, DELTA, "dp_accounting_rdp")
    assert ours == pytest.approx(theirs, rel=0.01)


@pytest.mark.parametrize(
    "event, low_ratio",
    [
        (DPSGDEvent(1.5, 0.04, 2250, 1.0, 0), 0.85),  # golden: PLD 6.769 vs RDP 7.329 (ratio 0.924)
        (DPSGDEvent(1.0, 0.01, 1000, 1.0, 0), 0.85),
        (GaussianEvent(1.0, 2.0, "anchor", 0, count=5), 0.85),
    ],
)
def test_pld_is_tighter_than_rdp_within_gap(event, low_ratio):
    """PLD (vdi 1e-3, pessimistic) <= RDP, and not more than 15% below it in these regimes.

    Measured ratios PLD/RDP: 0.92-0.95 for eps in [1, 20] with many steps.  RDP is much looser
    (ratio down to 0.05) for a single step at small q, and coarse PLD (vdi 1e-2) can exceed RDP
    at eps ~ 1 (ratio up to 1.11) by discretisation: those regimes are not pinned here.
    """
    rdp = epsilon_from_events([event], DELTA, "rdp")
    pld = epsilon_from_events([event], DELTA, "pld", value_discretization_interval=1e-3)
    assert low_ratio * rdp <= pld <= rdp


def test_epsilon_curve_cumulative():
    events = list(HISTORY_A + HISTORY_B) + [DPSGDEvent(1.1, 0.02, 300, 1.0, 2)]
    curve = epsilon_curve(events, DELTA)
    assert [r for r, _ in curve] == [0, 1, 2]
    eps = [e for _, e in curve]
    assert eps == sorted(eps) and eps[0] == pytest.approx(epsilon_from_events(HISTORY_A, DELTA))
    assert eps[-1] == pytest.approx(epsilon_from_events(events, DELTA), rel=1e-9)


# --------------------------------------------------------------------------- calibration


@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.005, 0.1),
    steps=st.integers(10, 1000),
)
@settings(max_examples=5, deadline=None)
def test_calibration_never_overshoots(target, q, steps):
    z = calibrate_noise_multiplier(target, DELTA, q, steps, epsilon_tolerance=0.01)
    eps = epsilon_from_events([DPSGDEvent(z, q, steps, 1.0, 0)], DELTA)
    assert eps <= target
    assert eps >= target - 0.01 - 1e-9 or z <= 1e-6


def test_calibration_with_prior_events_and_pld():
    prior = [GaussianEvent(1.0, 10.0, "anchor", 0), DPSGDEvent(1.2, 0.02, 100, 1.0, 0)]
    spent = epsilon_from_events(prior, DELTA)
    z = calibrate_noise_multiplier(4.0, DELTA, 0.02, 200, prior_events=prior)
    total = epsilon_from_events(prior + [DPSGDEvent(z, 0.02, 200, 1.0, 1)], DELTA)
    assert spent < total <= 4.0 and total >= 4.0 - 0.01
    zp = calibrate_noise_multiplier(
        4.0, DELTA, 0.02, 200, accountant="pld", accountant_options=FAST["pld"], epsilon_tolerance=0.05
    )
    assert epsilon_from_events([DPSGDEvent(zp, 0.02, 200, 1.0, 0)], DELTA, "pld", **FAST["pld"]) <= 4.0
    assert zp <= z * 1.05  # PLD needs no more noise than RDP (even with a prior-free target)


def test_calibrate_gaussian_sigma():
    sigma = calibrate_gaussian_sigma(1.0, DELTA, sensitivity=2.0, count=3)
    eps = epsilon_from_events([GaussianEvent(2.0, sigma, "anchor", 0, count=3)], DELTA)
    assert 0.99 <= eps <= 1.0
    # Scale-equivariance: sigma scales with the sensitivity.
    assert calibrate_gaussian_sigma(1.0, DELTA, sensitivity=1.0, count=3) == pytest.approx(sigma / 2, rel=0.01)


def test_calibration_unattainable():
    prior = [GaussianEvent(1.0, 0.5, "leaky", 0)]
    with pytest.raises(PrivacyBudgetExhausted, match="Prior releases already spend epsilon"):
        calibrate_noise_multiplier(1.0, DELTA, 0.01, 100, prior_events=prior)
    with pytest.raises(PrivacyError, match="unattainable"):
        calibrate_noise_multiplier(0.5, DELTA, 0.5, 1000, max_noise_multiplier=1.5)
    with pytest.raises(InvalidPrivacyParameter, match="Sampling rate"):
        calibrate_noise_multiplier(1.0, DELTA, 0.0, 100)
    with pytest.raises(InvalidPrivacyParameter, match="Target epsilon"):
        calibrate_noise_multiplier(0.0, DELTA, 0.1, 100)


# --------------------------------------------------------------------------- budgets


def test_budget_validation_collects_problems():
    with pytest.raises(ConfigError) as ei:
        Budget(epsilon=0.0, delta=1.0)
    assert len(ei.value.problems) == 2 and "Found 0.0" in str(ei.value)
    for eps in (math.inf, -1.0, math.nan):
        with pytest.raises(ConfigError, match="epsilon"):
            Budget(eps, 1e-5)
    b = Budget(8, 1e-5)
    assert isinstance(b.epsilon, float) and Budget.from_dict(b.to_dict()) == b
    with pytest.raises(ConfigError, match="Unknown budget key"):
        Budget.from_dict({"epsilon": 1.0, "delta": 1e-5, "eps": 2})


def test_check_release_refuses_and_names_client():
    budget = Budget(2.0, DELTA)
    history = [DPSGDEvent(1.5, 0.02, 200, 1.0, 0)]
    ok = check_release(history, GaussianEvent(1.0, 20.0, "dro_loss", 1), budget)
    assert 0 < ok <= 2.0
    with pytest.raises(PrivacyBudgetExhausted, match=r"Client 'site-3' would reach epsilon .* budget epsilon 2"):
        check_release(history, DPSGDEvent(1.0, 0.02, 5000, 1.0, 1), budget, client_id="site-3")
    # Free events are never refused, even on an exhausted history.
    over = [GaussianEvent(1.0, 0.3, "leak", 0)]
    assert check_release(over, PostProcessingEvent("reps", 1), budget) > 2.0


@given(st.lists(st.one_of(dpsgd_events.filter(lambda e: e.sample_rate <= 0.2), gaussian_events, pp_events), max_size=8))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_budget_guard_never_exceeds(schedule):
    # The ledger is the guard every release goes through: whatever the schedule, it never lets the spend pass
    # the budget.
    import tempfile

    from secure_fedvlp.privacy import PrivacyLedger

    with tempfile.TemporaryDirectory() as tmp:
        guard = PrivacyLedger(Path(tmp) / "ledger.jsonl", "site-1", Budget(3.0, DELTA))
        for ev in schedule:
            try:
                guard.record(ev)
            except PrivacyBudgetExhausted:
                pass
            assert guard.epsilon() <= 3.0


def test_calibration_accepts_an_accountant_instance_without_mutating_it():
    prior = [GaussianEvent(1.0, 10.0, "anchor", 0)]
    live = RDPAccountant(prior)
    z_inst = calibrate_noise_multiplier(3.0, DELTA, 0.02, 200, accountant=live)
    z_list = calibrate_noise_multiplier(3.0, DELTA, 0.02, 200, prior_events=prior)
    assert z_inst == z_list and live.history == tuple(prior)


# --------------------------------------------------------------------------- slow (make test-slow)


@pytest.mark.slow
def test_golden_value_pld_fine_discretisation():
    """PLD at dp_accounting's default interval (1e-4): 6.77 vs RDP 7.33 on the golden setting."""
    e = DPSGDEvent(1.5, 0.04, 2250, 1.0, 0)
    pld = epsilon_from_events([e], 1e-5, "pld", value_discretization_interval=1e-4)
    assert 0.9 * GOLDEN <= pld <= 0.95 * GOLDEN


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ACCOUNTANTS))
@given(target=st.floats(0.3, 20.0), q=st.floats(1e-3, 0.3), steps=st.integers(1, 3000))
@settings(max_examples=25, deadline=None)
def test_calibration_never_overshoots_any_accountant(name, target, q, steps):
    options = FAST.get(name, {})
    try:
        z = calibrate_noise_multiplier(target, DELTA, q, steps, accountant=name, accountant_options=options)
    except PrivacyError:
        return  # unattainable is reported, never papered over
    assert epsilon_from_events([DPSGDEvent(z, q, steps, 1.0, 0)], DELTA, name, **options) <= target
