"""DP-SGD overhead on the demo model: step time over the non-private step, per Opacus mode, with peak memory.

Each mode runs in its own process so peak memory (RSS, and CUDA when present) is its own.
The step is the same local objective (decomposable contrastive loss with public negatives)
on the same batch size; the non-private step uses a plain optimizer, the DP steps go through
Opacus' GradSampleModule + DPOptimizer (per-sample clipping and noise).  Ghost clipping is not
offered: it needs a loss that Opacus' DPLossFastGradientClipping can rescale per sample, which
our multi-term loss is not wired for yet.

    python benchmarks/bench_dp.py [--config configs/demo_dp.toml] [--steps 8]
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


def one_mode(mode: str, config: str, steps: int, threads: int) -> dict:
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from secure_fedvlp.config import load_config
    from secure_fedvlp.flower.runtime import build_federation, build_model, configure_threads, resolve_device
    from secure_fedvlp.methods.base import LocalTrainer

    configure_threads(threads)
    cfg = load_config(config)
    device = resolve_device(cfg.run.device)
    fed = build_federation(cfg)
    model = build_model(cfg).to(device)
    trainer = LocalTrainer(cfg, device, fed.public)
    state = trainer.begin(model, None, {})
    loader = trainer.make_loader(trainer.training_subset(fed.sites[0].train), model, torch.Generator().manual_seed(0))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(iter(loader)).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    net = model
    if mode != "non-private":
        net = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch["images"].shape[0])
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        trainer.compute_loss(net, batch, state)["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return {"mode": mode, "device": str(device), "batch": int(batch["images"].shape[0]),
            "step_ms": statistics.median(times) * 1e3, "threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo_dp.toml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--_mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mode:
        print(json.dumps(one_mode(args._mode, args.config, args.steps, args.threads)))
        return 0
    rows = []
    for mode in ("non-private", "hooks", "functorch"):
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--steps", str(args.steps),
                              "--threads", str(args.threads), "--_mode", mode], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["mode"] == "non-private"), None)
    print(f"config {args.config}; device {rows[0]['device'] if rows else '?'}; batch {rows[0]['batch'] if rows else '?'}; "
          f"threads {args.threads}; median of {args.steps} steps after one warm-up")
    print(f"{'mode':<12} {'step ms':>9} {'x non-private':>14} {'peak RSS MiB':>13} {'peak CUDA MiB':>14}")
    for r in rows:
        ratio = r["step_ms"] / base["step_ms"] if base else float("nan")
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] is not None else "-"
        print(f"{r['mode']:<12} {r['step_ms']:>9.1f} {ratio:>14.2f} {r['peak_rss_mib']:>13.0f} {cuda:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
