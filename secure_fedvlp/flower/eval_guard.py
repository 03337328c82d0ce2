"""A site evaluates only the current round's global model, once.

Evaluation metrics are computed on a site's private split without noise, so no DP mechanism covers
them (every report names them as not covered; ``eval.release = "local"`` keeps them at the site).
What bounds them is how often, and on which models, a site evaluates. :class:`EvaluationGuard`
keeps a site's record of that in its own directory
(:meth:`RunLayout.evaluation_guard <secure_fedvlp.layout.RunLayout.evaluation_guard>`; a site's
messages may be handled by different processes) and refuses, before anything is evaluated:

1. a second evaluation of a round;
2. an evaluation for a round below the latest round the site has seen in any message (train,
   query or evaluate), or outside ``0 .. federation.num_rounds``;
3. for round 0, any model but the round-0 model every party builds from the config
   (:func:`~secure_fedvlp.build.build_model`): the seeded initial model or, when the config names
   ``model.init_checkpoint`` (the public start, or a user's checkpoint), the seeded model with that
   checkpoint loaded over it, so the hash every party computes is the public start's;
4. after the fact, a model other than the global model: the first train message a site receives
   in round ``r + 1`` must carry the model it evaluated for round ``r`` (compared by
   :func:`model_hash`), or the site refuses that message and trains nothing. Under CKKS the model
   compared is the one the site decrypted itself;
5. a reference evaluation (:meth:`EvaluationGuard.evaluate_reference`) that is not one of the run's
   references, a second one of the same kind, or one after the site has seen round 1. When the
   round-0 model is a public start, the one reference is the untrained (seeded) model, which the
   site builds itself from the config: no arrays travel, so the server chooses nothing about it.

The record of an evaluation is written before the evaluation runs, so a crash never allows a
second one. A site therefore evaluates at most ``num_rounds + 1`` models over a run, plus the
untrained reference when the run has a public start. What it cannot check: the model of the last
round (no round follows it), and, at a site that never trains (the held-out site), the models of
rounds 1 and later, which the server chooses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secure_fedvlp.errors import ProtocolError
from secure_fedvlp.layout import open_site_file

logger = logging.getLogger(__name__)

__all__ = ["EvaluationGuard", "model_hash"]

_HASH_PREFIX = b"secure_fedvlp.model/v1\x00"


def model_hash(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of a federated state: every parameter's name, shape and float32 bytes, in name order."""
    h = hashlib.sha256(_HASH_PREFIX)
    for name in sorted(state):
        a = np.ascontiguousarray(np.asarray(state[name], dtype=np.float32))
        h.update(f"{name}\x00{a.shape}\x00".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class EvaluationGuard:
    """One site's evaluation record and the checks above (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike,
        site: str,
        num_rounds: int,
        initial_hash: str,
        references: tuple[str, ...] = (),
    ) -> None:
        self.path = Path(path)
        self.site = site
        self.num_rounds = int(num_rounds)
        self.initial_hash = initial_hash  # the round-0 model's hash: seeded, or the public start loaded over it
        self.references = tuple(references)  # reference models the site may evaluate once each (built by itself)

    # -- state on disk ------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"site": self.site, "last_round": -1, "evaluated": {}, "trained": [], "references": []}
        state = json.loads(self.path.read_text(encoding="utf-8"))
        if state.get("site") != self.site:
            raise ProtocolError(f"{self.path} belongs to site {state.get('site')!r}, not {self.site!r}.")
        return state

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open_site_file(tmp, "w") as fh:  # 0600: the site's own record
            fh.write(json.dumps(state, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # -- the checks ---------------------------------------------------------------------
    def seen(self, server_round: int) -> None:
        """A query of ``server_round`` arrived: the site's latest round moves forward."""
        state = self._load()
        if server_round > state["last_round"]:
            state["last_round"] = int(server_round)
            self._save(state)

    def train(self, server_round: int, model: str) -> None:
        """A train message of ``server_round`` carrying the model with hash ``model`` arrived.

        The first one of a round that follows an evaluated round must carry the evaluated model.
        """
        state = self._load()
        rnd = int(server_round)
        if rnd not in state["trained"]:
            evaluated = state["evaluated"].get(str(rnd - 1))
            if evaluated is not None and evaluated != model:
                raise ProtocolError(
                    f"site {self.site}: the round-{rnd} train message carries another model than the one this "
                    f"site evaluated as the global model of round {rnd - 1}; refused."
                )
            state["trained"].append(rnd)
        state["last_round"] = max(int(state["last_round"]), rnd)
        self._save(state)

    def evaluate(self, server_round: int, model: str) -> None:
        """Allow one evaluation of the model with hash ``model`` for ``server_round``, or raise :class:`ProtocolError`.

        The evaluation is recorded before this returns.
        """
        state = self._load()
        rnd = int(server_round)
        why = None
        if not 0 <= rnd <= self.num_rounds:
            why = f"round {rnd} is outside the run's rounds 0..{self.num_rounds}"
        elif str(rnd) in state["evaluated"]:
            why = f"round {rnd} was already evaluated"
        elif rnd < int(state["last_round"]):
            why = f"round {rnd} is stale: this site has already seen round {state['last_round']}"
        elif rnd == 0 and model != self.initial_hash:
            why = (
                "the round-0 model is not the model every party builds from the config (the seeded initial model, "
                "or the public start model.init_checkpoint loaded over it)"
            )
        if why is not None:
            raise ProtocolError(f"site {self.site}: evaluation refused: {why}.")
        state["evaluated"][str(rnd)] = model
        state["last_round"] = rnd
        self._save(state)

    def evaluate_reference(self, kind: str) -> None:
        """Allow one evaluation of the reference model ``kind`` (one of :attr:`references`), or raise
        :class:`ProtocolError`: only before the site has seen round 1, once per kind, recorded before it runs.

        The site builds the reference itself from the config (the untrained model: the seeded
        initialisation without the checkpoint), so the request carries no model to check.
        """
        state = self._load()
        done = state.setdefault("references", [])
        why = None
        if kind not in self.references:
            known = ", ".join(self.references) or "none"
            why = f"{kind!r} is not a reference model of this run (references: {known})"
        elif kind in done:
            why = f"the {kind} reference was already evaluated"
        elif int(state["last_round"]) > 0:
            why = (
                f"the {kind} reference comes before round 1, and this site has already seen round {state['last_round']}"
            )
        if why is not None:
            raise ProtocolError(f"site {self.site}: evaluation refused: {why}.")
        done.append(kind)
        self._save(state)
