"""Downstream evaluation of a finished run: every site, on its own records, the final model beside the references.

``secure-fedvlp evaluate RUN_DIR`` (and ``eval.downstream`` at the end of a run) calls
:func:`evaluate_run`.  For each site, :class:`SiteDownstream` plays that site: it holds only the
site's own records, runs :func:`~secure_fedvlp.evaluation.downstream.site_downstream` on each model,
keeps every result in the site's own directory
(:meth:`RunLayout.site_downstream <secure_fedvlp.layout.RunLayout.site_downstream>`) and releases its
metrics as the run's ``eval.release`` says: ``"clear"`` sends the metric values (and nothing else)
to the run's :attr:`~secure_fedvlp.layout.RunLayout.downstream_results`; ``"local"`` sends only
that they were kept at the site.  No image, mask, label or feature leaves a site, and no DP
mechanism covers these metrics (the report names them as not covered, as it does federated
evaluation).

The models: ``untrained`` (the seeded initial model every party builds from the config),
``public_start`` (``model/public_start.npz``, when the run's report has a ``public_start`` entry)
and ``final`` (the run's released parameters).  A site answers for these three only, once each: it
records in :meth:`RunLayout.downstream_guard <secure_fedvlp.layout.RunLayout.downstream_guard>`
the image encoder it evaluated under each name, refuses another encoder under a name already used
and an ``untrained`` encoder that is not the seeded one; asked again for the same encoder and
settings, it returns the metrics it already released instead of computing new ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_fedvlp.build import build_federation, build_model
from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.data import SiteData
from secure_fedvlp.errors import DataError, ProtocolError
from secure_fedvlp.evaluation.downstream import (
    POOLED_TASK,
    TASKS,
    ProbeSettings,
    _mean_std,
    dice_summary,
    evaluate_decoder,
    site_downstream,
    train_decoder,
)
from secure_fedvlp.layout import FinishedRun, RunLayout, load_run
from secure_fedvlp.models.state import load_federated_state

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_NAMES",
    "PUBLIC_START_FILE",
    "settings_from_config",
    "reference_models",
    "encoder_hash",
    "SiteDownstream",
    "evaluate_run",
    "downstream_summary",
]

#: The models a site evaluates downstream, in report order.
MODEL_NAMES = ("untrained", "public_start", "final")
#: Where a public-start pretraining stage leaves its model (read when the run's report names one).
PUBLIC_START_FILE = "public_start.npz"
KEPT_AT_SITE = "kept_at_site"


def settings_from_config(cfg: ExperimentConfig, **overrides: Any) -> ProbeSettings:
    """The downstream settings of ``cfg.eval`` (``overrides``: fractions, seeds, seg_steps)."""
    ev = cfg.eval
    base = {
        "fractions": tuple(ev.downstream_fractions),
        "seeds": ev.downstream_seeds,
        "seg_steps": ev.downstream_seg_steps,
        "batch_size": ev.batch_size,
    }
    base.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
    return ProbeSettings(**base)


def encoder_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the image encoder's parameters and buffers (names, shapes, float32 values)."""
    h = hashlib.sha256(b"secure_fedvlp/image-encoder/v1\x00")
    state = model.image_encoder.state_dict()
    for name in sorted(state):
        a = np.ascontiguousarray(state[name].detach().cpu().float().numpy())
        h.update(f"{name}\x00{a.shape}\x00".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable parameter file: {exc}.") from None


def _load_partial(model: torch.nn.Module, arrays: dict[str, np.ndarray], path: Path) -> None:
    """Load the image-encoder parameters of ``arrays`` into ``model`` (names and shapes must match)."""
    params = dict(model.named_parameters())
    names = [n for n in arrays if n.startswith("image_encoder.")]
    if not names:
        raise DataError(f"{path} holds no image_encoder.* parameters; it is not a model of this run.")
    with torch.no_grad():
        for n in names:
            if n not in params or tuple(params[n].shape) != tuple(arrays[n].shape):
                raise DataError(f"{path}: parameter {n!r} does not fit the run's model ({cfg_shape(params, n)}).")
            params[n].copy_(torch.as_tensor(arrays[n]).to(params[n].dtype))


def cfg_shape(params: dict[str, torch.nn.Parameter], name: str) -> str:
    return f"model shape {tuple(params[name].shape)}" if name in params else "no such parameter"


def reference_models(run: FinishedRun) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """``(name, builder)`` of each model to evaluate: untrained, public start (if the run has one), final."""
    cfg, layout = run.cfg, run.layout
    out: list[tuple[str, Callable[[], torch.nn.Module]]] = [("untrained", lambda: build_model(cfg, untrained=True))]
    report = run.report() or {}
    public = layout.model_dir / PUBLIC_START_FILE
    if report.get("public_start") and public.exists():

        def public_start() -> torch.nn.Module:
            m = build_model(cfg, untrained=True)
            _load_partial(m, _load_arrays(public), public)
            return m

        out.append(("public_start", public_start))
    elif report.get("public_start"):
        logger.warning("the report names a public start but %s is missing; that reference is skipped", public)

    def final() -> torch.nn.Module:
        path = layout.model_params
        if not path.exists():
            hint = (
                "the run is encrypted: a key holder releases the final model with `secure-fedvlp export RUN_DIR --key "
                "KEYFILE` first"
                if layout.encrypted_model.exists()
                else "the run has not finished"
            )
            raise DataError(f"{path} is missing: {hint}.")
        m = build_model(cfg)
        load_federated_state(m, _load_arrays(path))
        return m

    out.append(("final", final))
    return out


class SiteDownstream:
    """One site's side of downstream evaluation: its records, its results file and its guard (module docstring)."""

    def __init__(self, layout: RunLayout, site: SiteData, untrained_hash: str) -> None:
        self.layout = layout
        self.site = site
        self.untrained_hash = untrained_hash
        self.results = layout.site_downstream(site.name)
        self.guard = layout.downstream_guard(site.name)

    def _guard(self) -> dict[str, str]:
        if not self.guard.exists():
            return {}
        return json.loads(self.guard.read_text(encoding="utf-8"))["models"]

    def _save_guard(self, models: dict[str, str]) -> None:
        self.guard.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.guard.with_name(self.guard.name + ".tmp")
        tmp.write_text(json.dumps({"site": self.site.name, "models": models}, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.guard)

    def check(self, name: str, digest: str) -> None:
        """Allow (and record) evaluating the encoder ``digest`` as model ``name``, or raise :class:`ProtocolError`."""
        if name not in MODEL_NAMES:
            raise ProtocolError(
                f"site {self.site.name}: downstream evaluation of model {name!r} refused (known: "
                f"{', '.join(MODEL_NAMES)})."
            )
        if name == "untrained" and digest != self.untrained_hash:
            raise ProtocolError(
                f"site {self.site.name}: the 'untrained' model is not the seeded initial model; refused."
            )
        models = self._guard()
        if models.get(name, digest) != digest:
            raise ProtocolError(
                f"site {self.site.name}: model {name!r} was already evaluated with another image encoder; refused."
            )
        if name not in models:
            models[name] = digest
            self._save_guard(models)

    def _recorded(self, key: dict[str, Any]) -> dict[str, float] | None:
        if not self.results.exists():
            return None
        for line in self.results.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["key"] == key:
                return row["metrics"]
        return None

    def evaluate(
        self, name: str, model: torch.nn.Module, tasks: Sequence[str], settings: ProbeSettings, device
    ) -> dict[str, float]:
        """The downstream metrics of ``model`` (named ``name``) on this site's records; recorded at the site."""
        digest = encoder_hash(model)
        self.check(name, digest)
        key = {"model": name, "encoder": digest, "tasks": sorted(tasks), "settings": dataclasses.asdict(settings)}
        key = json.loads(json.dumps(key))  # tuples as lists, as they read back
        done = self._recorded(key)
        if done is not None:
            return done
        metrics = site_downstream(model, self.site, tasks=tasks, settings=settings, device=device)
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "metrics": metrics}, sort_keys=True) + "\n")
        return metrics


def evaluate_run(
    run_dir: str | os.PathLike | FinishedRun,
    *,
    tasks: Sequence[str],
    settings: ProbeSettings | None = None,
    sites: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the downstream ``tasks`` at every site (or ``sites``) of a finished run; write what the sites released.

    ``models``: only these of :data:`MODEL_NAMES` (default: every one the run has).  Returns the content of
    :attr:`RunLayout.downstream_results` (merged with what earlier calls wrote).
    """
    bad = sorted(set(models or ()) - set(MODEL_NAMES))
    if bad:
        raise DataError(f"unknown model(s) {bad}; known: {', '.join(MODEL_NAMES)}.")
    run = load_run(run_dir)
    cfg, layout = run.cfg, run.layout
    tasks = list(dict.fromkeys(tasks))
    unknown = sorted(set(tasks) - set(TASKS) - {POOLED_TASK})
    if not tasks or unknown:
        raise DataError(f"--tasks must list downstream tasks from {', '.join(TASKS + (POOLED_TASK,))}. Found {tasks}.")
    pooled = POOLED_TASK in tasks
    tasks = [t for t in tasks if t != POOLED_TASK]
    settings = settings or settings_from_config(cfg)
    fed = build_federation(cfg)
    chosen = [s for s in fed.all_sites() if sites is None or s.name in sites]
    missing = sorted(set(sites or ()) - {s.name for s in fed.all_sites()})
    if missing:
        raise DataError(f"unknown site(s) {missing}; this run has: {', '.join(s.name for s in fed.all_sites())}.")
    untrained_hash = encoder_hash(build_model(cfg, untrained=True))
    path = layout.downstream_results
    out = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"sites": {}}
    out.update({"release": cfg.eval.release, "split": "test"})
    if not isinstance(out.get("settings"), dict) or "fractions" in out["settings"]:
        out["settings"] = {}  # one entry per task: the settings of the last call that ran it
    for task in tasks + ([POOLED_TASK] if pooled else []):
        out["settings"][task] = dataclasses.asdict(settings)
    out["tasks"] = sorted(out["settings"])
    dev = torch.device(device)
    for name, builder in reference_models(run):
        if models is not None and name not in models:
            continue
        model = builder().to(dev).eval()
        decoders = pooled_decoders(cfg, model, settings, dev) if pooled else []
        for site in chosen:
            runner = SiteDownstream(layout, site, untrained_hash)
            metrics = runner.evaluate(name, model, tasks, settings, dev) if tasks else {}
            if decoders and site.test.masks is not None:
                metrics = {**metrics, **pooled_scores(model, decoders, site, settings, dev)}
            entry = out["sites"].setdefault(site.name, {"role": site.role, "models": {}})
            if cfg.eval.release == "clear":
                entry["models"][name] = {**entry["models"].get(name, {}), **metrics}  # add to earlier tasks
            else:
                entry["models"][name] = KEPT_AT_SITE
            if progress is not None:
                shown = ", ".join(
                    f"{k} {v:.3f}"
                    for k, v in metrics.items()
                    if k.endswith(("auroc_macro", "/dice")) and "std" not in k
                )
                progress(f"downstream {name} at {site.name}: {shown}")
    path.write_text(json.dumps(out, indent=1, sort_keys=True, allow_nan=True) + "\n", encoding="utf-8")
    return out


def pooled_decoders(cfg: ExperimentConfig, model, settings: ProbeSettings, device) -> list[torch.nn.Module]:
    """The centralized segmentation reference: one decoder per seed on every training site's records pooled at one
    party (no federation, no privacy: a yardstick, as ``federation.method = "centralized"`` is for pre-training)."""
    from secure_fedvlp.methods.centralized import pooled_training_data

    data = pooled_training_data(cfg)
    return [
        train_decoder(model.image_encoder, data, settings=settings, seed=s, device=device)
        for s in range(settings.seeds)
    ]


def pooled_scores(model, decoders, site: SiteData, settings: ProbeSettings, device) -> dict[str, float]:
    """Dice of the pooled decoders on ``site``'s test split (mean and spread over seeds)."""
    runs = [
        dice_summary(
            evaluate_decoder(model.image_encoder, d, site.test, batch_size=settings.batch_size, device=device),
            site.test.masks,
        )
        for d in decoders
    ]
    out = {}
    for k in ("dice", "dice_lesion"):
        ms = _mean_std([r[k] for r in runs])
        out[f"{POOLED_TASK}/{k}"] = ms["mean"]
        out[f"{POOLED_TASK}/{k}/std"] = ms["std"]
    return out


def downstream_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Per metric and model: the training sites' mean, the worst training site, and each held-out site."""
    sites = results.get("sites", {})
    metrics = sorted(
        {
            k
            for s in sites.values()
            for m in s["models"].values()
            if isinstance(m, dict)
            for k in m
            if k.endswith(("/auroc_macro", "/dice", "/dice_lesion"))
        }
    )
    out: dict[str, Any] = {}
    for metric in metrics:
        for model in MODEL_NAMES:
            vals = {
                s: v["models"][model][metric]
                for s, v in sites.items()
                if isinstance(v["models"].get(model), dict) and metric in v["models"][model]
            }
            train = {s: x for s, x in vals.items() if sites[s]["role"] == "train" and x == x}
            if not vals:
                continue
            row: dict[str, Any] = {"heldout": {s: x for s, x in vals.items() if sites[s]["role"] == "heldout"}}
            if train:
                worst = min(train, key=train.get)
                row.update({"mean_train": sum(train.values()) / len(train), "worst_site": worst, "worst": train[worst]})
            out.setdefault(metric, {})[model] = row
    return out
