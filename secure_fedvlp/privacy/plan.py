"""A method's release plan: what one training site releases per round, declared before the run.

Each method declares its plan from the config (:meth:`VLPStrategy.release_plan
<secure_fedvlp.methods.strategy.VLPStrategy.release_plan>`): the DP-SGD stages of a round with
their step counts, and the scalar reports it asks for.  Wrappers that add releases (the noised
anchors) extend it with :meth:`ReleasePlan.with_release`.  The server executes the plan (it sends
exactly these stages with these step counts), and calibration consumes it
(:func:`~secure_fedvlp.privacy.calibration.calibrate_plan`), so the noise is planned for what is
released, whatever the method.  Nothing here knows a method by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from secure_fedvlp.privacy.events import DPSGDEvent, GaussianEvent, InvalidPrivacyParameter, PrivacyEvent

__all__ = ["StagePlan", "ReleasePlan"]


@dataclass(frozen=True)
class StagePlan:
    """One DP-SGD job per round: the stage's name (``full``, ``align``, ...) and its local steps."""

    stage: str
    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.stage, str) or not self.stage:
            raise InvalidPrivacyParameter(f"A stage needs a non-empty name. Found {self.stage!r}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidPrivacyParameter(f"Stage {self.stage!r} must plan >= 1 step. Found {self.steps!r}.")


@dataclass(frozen=True)
class ReleasePlan:
    """What one training site releases in every round.

    ``stages``: the DP-SGD jobs, in order.  ``reports``: kinds of the noised scalar reports the
    method asks for (each one Gaussian release of a per-record clipped mean, with the privacy
    config's ``report_clip`` and ``report_noise_multiplier``).  ``releases``: other Gaussian
    releases per round added by wrappers (their ``round`` field is replaced by each round's).
    ``once``: Gaussian releases made once per run, in round 1 (the site's report centroids, which
    later rounds reuse as post-processing).
    """

    stages: tuple[StagePlan, ...]
    reports: tuple[str, ...] = ()
    releases: tuple[GaussianEvent, ...] = ()
    once: tuple[GaussianEvent, ...] = ()

    def __post_init__(self) -> None:
        if not self.stages:
            raise InvalidPrivacyParameter("A release plan needs at least one training stage.")
        names = [s.stage for s in self.stages]
        if len(set(names)) != len(names):
            raise InvalidPrivacyParameter(f"Stage names of a release plan must be unique. Found {names}.")

    def stage(self, name: str) -> StagePlan:
        """The planned stage called ``name``."""
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(f"stage {name!r} is not in the release plan (planned: {[s.stage for s in self.stages]}).")

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps a site takes in one round, all stages together."""
        return sum(s.steps for s in self.stages)

    def with_release(self, event: GaussianEvent) -> ReleasePlan:
        """This plan plus one more Gaussian release per round."""
        return dataclasses.replace(self, releases=self.releases + (event,))

    def with_release_once(self, event: GaussianEvent) -> ReleasePlan:
        """This plan plus one Gaussian release made once per run, in round 1."""
        return dataclasses.replace(self, once=self.once + (event,))

    def gaussian_events(
        self, num_rounds: int, *, report_clip: float, report_noise_multiplier: float
    ) -> list[GaussianEvent]:
        """Every planned Gaussian release (reports and wrappers' releases) of ``num_rounds`` rounds."""
        out: list[GaussianEvent] = []
        for r in range(1, int(num_rounds) + 1):
            out += [
                GaussianEvent(
                    sensitivity=report_clip,
                    sigma=report_noise_multiplier * report_clip,
                    what=f"{kind} report (planned)",
                    round=r,
                )
                for kind in self.reports
            ]
            out += [dataclasses.replace(ev, round=r) for ev in self.releases]
            if r == 1:
                out += [dataclasses.replace(ev, round=1) for ev in self.once]
        return out

    def events(
        self,
        num_rounds: int,
        *,
        noise_multiplier: float,
        sample_rate: float,
        clip_norm: float,
        report_clip: float,
        report_noise_multiplier: float,
    ) -> list[PrivacyEvent]:
        """Every planned release of ``num_rounds`` rounds, as the ledger will record them."""
        out: list[PrivacyEvent] = []
        gaussians = self.gaussian_events(
            num_rounds, report_clip=report_clip, report_noise_multiplier=report_noise_multiplier
        )
        for r in range(1, int(num_rounds) + 1):
            out += [
                DPSGDEvent(noise_multiplier, sample_rate, s.steps, clip_norm, r, stage=s.stage) for s in self.stages
            ]
            out += [g for g in gaussians if g.round == r]
        return out
