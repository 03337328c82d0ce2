"""Wall time of a CKKS-encrypted training round over a plaintext round, on the demo config.

Runs the same federated experiment twice in one process, back to back -- once with
``encryption.enabled = false`` and once with it on (keys created for the run) -- and reads the
per-round train wall time the server records (``metrics.jsonl``, ``phase = "round"``: from
configuring the round to the new global model, encryption, the encrypted sum and the clients'
decryption included).  Round 1 is kept out of the median (first-use costs).  The aim for the
ratio is at most 1.2x.

    python benchmarks/bench_encrypted_round.py [--config configs/demo.toml] [--rounds 3] [--method fedavg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def round_times(run_dir: Path) -> list[float]:
    from secure_fedvlp.layout import RunLayout, read_metrics

    return [
        float(r["train_seconds"])
        for r in read_metrics(RunLayout(run_dir).metrics)
        if r.get("phase") == "round" and "train_seconds" in r
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="fedavg")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)

    from secure_fedvlp.cli import run_experiment

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for enc in (False, True):
            run_dir = Path(tmp) / ("encrypted" if enc else "plaintext")
            run_experiment(
                args.config,
                [
                    f"federation.num_rounds={args.rounds}",
                    f"federation.method={args.method}",
                    f"encryption.enabled={str(enc).lower()}",
                    "eval.every_round=false",
                ],
                run_dir=str(run_dir),
            )
            t = round_times(run_dir)
            if not t:
                print(f"error: no round timings in {run_dir}/metrics.jsonl", file=sys.stderr)
                return 1
            steady = t[1:] or t
            rows["encrypted" if enc else "plaintext"] = {"round_seconds": t, "median_s": statistics.median(steady)}
    ratio = rows["encrypted"]["median_s"] / rows["plaintext"]["median_s"]
    out = {"config": args.config, "method": args.method, "rounds": args.rounds, **rows, "ratio": ratio}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{'mode':<10} {'median round (s)':>17}  per round (s)")
    for k in ("plaintext", "encrypted"):
        print(f"{k:<10} {rows[k]['median_s']:>17.2f}  " + " ".join(f"{x:.2f}" for x in rows[k]["round_seconds"]))
    print(f"encrypted / plaintext round wall time: {ratio:.3f}x (aim <= 1.2x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
