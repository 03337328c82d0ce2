"""Command line: ``secure-fedvlp run | sweep | keys init | export | audit | report | evaluate``.

``main(argv) -> int`` so tests call it directly.  Configuration is read here, once, and
handed to the Flower apps as typed objects; a finished run is opened with
:func:`~secure_fedvlp.layout.load_run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    path.mkdir(parents=True)
    return path


def run_experiment(
    config_path: str | os.PathLike, overrides: Sequence[str] = (), run_dir: str | None = None, verbose: bool = False
) -> Path:
    """Run one federated experiment on Flower's Simulation Engine; return the run directory."""
    from secure_fedvlp.config import config_to_dict, dump_toml, load_config

    cfg = load_config(config_path, list(overrides))
    rdir = Path(run_dir) if run_dir else _new_run_dir(cfg.run.output_dir, cfg.run.name)
    rdir.mkdir(parents=True, exist_ok=True)
    layout = RunLayout(rdir)
    layout.config.write_text(dump_toml(config_to_dict(cfg)), encoding="utf-8")
    _setup_logging(verbose, layout.log)
    progress = logging.getLogger("secure_fedvlp.progress")
    progress.info("run directory: %s", rdir)

    # Flower keeps its state under FLWR_HOME; keep it inside the run, never in ~/.flwr.
    os.environ.setdefault("FLWR_HOME", str(layout.flwr_home))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")

    from flwr.simulation import run_simulation

    from secure_fedvlp.build import build_federation, expected_num_nodes, resolve_device
    from secure_fedvlp.flower.client_app import make_client_app
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
    if cfg.audit.canaries:  # the CLI plays the auditor: coins drawn and kept before anything trains
        from secure_fedvlp.evaluation.canary_files import prepare_canaries

        coins = prepare_canaries(cfg, rdir, [s.name for s in fed.sites])
        progress.info(
            "empirical audit: %d canaries, %d included at %s (coins kept by the auditor in %s)",
            coins["m"],
            sum(coins["included"]),
            coins["canary_site"],
            layout.canary_coins,
        )
    setup = RunSetup(cfg, rdir)
    auto_keys = cfg.encryption.enabled and not cfg.encryption.key_dir
    if cfg.encryption.enabled:
        _prepare_keys(cfg, rdir, [s.name for s in fed.all_sites()], progress)

    def provider(_context):  # noqa: ANN001 - Flower Context
        return setup

    n_nodes = expected_num_nodes(cfg)
    device = resolve_device(cfg.run.device)
    cpus = cfg.run.num_cpus or (os.cpu_count() or 1)
    backend_config = {
        "client_resources": {
            "num_cpus": cfg.run.threads_per_client,
            "num_gpus": (1.0 / max(1, n_nodes)) if device.type == "cuda" else 0.0,
        },
        "init_args": {
            "num_cpus": cpus,
            "logging_level": "warning",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    run_simulation(
        server_app=make_server_app(provider),
        client_app=make_client_app(provider),
        num_supernodes=n_nodes,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
    report = layout.report_md
    if not report.exists():
        raise SecureFedVLPError(f"the run ended without writing {report}; see {layout.log}.")
    if auto_keys and layout.encrypted_model.exists():
        # Simulation: the CLI played the key authority, so it also plays the key holder who releases
        # the final model (in deployment a site runs `secure-fedvlp export` with its own key).
        from secure_fedvlp.evaluation.report import write_report
        from secure_fedvlp.wrappers.encryption import encryption_settings, export_model

        site = fed.sites[0].name
        info = export_model(rdir, encryption_settings(cfg, rdir).client_key(site))
        progress.info("final model decrypted by key holder %s: %s", site, info["decryption"])
        write_report(rdir)
    if cfg.audit.canaries:
        _empirical_after_run(FinishedRun(layout, cfg), progress)
    if cfg.eval.downstream:
        _downstream_after_run(FinishedRun(layout, cfg), list(cfg.eval.downstream), progress)
    progress.info("finished in %.0fs", time.perf_counter() - t0)
    return rdir


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


def _prepare_keys(cfg, rdir: Path, sites: list[str], progress: logging.Logger) -> None:
    """Check the configured key directory, or create the run's keys (simulation: the CLI is the key authority)."""
    from secure_fedvlp.encryption.keys import init_keys
    from secure_fedvlp.wrappers.encryption import check_encryption_supported, encryption_settings

    check_encryption_supported(cfg)
    enc = encryption_settings(cfg, rdir)
    kdir = enc.key_dir
    if cfg.encryption.key_dir:
        missing = [str(p) for p in [enc.server_context, *(enc.client_key(s) for s in sites)] if not p.exists()]
        if missing:
            raise SecureFedVLPError(
                f"encryption.key_dir = {str(kdir)!r} lacks {missing}; create them with "
                f"`secure-fedvlp keys init --out {kdir} --clients {','.join(sites)} "
                f"--preset {enc.preset}`."
            )
        return
    bundle = init_keys(kdir, sites, enc.params)
    progress.info(
        "CKKS keys created in %s (fingerprint %s): one secret-key file per site, a key-less server context",
        kdir,
        bundle.fingerprint,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    import json as _json

    from secure_fedvlp.evaluation.report import write_report
    from secure_fedvlp.wrappers.encryption import export_model

    info = export_model(args.run_dir, args.key, out=args.out)
    if args.out is None:
        write_report(Path(args.run_dir))
    print(_json.dumps(info, indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    layout = RunLayout(run_experiment(args.config, args.set or [], args.run_dir, args.verbose))
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
        root = run_sweep(spec, verbose=args.verbose)
    print((root / "summary.md").read_text(encoding="utf-8"))
    print(f"Summary: {root / 'summary.md'} (json, png beside it)")
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from secure_fedvlp.encryption.keys import init_keys, load_server_context
    from secure_fedvlp.encryption.params import preset, security_level

    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if not clients:
        raise SecureFedVLPError("--clients needs at least one client id (comma-separated).")
    params = preset(args.preset)
    bundle = init_keys(args.out, clients, params, overwrite=args.overwrite)
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
    print("Give each client only its own file; give the server only the server file.")
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
    r.add_argument("-v", "--verbose", action="store_true", help="show Flower/Ray logs")
    r.set_defaults(func=_cmd_run)
    sw = sub.add_parser("sweep", help="run a grid of experiments (resumable) and summarise them")
    sw.add_argument("config", help="sweep file (TOML), e.g. configs/compare_methods.toml")
    sw.add_argument("--summarise-only", action="store_true", help="only rebuild the summary of finished cells")
    sw.add_argument("-v", "--verbose", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    # Register the built-in methods now: a config naming one then validates even where the installed package
    # metadata (its entry points) predates the method.
    import secure_fedvlp.methods  # noqa: F401

    try:
        return int(args.func(args))
    except SecureFedVLPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def entrypoint() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
