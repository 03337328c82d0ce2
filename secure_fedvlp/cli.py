"""Command line: ``secure-fedvlp run | sweep | pretrain | keys | deploy init | export | audit | ledger repair``,
``report`` and ``evaluate``.

``main(argv) -> int`` so tests call it directly.  Configuration is read here, once, and
handed to the Flower apps as typed objects; a finished run is opened with
:func:`~secure_fedvlp.layout.load_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secure_fedvlp.errors import SecureFedVLPError
from secure_fedvlp.layout import FinishedRun, RunLayout, load_run

logger = logging.getLogger("secure_fedvlp.cli")

__all__ = ["main", "entrypoint", "run_experiment"]


def _setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    progress = logging.getLogger("secure_fedvlp.progress")
    progress.handlers.clear()
    ph = logging.StreamHandler(sys.stdout)
    ph.setFormatter(logging.Formatter("[secure-fedvlp %(asctime)s] %(message)s", "%H:%M:%S"))
    progress.addHandler(ph)
    progress.setLevel(logging.INFO)
    progress.propagate = log_file is not None
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(logging.INFO if verbose else logging.WARNING)
    root.addHandler(err)
    root.setLevel(logging.INFO)
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    # Flower and Ray are chatty; their INFO lines go to the log file only.
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _new_run_dir(output_dir: str, name: str) -> Path:
    """A fresh ``<output_dir>/<name>-<time>`` path (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    return path


def _aside(path: Path) -> Path:
    """A free name beside ``path`` to move it to (``<name>.replaced-<time>``)."""
    base = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out, i = base, 1
    while out.exists():
        i += 1
        out = Path(f"{base}-{i}")
    return out


def _check_run_dir(rdir: Path, resume: bool, force: bool) -> None:
    """Refuse a run directory that cannot take this run (nothing is written here)."""
    if resume and force:
        raise SecureFedVLPError("--resume and --force exclude each other: continue the run, or start a new one.")
    if rdir.exists() and not rdir.is_dir():
        raise SecureFedVLPError(f"--run-dir {rdir} is a file, not a directory.")
    occupied = rdir.is_dir() and any(rdir.iterdir())
    if resume and not RunLayout(rdir).config.exists():
        raise SecureFedVLPError(f"--resume: {rdir} holds no run to resume (no {RunLayout(rdir).config.name}).")
    if occupied and not resume and not force:
        raise SecureFedVLPError(
            f"run directory {rdir} exists and is not empty; pass --resume to continue that run, or --force to "
            "start a new, separate run (the old directory is moved aside, not deleted)."
        )


def _check_resume_config(rdir: Path, cfg) -> None:  # noqa: ANN001 - ExperimentConfig
    """A resumed run must be the same run: the resolved config must equal the one the run started with."""
    from secure_fedvlp.config import config_to_dict, load_config

    def flat(d, prefix=""):  # noqa: ANN001, ANN202
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    before = flat(config_to_dict(load_config(RunLayout(rdir).config)))
    now = flat(config_to_dict(cfg))
    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise SecureFedVLPError(
            f"--resume: the config differs from the run's {RunLayout(rdir).config} in {len(diff)} key(s), first "
            f"{k} = {now.get(k)!r} (the run has {before.get(k)!r}); resume with the same config and --set options."
        )


def run_experiment(
    config_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    run_dir: str | None = None,
    verbose: bool = False,
    *,
    resume: bool = False,
    force: bool = False,
    key_dir: str | None = None,
) -> Path:
    """Run one federated experiment on Flower's Simulation Engine; return the run directory.

    Every check (config, run directory, key directory, the run to resume, a given checkpoint) passes
    before anything is written.  A run directory that exists and is not empty is refused unless
    ``resume`` (continue from its last checkpoint, ledgers and metrics kept) or ``force`` (a new run;
    the old directory is moved aside).  Raises :class:`SecureFedVLPError` with one line when the run
    FAILED (no round adopted an aggregate, or the server refused to go on).

    With a public start (``pretrain.enabled``, or ``model.init_checkpoint``) the CLI plays the server
    operator's public step before any site starts (:func:`_prepare_public_start`): the run's config then
    names the run's own copy of the public start as ``model.init_checkpoint``, so every party builds it.
    """
    from secure_fedvlp.config import config_to_dict, dump_toml, load_config, resolve_paths

    overrides = list(overrides)
    cfg = resolve_paths(load_config(config_path, overrides))
    rdir = Path(run_dir) if run_dir else _new_run_dir(cfg.run.output_dir, cfg.run.name)
    rdir = rdir.expanduser().absolute()
    _check_run_dir(rdir, resume, force)
    layout = RunLayout(rdir)
    keys_plan = None
    if cfg.encryption.enabled:
        keys_plan = _plan_keys(cfg, layout, key_dir, resume=resume, force=force)
        overrides.append(f"encryption.key_dir={json.dumps(str(keys_plan.key_dir))}")
        cfg = resolve_paths(load_config(config_path, overrides))
    if resume and (cfg.pretrain.enabled or cfg.model.init_checkpoint) and layout.public_start.is_file():
        # the run made its public start when it began: it resumes from the run's own copy
        cfg = _with_checkpoint(cfg, layout.public_start)
    if resume:
        _check_resume_config(rdir, cfg)
        from secure_fedvlp.flower.server_app import load_checkpoint

        load_checkpoint(layout)  # a damaged checkpoint is refused here, before anything is written
    elif cfg.model.init_checkpoint:
        from secure_fedvlp.build import build_model

        build_model(cfg)  # a bad model.init_checkpoint is refused here (file and key named), before any write

    # -- every check passed: from here on the run writes ----------------------------------------
    if force and rdir.is_dir() and any(rdir.iterdir()):
        old = _aside(rdir)
        rdir.rename(old)
        print(f"--force: the previous run directory was moved to {old}", file=sys.stderr)
        if keys_plan is not None and keys_plan.default and keys_plan.key_dir.exists():
            keys_plan.key_dir.rename(RunLayout(old).default_key_dir)  # its keys go with it
    rdir.mkdir(parents=True, exist_ok=True)
    _setup_logging(verbose, layout.log)
    progress = logging.getLogger("secure_fedvlp.progress")
    progress.info("run directory: %s%s", rdir, " (resumed)" if resume else "")
    if not resume:
        if cfg.pretrain.enabled or cfg.model.init_checkpoint:
            cfg = _prepare_public_start(cfg, rdir, progress)
        layout.config.write_text(dump_toml(config_to_dict(cfg)), encoding="utf-8")

    # Flower keeps its state under FLWR_HOME; keep it inside the run, never in ~/.flwr.
    os.environ.setdefault("FLWR_HOME", str(layout.flwr_home))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    from flwr.simulation import run_simulation

    from secure_fedvlp.build import build_federation, expected_num_nodes
    from secure_fedvlp.flower.client_app import make_client_app, prepare_public_features
    from secure_fedvlp.flower.runtime import RunSetup
    from secure_fedvlp.flower.server_app import make_server_app

    t0 = time.perf_counter()
    fed = build_federation(cfg)  # generate / load once, so client processes only read the cache
    progress.info(
        "data ready in %.1fs: %d training sites + %s held-out (%s)",
        time.perf_counter() - t0,
        len(fed.sites),
        1 if fed.heldout else 0,
        ", ".join(f"{s.name}: {len(s.train)} train / {len(s.test)} test" for s in fed.all_sites()),
    )
    t0 = time.perf_counter()
    n_public = prepare_public_features(cfg, fed.public)  # the operator's: public data, locked public towers
    if n_public:
        progress.info(
            "public set's locked-tower features ready in %.1fs (%d entries, read by every site)",
            time.perf_counter() - t0,
            n_public,
        )
    if cfg.audit.canaries and not (resume and layout.canary_coins.exists()):
        # the CLI plays the auditor: coins drawn and kept before anything trains
        from secure_fedvlp.evaluation.canary_files import prepare_canaries

        coins = prepare_canaries(cfg, rdir, [s.name for s in fed.sites])
        progress.info(
            "empirical audit: %d canaries, %d included at %s (coins kept by the auditor in %s)",
            coins["m"],
            sum(coins["included"]),
            coins["canary_site"],
            layout.canary_coins,
        )
    setup = RunSetup(cfg, rdir, resume=resume)
    if keys_plan is not None:
        _make_keys(keys_plan, cfg, [s.name for s in fed.all_sites()], progress)

    def provider(_context):  # noqa: ANN001 - Flower Context
        return setup

    stop = threading.Event()
    try:
        with _sigint_sets(stop):
            run_simulation(
                server_app=make_server_app(provider, stop=stop),
                client_app=make_client_app(provider),
                num_supernodes=expected_num_nodes(cfg),
                backend_config=simulation_backend_config(cfg, verbose),
                verbose_logging=verbose,
            )
    except KeyboardInterrupt:
        stop.set()  # the ServerApp stops at its next exchange; no report: the run is not over
        _shutdown_ray()
        from secure_fedvlp.flower.server_app import load_checkpoint

        try:
            done = (load_checkpoint(layout) or (0,))[0]
        except SecureFedVLPError:
            done = 0
        progress.warning(
            "interrupted after %d finished round(s); Ray was shut down. Continue with the same command and --resume.",
            done,
        )
        raise
    except Exception as exc:  # noqa: BLE001 - said in one line; the traceback is in the run's log
        logger.debug("the simulation raised", exc_info=True)
        _raise_if_failed(layout)
        msg = f"FAILED: the run stopped with {type(exc).__name__}: {exc}; see {layout.log}."
        raise SecureFedVLPError(msg) from None
    report = layout.report_md
    if not report.exists():
        raise SecureFedVLPError(f"FAILED: the run ended without writing {report}; see {layout.log}.")
    _raise_if_failed(layout)
    if keys_plan is not None and keys_plan.created and layout.encrypted_model.exists():
        # Simulation: the CLI played the key authority, so it also plays a key holder who releases the
        # final model (in deployment a site runs `secure-fedvlp export` with its own key).  Both run in
        # their own processes: the secret key never enters this one, which ran the ServerApp.
        from secure_fedvlp.evaluation.report import write_report

        site = fed.sites[0].name
        out = layout.key_holder_export(site)
        _key_holder_export(layout, keys_plan.key_dir / f"client-{site}.key", out)
        progress.info("final model decrypted by key holder %s (in its own process) into %s", site, out)
        write_report(rdir)
    if cfg.audit.canaries:
        _empirical_after_run(FinishedRun(layout, cfg), progress)
    if cfg.eval.downstream:
        _downstream_after_run(FinishedRun(layout, cfg), list(cfg.eval.downstream), progress)
    progress.info("finished in %.0fs", time.perf_counter() - t0)
    return rdir


def simulation_backend_config(cfg, verbose: bool = False) -> dict:  # noqa: ANN001 - ExperimentConfig
    """Flower's Ray backend settings for a simulated run.

    Flower's Simulation Engine runs every site's ClientApp in a pool of Ray actors (one per
    ``run.threads_per_client`` CPUs of ``run.num_cpus``), any actor taking any site's message, so one
    actor per site would not keep sites apart.  What does is in each actor's ``options`` (Flower passes
    ``client_resources`` to them): ``max_restarts``: an actor whose process dies (a crash, the OOM
    killer, ``kill -9``) is restarted by Ray instead of staying dead in the pool, where it failed every
    later message it was given, whichever site's; ``max_task_retries``: a message given to the actor
    while it restarts waits for it instead of failing with it, and the message that was running when
    the process died gets one more try (a site that crashes again on it is counted missing for that
    round, which the report flags as degraded).  Only system failures are retried, never an exception a
    ClientApp raises.  A retried DP job records its release in the ledger again: an over-count, never
    an under-count.
    """
    from secure_fedvlp.build import expected_num_nodes, resolve_device

    n_nodes = expected_num_nodes(cfg)
    device = resolve_device(cfg.run.device)
    return {
        "client_resources": {
            "num_cpus": cfg.run.threads_per_client,
            "num_gpus": (1.0 / max(1, n_nodes)) if device.type == "cuda" else 0.0,
            "max_restarts": ACTOR_MAX_RESTARTS,
            "max_task_retries": 1,
        },
        "init_args": {
            "num_cpus": cfg.run.num_cpus or (os.cpu_count() or 1),
            "logging_level": "warning",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }


#: How often Ray restarts one crashed ClientApp actor over a run (a bound, not -1: an actor whose process
#: keeps dying stays dead after that, and the messages it is given fail as missing replies).
ACTOR_MAX_RESTARTS = 100


@contextlib.contextmanager
def _sigint_sets(stop: threading.Event):  # noqa: ANN202
    """While inside, Ctrl-C (SIGINT) first sets ``stop``, then raises KeyboardInterrupt as usual.

    Setting ``stop`` before the exception unwinds lets the ServerApp's thread stop at its next exchange
    instead of taking the replies the interruption cut short for failed sites.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ANN001, ANN202
        stop.set()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _shutdown_ray() -> None:
    """Stop the Ray processes this process started (Flower's backend does so too when it gets the chance)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _raise_if_failed(layout: RunLayout) -> None:
    """Raise the one-line FAILED error when the run's report says the run failed (and log it)."""
    if not layout.report_json.exists():
        return
    rep = json.loads(layout.report_json.read_text(encoding="utf-8"))
    if rep.get("status") == "FAILED":
        msg = f"FAILED: {rep.get('status_reason', 'see the report')} (report: {layout.report_md})"
        logging.getLogger("secure_fedvlp.progress").error(msg)
        raise SecureFedVLPError(msg)


def _prepare_public_start(cfg, rdir: Path, progress: logging.Logger):  # noqa: ANN001, ANN202 - ExperimentConfig
    """The run's public start, before any site starts; returns ``cfg`` naming it as ``model.init_checkpoint``.

    ``model.init_checkpoint`` given: the checkpoint is checked by building the model with it (a bad file
    is an error naming the file and key, before any site starts) and installed in the run.  Else
    (``pretrain.enabled``): the public start is taken from the cache under ``data.cache_dir`` or trained
    there first (:func:`~secure_fedvlp.methods.public_start.cached_public_start`), then installed.  Either
    way the run holds it as :attr:`RunLayout.public_start` with its description beside it.
    """

    from secure_fedvlp.methods import public_start as ps

    layout = RunLayout(rdir)
    dest = layout.public_start
    if cfg.model.init_checkpoint:
        from secure_fedvlp.build import build_model, checkpoint_path
        from secure_fedvlp.models.checkpoint import save_checkpoint

        src = checkpoint_path(cfg)
        model = build_model(cfg)  # loads it strictly: CheckpointError names the file and the key
        info = ps.checkpoint_info(cfg)
        if cfg.pretrain.enabled and info.get("key"):
            try:
                expected = ps.public_start_key(cfg)
            except SecureFedVLPError:
                expected = info["key"]
            if expected != info["key"]:
                logger.warning(
                    "model.init_checkpoint %s was pre-trained under another configuration (key %s, this "
                    "config's public start is %s); it is used as given.",
                    src,
                    info["key"],
                    expected,
                )
        if not (dest.exists() and os.path.samefile(src, dest)):
            if src.suffix.lower() == ".npz":
                ps.install_public_start(src, info, dest)
            else:  # a torch checkpoint: the run keeps it in the package's format (and its hash in that form)
                digest = save_checkpoint(model, dest, meta={"model": cfg.model.name, "origin": str(src)})
                info = {**info, "state_hash": digest}
                ps.write_info(ps.info_path(dest), {**info, "installed_from": str(src)})
        progress.info(
            "public start: model.init_checkpoint %s checked (state hash %s) -> %s",
            src,
            info["state_hash"][:16],
            dest,
        )
    else:
        start = ps.cached_public_start(cfg, log=progress.info)
        ps.install_public_start(start.path, {**start.info, "from_cache": not start.trained}, dest)
        progress.info(
            "public start %s: %s (state hash %s, %s steps on %s public records, %s; no privacy budget spent) -> %s",
            "trained" if start.trained else "from the cache",
            start.path,
            start.info["state_hash"][:16],
            start.info.get("steps"),
            start.info.get("corpus_size"),
            f"{start.info.get('wall_seconds', 0):.0f}s" if start.trained else "reused",
            dest,
        )
    return _with_checkpoint(cfg, dest)


def _with_checkpoint(cfg, path: Path):  # noqa: ANN001, ANN202 - ExperimentConfig
    """``cfg`` with ``model.init_checkpoint`` = ``path``, absolute."""
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=str(Path(path).resolve())))


def _empirical_after_run(run: FinishedRun, progress: logging.Logger) -> None:
    """The auditor's step after training: score the canaries under the released model, write
    the empirical audit (:attr:`RunLayout.empirical_audit`) and put it in the report."""
    from secure_fedvlp.evaluation.membership import write_empirical_audit
    from secure_fedvlp.evaluation.report import write_report

    try:
        emp = write_empirical_audit(run)
    except SecureFedVLPError as exc:  # e.g. an encrypted model nobody released: say so, keep the run
        logger.warning("empirical audit not computed: %s", exc)
        return
    claimed = emp["claimed_epsilon"]
    progress.info(
        "empirical audit: epsilon lower bound %.3f at %.0f%% confidence (%d/%d guesses correct) vs "
        "claimed epsilon %s at %s: %s",
        emp["epsilon_lower_bound"],
        100 * emp["confidence"],
        emp["correct"],
        emp["guesses"],
        "none" if claimed is None else f"{claimed:.3f}",
        emp["canary_site"],
        emp["verdict"],
    )
    write_report(run)


def _downstream_after_run(run: FinishedRun, tasks: list[str], progress: logging.Logger) -> None:
    """``eval.downstream``: each site evaluates the final model and the references on its own records (the CLI
    plays every site, as in simulation), then the report is rebuilt with what they released."""
    from secure_fedvlp.build import resolve_device
    from secure_fedvlp.evaluation.downstream_run import evaluate_run
    from secure_fedvlp.evaluation.report import write_report

    try:
        evaluate_run(run, tasks=tasks, device=resolve_device(run.cfg.run.device), progress=progress.info)
    except SecureFedVLPError as exc:  # e.g. an encrypted model nobody released: say so, keep the run
        logger.warning("downstream evaluation not run: %s", exc)
        return
    write_report(run)


@dataclass(frozen=True)
class _KeysPlan:
    key_dir: Path
    created: bool  # the CLI plays the key authority (creates the keys) for this run
    overwrite: bool
    default: bool = False  # the key directory is the run's default one (moved aside with it by --force)


def _plan_keys(cfg, layout: RunLayout, key_dir: str | None, *, resume: bool, force: bool) -> _KeysPlan:  # noqa: ANN001
    """Where this run's keys are and whether the CLI creates them, checked before anything is written.

    ``--key-dir``, else ``encryption.key_dir``, else :attr:`RunLayout.default_key_dir` (beside the run,
    never inside it).  A key directory that already holds keys is checked
    (:func:`~secure_fedvlp.wrappers.encryption.keydir.check_key_dir`) and used; an empty or absent one
    is filled by ``secure-fedvlp keys init`` run in its own process; ``encryption.key_dir`` naming a
    directory without keys is refused (its keys come from the key authority).
    """
    from secure_fedvlp.build import build_federation
    from secure_fedvlp.encryption.keys import MANIFEST_NAME
    from secure_fedvlp.wrappers.encryption import check_encryption_supported, encryption_settings
    from secure_fedvlp.wrappers.encryption.keydir import check_key_dir

    check_encryption_supported(cfg)
    named = key_dir or cfg.encryption.key_dir
    kdir = Path(named).expanduser().absolute() if named else layout.default_key_dir
    root = layout.root.absolute()
    if kdir == root or root in kdir.parents:
        raise SecureFedVLPError(f"key directory {kdir} is inside the run directory {root}; keys must live outside it.")
    if kdir.exists() and not kdir.is_dir():
        raise SecureFedVLPError(f"key directory {kdir} is a file, not a directory.")
    has_keys = (kdir / MANIFEST_NAME).exists()
    default = not named
    if default and force and has_keys:  # the replaced run's keys go aside with it
        return _KeysPlan(kdir, created=True, overwrite=False, default=True)
    if default and has_keys and not resume:
        # the default key directory of an earlier run at this path (its run directory is gone or empty)
        return _KeysPlan(kdir, created=True, overwrite=True, default=True)
    if has_keys:
        from dataclasses import replace

        settings = replace(encryption_settings(cfg, layout.root), key_dir=kdir)
        check_key_dir(settings, [s.name for s in build_federation(cfg).all_sites()])
        return _KeysPlan(kdir, created=default, overwrite=False, default=default)
    if cfg.encryption.key_dir and not key_dir:
        raise SecureFedVLPError(
            f"encryption.key_dir = {str(kdir)!r} holds no keys; the key authority creates them with "
            f"`secure-fedvlp keys init --out {kdir} --clients SITE,SITE,... --preset {cfg.encryption.preset}`."
        )
    return _KeysPlan(kdir, created=True, overwrite=False, default=default)


def _run_cli_process(args: list[str], what: str) -> None:
    """Run ``secure-fedvlp ARGS`` in a new process (a party other than the server); one-line error on failure."""
    proc = subprocess.run(
        [sys.executable, "-m", "secure_fedvlp.cli", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SecureFedVLPError(f"{what} failed (exit {proc.returncode}): {last}")


def _make_keys(plan: _KeysPlan, cfg, sites: list[str], progress: logging.Logger) -> None:  # noqa: ANN001
    """Simulation: the CLI plays the key authority, in a process of its own (never the server's)."""
    if not plan.created or (plan.key_dir / "manifest.json").exists() and not plan.overwrite:
        return
    args = ["keys", "init", "--out", str(plan.key_dir), "--clients", ",".join(sites)]
    args += ["--preset", cfg.encryption.preset] + (["--overwrite"] if plan.overwrite else [])
    _run_cli_process(args, "key generation")
    progress.info(
        "CKKS keys created by the key authority (its own process) in %s: one secret-key file per site (0600), "
        "a key-less server context, directory 0700",
        plan.key_dir,
    )


def _key_holder_export(layout: RunLayout, key: Path, out: Path) -> None:
    """Simulation: a key holder decrypts the final model in its own process into its own 0600 file."""
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _run_cli_process(["export", str(layout.root), "--key", str(key), "--out", str(out)], "export by the key holder")


def _cmd_export(args: argparse.Namespace) -> int:
    from secure_fedvlp.evaluation.report import write_report
    from secure_fedvlp.wrappers.encryption import export_model

    info = export_model(args.run_dir, args.key, out=args.out)
    if args.out is None:
        write_report(Path(args.run_dir))
    print(json.dumps(info, indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    rdir = run_experiment(
        args.config,
        args.set or [],
        args.run_dir,
        args.verbose,
        resume=args.resume,
        force=args.force,
        key_dir=args.key_dir,
    )
    layout = RunLayout(rdir)
    print(f"Report: {layout.report_md}")
    print(f"        {layout.report_json}, plots in {layout.plots}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from secure_fedvlp.evaluation.report import write_report

    run = load_run(args.run_dir)
    if not run.layout.metrics.exists():
        raise SecureFedVLPError(
            f"{run.root} holds no {run.layout.relative(run.layout.metrics)}; is it a run directory?"
        )
    md = write_report(run)
    print(md.read_text(encoding="utf-8"))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from secure_fedvlp.sweep import load_sweep, run_sweep, summarise_sweep

    spec = load_sweep(args.config)
    _setup_logging(args.verbose)
    if args.summarise_only:
        summarise_sweep(spec)
        root = spec.root
    else:
        try:
            root = run_sweep(spec, verbose=args.verbose)
        except KeyboardInterrupt:
            print(
                f"interrupted, rerun to resume: secure-fedvlp sweep {args.config} (finished cells are kept; "
                "the interrupted cell is moved aside, ledgers and all, and run again)",
                file=sys.stderr,
            )
            return 130
    print((root / "summary.md").read_text(encoding="utf-8"))
    print(f"Summary: {root / 'summary.md'} (json, png beside it)")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    """The public start for a deployment: trained (or taken from the cache) and written to ``--out``."""
    from secure_fedvlp.config import load_config
    from secure_fedvlp.methods import public_start as ps

    out = Path(args.out)
    if out.suffix.lower() != ".npz":
        raise SecureFedVLPError(f"--out {str(out)!r} must name a .npz file (the public start's checkpoint).")
    # The public start is made from the seeded model and the [pretrain] settings, whatever the config's
    # pretrain.enabled and model.init_checkpoint say.
    cfg = load_config(args.config, ["pretrain.enabled=true", "model.init_checkpoint=''", *(args.set or [])])
    _setup_logging(args.verbose)
    start = ps.cached_public_start(cfg)
    ps.install_public_start(start.path, {**start.info, "from_cache": not start.trained}, out)
    info = start.info
    how = f"trained in {info.get('wall_seconds', 0):.0f}s" if start.trained else "from the cache"
    print(
        f"Public start: {out} ({info.get('steps')} steps on {info.get('corpus_size')} public records "
        f"({info.get('source')}), {how})"
    )
    print(f"  state hash {info['state_hash']}; description {ps.info_path(out)}")
    print("  public data only: no site's record was read, no privacy budget was spent.")
    print(f'Give every party {out.name} and set model.init_checkpoint = "<path to {out.name}>" in its config.')
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from secure_fedvlp.encryption.keys import init_keys, load_server_context
    from secure_fedvlp.encryption.params import preset, security_level

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not clients:
        raise SecureFedVLPError("--clients needs at least one client id (comma-separated).")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SecureFedVLPError(f"--out {out} is a file; name a directory for the key files.")
    params = preset(args.preset)
    if args.overwrite and out.is_dir():  # a key of a site no longer in the federation must not linger
        for stale in sorted(out.glob("client-*.key")):
            if stale.name not in {f"client-{c}.key" for c in clients}:
                stale.unlink()
                print(f"  removed stale key file {stale}")
    bundle = init_keys(out, clients, params, overwrite=args.overwrite)
    os.chmod(bundle.out_dir, 0o700)  # also when the directory existed before
    load_server_context(bundle.server_path)  # refuses a server file that holds a secret key
    print(
        f"CKKS keys for {len(clients)} client(s) in {bundle.out_dir} "
        f"(preset {args.preset}: N={params.poly_modulus_degree}, "
        f"moduli {list(params.coeff_mod_bit_sizes)}, {security_level(params)}-bit security)"
    )
    print(f"  server (no secret key): {bundle.server_path}")
    for cid, path in bundle.client_paths.items():
        print(f"  client {cid} (secret key, mode 0600): {path}")
    print(f"  fingerprint: {bundle.fingerprint}")
    print(f"  signing public keys (Ed25519; each client file holds its own private key): {bundle.manifest_path}")
    print("Give each client only its own file; give the server only the server file; give everyone the manifest.")
    return 0


def _cmd_keys_bind_nodes(args: argparse.Namespace) -> int:
    from secure_fedvlp.flower.nodes import NODE_BINDING_FILE, write_node_binding

    sites: dict[str, str] = {}
    for item in args.node:
        site, sep, pub = item.partition("=")
        if not sep or not site or not pub:
            raise SecureFedVLPError(f"--node {item!r} must look like SITE=PATH_TO_NODE_PUBLIC_KEY.")
        if site in sites:
            raise SecureFedVLPError(f"--node names site {site!r} twice.")
        sites[site] = pub
    out = Path(args.out)
    if not out.is_dir():
        raise SecureFedVLPError(f"--out {out} is not a directory (the key directory of the run).")
    binding = write_node_binding(out / NODE_BINDING_FILE, sites)
    print(f"node binding for {len(binding)} site(s): {out / NODE_BINDING_FILE}")
    for fp, site in sorted(binding.items(), key=lambda kv: kv[1]):
        print(f"  {site}: node key sha256 {fp}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    import json as _json

    from secure_fedvlp.privacy.audit import attach_empirical, audit_run, format_audit

    # dp-accounting logs (through absl) every small RDP order it excludes for non-convergence.
    logging.getLogger("absl").setLevel(logging.ERROR)
    audit = audit_run(args.run_dir)
    if args.empirical:
        from secure_fedvlp.evaluation.membership import empirical_audit

        # Recomputed from the run's files (config, coins, released model, ledger): the audit does
        # not take the run's own empirical audit file on trust.
        try:
            emp = empirical_audit(args.run_dir, beta=args.beta)
        except (SecureFedVLPError, ValueError) as exc:
            audit.problems.append(f"empirical audit impossible: {exc}")
        else:
            attach_empirical(audit, emp)
    print(_json.dumps(audit.to_dict(), indent=2) if args.json else format_audit(audit))
    return 0 if audit.ok else 1


def _cmd_ledger_repair(args: argparse.Namespace) -> int:
    from secure_fedvlp.privacy.ledger import repair_ledger

    ledgers: list[Path] = []
    for item in args.ledger:
        path = Path(item)
        if path.is_dir():
            found = list(RunLayout(path).ledgers().values())
            if not found:
                raise SecureFedVLPError(f"{path} is a directory holding no ledger (clients/SITE/privacy_ledger.jsonl)")
            ledgers += found
        elif path.exists():
            ledgers.append(path)
        else:
            raise SecureFedVLPError(f"ledger {path} does not exist.")
    for path in ledgers:  # each is checked before it is changed; the first one refused stops here
        done = repair_ledger(path)
        print(f"{path}: {done or 'intact, nothing to repair'}")
    return 0


def _cmd_deploy_init(args: argparse.Namespace) -> int:
    """Everything a loopback (or one-machine) Deployment Engine federation needs, and the scripts that start it."""
    from secure_fedvlp.config import load_config
    from secure_fedvlp.deploy import write_deployment

    sites = [c.strip() for c in args.sites.split(",") if c.strip()]
    if not sites or len(set(sites)) != len(sites):
        raise SecureFedVLPError(f"--sites needs distinct site names, comma-separated. Found {args.sites!r}.")
    out = Path(args.out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise SecureFedVLPError(f"{out} is a file, not a directory.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise SecureFedVLPError(f"{out} exists and is not empty; pass --overwrite (the old one is moved aside).")
    load_config(args.config, args.set or [])  # a bad config or --set is refused before anything is written
    run_dir = Path(args.run_dir).expanduser().absolute() if args.run_dir else out / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SecureFedVLPError(f"run directory {run_dir} exists and is not empty; name another with --run-dir.")
    import secure_fedvlp

    app_dir = Path(args.app_dir).absolute() if args.app_dir else Path(secure_fedvlp.__file__).resolve().parent.parent
    if not (app_dir / "pyproject.toml").exists():
        raise SecureFedVLPError(f"--app-dir {app_dir} holds no pyproject.toml (the Flower app to `flwr run`).")
    # -- checks passed ---------------------------------------------------------------------------
    if out.is_dir() and any(out.iterdir()):
        old = _aside(out)
        out.rename(old)
        print(f"--overwrite: the previous deployment directory was moved to {old}", file=sys.stderr)
    dep = write_deployment(
        out,
        sites,
        app_dir=app_dir,
        config_path=args.config,
        run_dir=run_dir,
        overrides=args.set or [],
        host=args.host,
        port=args.port,
    )
    # the key authority's part, in processes of its own (this one never holds a secret key)
    _run_cli_process(
        ["keys", "init", "--out", str(dep.key_dir), "--clients", ",".join(sites), "--preset", args.preset],
        "key generation",
    )
    _run_cli_process(
        ["keys", "bind-nodes", "--out", str(dep.key_dir), *[f"--node={s}={dep.node_keys[s][1]}" for s in sites]],
        "node binding",
    )
    print(f"Deployment for {len(sites)} site(s) in {out}:")
    print(f"  TLS: CA {dep.pki.ca_cert} (give the sites this file only), SuperLink {dep.pki.server_cert}")
    print(f"  node keys (0600, each stays at its site): {', '.join(str(dep.node_keys[s][0]) for s in sites)}")
    print(f"  CKKS keys and node binding (key authority): {dep.key_dir}")
    print(f"  flwr CLI connection: {dep.flwr_home / 'config.toml'}")
    print("Start, each in its own terminal and in this order (run.sh follows the run's log):")
    for script in dep.scripts.values():
        print(f"  {script}")
    print(f"The report lands in {run_dir}; a key holder then releases the model with")
    print(f"  secure-fedvlp export {run_dir} --key {dep.key_dir / f'client-{sites[0]}.key'} --out MODEL.npz")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from secure_fedvlp.build import resolve_device
    from secure_fedvlp.evaluation.downstream_run import evaluate_run, settings_from_config
    from secure_fedvlp.evaluation.report import write_report

    run = load_run(args.run_dir)
    _setup_logging(args.verbose)
    try:
        settings = settings_from_config(run.cfg, fractions=args.fractions, seeds=args.seeds, seg_steps=args.seg_steps)
    except ValueError as exc:
        raise SecureFedVLPError(f"invalid downstream settings: {exc}") from None
    progress = logging.getLogger("secure_fedvlp.progress")
    evaluate_run(
        run,
        tasks=args.tasks,
        settings=settings,
        sites=args.sites,
        models=args.models,
        device=resolve_device(args.device or run.cfg.run.device),
        progress=progress.info,
    )
    md = write_report(run)
    text = md.read_text(encoding="utf-8")
    start = text.find("## Downstream evaluation")
    print(text[start : text.find("\n## ", start + 3)] if start >= 0 else text)
    print(f"Report: {md} ({run.layout.relative(run.layout.downstream_results)} beside it)")
    return 0


def _csv_list(kind: type, what: str):
    def parse(text: str):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list. Found {text!r}.") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{what} must not be empty.")
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Found {text!r}.")
    return n


def _beta(text: str) -> float:
    try:
        b = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--beta must be a number in (0, 1). Found {text!r}.") from None
    if not 0 < b < 1:
        raise argparse.ArgumentTypeError(f"--beta must be in (0, 1). Found {b}.")
    return b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secure-fedvlp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one federated experiment from a TOML config")
    r.add_argument("config", help="experiment config (TOML), e.g. configs/demo.toml")
    r.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set federation.num_rounds=5 (repeatable)",
    )
    r.add_argument("--run-dir", help="write the run here instead of run.output_dir/<name>-<time>")
    r.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last finished round")
    r.add_argument(
        "--force",
        action="store_true",
        help="start a new run in a --run-dir that is not empty (the old directory is moved aside, not deleted)",
    )
    r.add_argument(
        "--key-dir",
        help="key directory of an encrypted run (default: encryption.key_dir, else <run-dir>.keys beside the run)",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="show Flower/Ray logs")
    r.set_defaults(func=_cmd_run)
    sw = sub.add_parser("sweep", help="run a grid of experiments (resumable) and summarise them")
    sw.add_argument("config", help="sweep file (TOML), e.g. configs/compare_methods.toml")
    sw.add_argument("--summarise-only", action="store_true", help="only rebuild the summary of finished cells")
    sw.add_argument("-v", "--verbose", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
    pre = sub.add_parser(
        "pretrain",
        help="train the public start of a config (non-private, public data, no privacy budget) and write it to "
        "--out, for deployments (then set model.init_checkpoint)",
    )
    pre.add_argument("config", help="experiment config (TOML); its [pretrain] section and model")
    pre.add_argument("--out", required=True, help="the checkpoint to write (.npz; a .json description goes beside it)")
    pre.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    pre.add_argument("-v", "--verbose", action="store_true")
    pre.set_defaults(func=_cmd_pretrain)
    keys = sub.add_parser("keys", help="CKKS key material for a federation run")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    ki = ksub.add_parser(
        "init", help="create a fresh CKKS context: one secret-key file per client, one public server file"
    )
    ki.add_argument("--out", required=True, help="directory to write the key files and manifest into")
    ki.add_argument("--clients", required=True, help="comma-separated client (site) ids, e.g. site1,site2,site3")
    ki.add_argument("--preset", default="sum_only_128", help="CKKS parameter preset (default: sum_only_128)")
    ki.add_argument("--overwrite", action="store_true", help="replace existing key files")
    ki.set_defaults(func=_cmd_keys_init)
    kb = ksub.add_parser(
        "bind-nodes", help="bind each site to its SuperNode's public key (deployment; written into the key directory)"
    )
    kb.add_argument("--out", required=True, help="the run's key directory")
    kb.add_argument(
        "--node", action="append", required=True, metavar="SITE=PUBKEY", help="a site and its node's OpenSSH public key"
    )
    kb.set_defaults(func=_cmd_keys_bind_nodes)
    au = sub.add_parser("audit", help="verify every client ledger of a run and recompute epsilon independently")
    au.add_argument("run_dir")
    au.add_argument("--json", action="store_true", help="machine-readable output")
    au.add_argument(
        "--empirical",
        action="store_true",
        help="also recompute the one-run empirical lower bound on epsilon from the run's canaries "
        "(audit.canaries > 0) and fail if it exceeds the claimed epsilon",
    )
    au.add_argument(
        "--beta", type=_beta, default=0.05, help="1 - confidence of the empirical bound (default 0.05: 95%% confidence)"
    )
    au.set_defaults(func=_cmd_audit)
    dep = sub.add_parser("deploy", help="the Deployment Engine: TLS, node authentication, keys and start scripts")
    dsub = dep.add_subparsers(dest="deploy_command", required=True)
    di = dsub.add_parser(
        "init",
        help="write the TLS material, node keys, CKKS keys, node binding, flwr connection and one start script "
        "per party (SuperLink, registration, a SuperNode per site, the run) into OUT",
    )
    di.add_argument("out", help="the deployment directory (0700)")
    di.add_argument("--sites", required=True, help="comma-separated site names, e.g. site1,site2")
    di.add_argument("--config", required=True, help="the experiment config the run uses, e.g. configs/demo.toml")
    di.add_argument("--set", action="append", metavar="KEY=VALUE", help="a config override for the run (repeatable)")
    di.add_argument("--run-dir", help="where the ServerApp writes the run (default: OUT/run)")
    di.add_argument("--host", default="127.0.0.1", help="the SuperLink's address (default 127.0.0.1: loopback)")
    di.add_argument("--port", type=int, default=9093, help="the SuperLink's port; SuperNodes take the next ones")
    di.add_argument("--preset", default="sum_only_128", help="CKKS parameter preset (default: sum_only_128)")
    di.add_argument("--app-dir", help="the Flower app to run (default: this project's directory)")
    di.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (moved aside, not deleted)")
    di.set_defaults(func=_cmd_deploy_init)
    led = sub.add_parser("ledger", help="privacy ledger maintenance")
    lsub = led.add_subparsers(dest="ledger_command", required=True)
    lr = lsub.add_parser(
        "repair",
        help="drop a partial last line a crash left, when the head file proves it was never committed "
        "(anything else is refused)",
    )
    lr.add_argument("ledger", nargs="+", help="a ledger file, or a run directory (each of its site ledgers)")
    lr.set_defaults(func=_cmd_ledger_repair)
    ex = sub.add_parser("export", help="decrypt an encrypted run's final model for release (key holders only)")
    ex.add_argument("run_dir")
    ex.add_argument("--key", required=True, help="this site's client key file (client-<site>.key)")
    ex.add_argument("--out", help="write the parameters here instead of RUN_DIR/model/federated_params.npz")
    ex.set_defaults(func=_cmd_export)
    ev = sub.add_parser(
        "evaluate",
        help="downstream evaluation of a finished run at each site (linear probe, segmentation) beside the references",
    )
    ev.add_argument("run_dir")
    ev.add_argument(
        "--tasks",
        type=_csv_list(str, "--tasks"),
        default=["linear", "segmentation"],
        help="comma-separated tasks: linear, segmentation (default: both); segmentation_pooled adds the "
        "centralized reference (one decoder on every training site's records pooled)",
    )
    ev.add_argument(
        "--fractions",
        type=_csv_list(float, "--fractions"),
        help="label fractions of the linear probe (default: config)",
    )
    ev.add_argument("--seeds", type=_positive_int, help="sub-sampling / decoder seeds (default: config)")
    ev.add_argument("--seg-steps", type=_positive_int, help="decoder training steps (default: config)")
    ev.add_argument(
        "--sites",
        type=_csv_list(str, "--sites"),
        help="only these sites (deployment: a site evaluates its own records; default: every site of the run)",
    )
    ev.add_argument(
        "--models",
        type=_csv_list(str, "--models"),
        help="only these of untrained, public_start, final (default: every one the run has)",
    )
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: run.device")
    ev.add_argument("-v", "--verbose", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)
    rep = sub.add_parser("report", help="(re)build report.md/json and plots of a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=_cmd_report)
    return p


def _register_builtin_methods() -> None:
    """Register the built-in methods before any config is read.

    The config layer knows method names from the installed entry points; an editable install made
    before a method was added has stale entry points, and the method's name would be refused.
    Importing :mod:`secure_fedvlp.methods` registers every built-in method whatever the metadata says.
    """
    import secure_fedvlp.methods  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    # Register the built-in methods now: a config naming one then validates even where the installed package
    # metadata (its entry points) predates the method.
    import secure_fedvlp.methods  # noqa: F401

    try:
        _register_builtin_methods()
        return int(args.func(args))
    except SecureFedVLPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command (with --resume for `run`) to continue.", file=sys.stderr)
        return 130


def entrypoint() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
