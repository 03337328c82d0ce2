"""DP-SGD overhead on the demo model: step time over the non-private step, per Opacus mode, with peak memory.

Each mode runs in its own process so peak memory (RSS, and CUDA when present) is its own.
The step is the same local objective (decomposable contrastive loss with public negatives)
on the same batch; the non-private step is the trainer's ordinary step (batch-mean loss,
plain optimizer), the DP steps are what :class:`~secure_fedvlp.wrappers.dpsgd.DPTrainer`
runs: per-record losses through :class:`~secure_fedvlp.wrappers.dpsgd.PrivateGradient` in
Opacus' ``hooks`` mode (per-layer per-sample gradient rules), ``functorch`` mode (vmap), or
``ghost`` mode (fast gradient clipping: per-sample gradient norms, ghost norms for the Linear
layers, then a second backward of the clipped loss), each followed by noise and the step.

    python benchmarks/bench_dp.py [--config configs/demo_dp_scratch.toml] [--set key=value ...]
                                  [--steps 8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("non-private", "hooks", "functorch", "ghost")


def one_mode(mode: str, config: str, steps: int, threads: int, overrides: list[str]) -> dict:
    import torch

    from secure_fedvlp.build import build_federation, build_model, configure_threads, resolve_device
    from secure_fedvlp.config import load_config
    from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
    from secure_fedvlp.wrappers.dpsgd import PrivateGradient

    configure_threads(threads)
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.run.device)
    fed = build_federation(cfg)
    model = build_model(cfg).to(device)
    model.train()
    trainer = LocalTrainer(cfg, device, fed.public)
    records = trainer.training_subset(fed.sites[0].train)
    state = trainer.begin(model, TrainTask(1, "full", steps), {}, dataset=records)
    loader = trainer.make_loader(records, model, torch.Generator().manual_seed(0))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(iter(loader)).items()}
    b = int(batch["images"].shape[0])
    opt = trainer.make_optimizer(model, [n for n, p in model.named_parameters() if p.requires_grad])
    private = None
    if mode != "non-private":
        private = PrivateGradient(
            model,
            opt,
            mode=mode,
            clipping="flat",
            clip_norm=cfg.privacy.clip_norm,
            noise_multiplier=1.0,
            expected_batch_size=b,
            generator=torch.Generator(device=device).manual_seed(0),
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        if private is None:
            opt.zero_grad(set_to_none=True)
            trainer.compute_loss(model, batch, state)["loss"].backward()
            opt.step()
        else:
            private.zero_grad()
            private.backward(trainer.compute_loss(private.module, batch, state, reduction="none")["loss"])
            private.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "device": str(device),
        "batch": b,
        "trained_params": trained,
        "step_ms": statistics.median(times) * 1e3,
        "cpu_ms": statistics.median(cpu) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo_dp_scratch.toml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mode:
        print(json.dumps(one_mode(args._mode, args.config, args.steps, args.threads, args.set)))
        return 0
    rows = []
    for mode in MODES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                *[f"--set={kv}" for kv in args.set],
                "--_mode",
                mode,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows:
        print("every mode failed; see the errors above", file=sys.stderr)
        return 1
    base = next((r for r in rows if r["mode"] == "non-private"), None)
    print(
        f"config {args.config} {' '.join(args.set)}; device {rows[0]['device']}; batch {rows[0]['batch']}; "
        f"threads {args.threads}; trained parameters {rows[0]['trained_params']:,}; "
        f"median of {args.steps} steps after one warm-up"
    )
    print(
        "wall = median wall-clock ms per step (min-max); cpu = median process CPU ms per step, which other "
        "jobs on a shared machine inflate less; ratios are over the non-private step"
    )
    print(
        f"{'mode':<12} {'wall ms':>8} {'(min-max)':>14} {'x wall':>7} {'cpu ms':>8} {'x cpu':>6} "
        f"{'peak RSS MiB':>13} {'peak CUDA MiB':>14}"
    )
    for r in rows:
        ratio = r["step_ms"] / base["step_ms"] if base else float("nan")
        cratio = r["cpu_ms"] / base["cpu_ms"] if base else float("nan")
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "-"
        spread = f"({r['min_ms']:.0f}-{r['max_ms']:.0f})"
        print(
            f"{r['mode']:<12} {r['step_ms']:>8.0f} {spread:>14} {ratio:>7.2f} {r['cpu_ms']:>8.0f} {cratio:>6.2f} "
            f"{r['peak_rss_mib']:>13.0f} {cuda:>14}"
        )
    return 0 if len(rows) == len(MODES) else 1


if __name__ == "__main__":
    sys.exit(main())
