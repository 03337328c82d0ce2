"""Time one local training step and one full federated round on a config; print peak memory.

Runs in-process (no Ray), so it measures the work itself: every training site trains
``train.local_steps`` steps from the same global model, the server averages, and every
site (held-out included) evaluates.  Usage::

    python benchmarks/bench_training.py [--config configs/demo.toml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

from secure_fedvlp.build import build_federation, build_model, configure_threads, resolve_device
from secure_fedvlp.config import load_config
from secure_fedvlp.evaluation.metrics import evaluate_split
from secure_fedvlp.methods import get_method
from secure_fedvlp.methods.trainer import TrainTask
from secure_fedvlp.models.state import federated_state, load_federated_state


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps after one warm-up")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    configure_threads(args.threads)
    device = resolve_device(cfg.run.device)
    t = time.perf_counter()
    fed = build_federation(cfg)
    t_data = time.perf_counter() - t
    model = build_model(cfg).to(device)
    trainer = get_method(cfg.federation.method).trainer(cfg, device)
    site = fed.sites[0]
    n_fed = sum(v.size for v in federated_state(model).values())
    n_all = sum(p.numel() for p in model.parameters())

    # One local step (after a warm-up step).
    loader = trainer.make_loader(trainer.training_subset(site.train), model, torch.Generator().manual_seed(0))
    opt = trainer.make_optimizer(model, [n for n, p in model.named_parameters() if p.requires_grad])
    batch = next(iter(loader))
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    times = []
    model.train()
    for i in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        trainer.compute_loss(model, batch, {})["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)

    # One full round, in process.
    global_state = federated_state(model)
    t = time.perf_counter()
    new_states, weights = [], []
    for s in fed.sites:
        load_federated_state(model, global_state)
        m = trainer.fit(
            model, s.train, TrainTask(1, "full", cfg.train.local_steps), torch.Generator().manual_seed(1), global_state
        )
        new_states.append(federated_state(model))
        weights.append(m["num-examples"])
    t_train = time.perf_counter() - t
    w = np.asarray(weights) / sum(weights)
    agg = {k: sum(wi * st[k] for wi, st in zip(w, new_states, strict=True)) for k in global_state}
    load_federated_state(model, agg)
    t = time.perf_counter()
    for s in fed.all_sites():
        evaluate_split(model, s.test, ks=cfg.eval.recall_ks, batch_size=cfg.eval.batch_size, device=device)
    t_eval = time.perf_counter() - t

    print(f"config: {args.config} {' '.join(args.set)}")
    print(f"device: {device}  torch threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"parameters: {n_all:,} total, {n_fed:,} federated (trainable)")
    print(f"data generation/load: {t_data:.2f} s")
    print(
        f"local step (batch {batch['images'].shape[0]}): median {statistics.median(times) * 1e3:.1f} ms "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, n={len(times)})"
    )
    print(
        f"full round: train {len(fed.sites)} sites x {cfg.train.local_steps} steps = {t_train:.2f} s, "
        f"evaluate {len(fed.all_sites())} sites = {t_eval:.2f} s, total {t_train + t_eval:.2f} s"
    )
    print(
        f"peak memory: {peak_rss_mib():.0f} MiB RSS"
        + (f", CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
