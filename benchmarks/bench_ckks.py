"""Benchmark CKKS-encrypted aggregation: bytes on the wire per model value and throughput.

Runs the real path -- ``init_keys`` -> ``encrypt_update`` -> ``to_bytes`` -> ``aggregate_encrypted``
(server context, parse + validate + sum) -> ``decrypt_aggregate`` -- for exact CKKS (one value per
slot) and for quantised packing, and prints one row per mode.

Bytes/value is ``len(serialised ciphertexts) / model values`` (envelope header excluded; it is a
few hundred bytes).  Throughput is model values per second for one client's encryption, for the
server's aggregation of all clients, and for one client's decryption.

Threads: TenSEAL encrypts, adds and decrypts one single-ciphertext vector per call, and these calls
hold the GIL, so the work here is single-threaded regardless of ``--threads`` (which only sets the
context's ``n_threads``).  Clients run on different machines in a deployment; the server's sum is
embarrassingly parallel over vectors if more throughput is needed.

Example::

    python benchmarks/bench_ckks.py --values 1000000 --clients 4 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from secure_fedvlp.encryption import (
    QuantizedPacking,
    aggregate_encrypted,
    decrypt_aggregate,
    encrypt_update,
    exact_error_bound,
    init_keys,
    load_client_context,
    load_server_context,
    preset,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--values", type=int, default=1_000_000, help="model values per update")
    ap.add_argument("--clients", type=int, default=4, help="contributing clients")
    ap.add_argument("--threads", type=int, default=1, help="TenSEAL context n_threads")
    ap.add_argument("--preset", default="sum_only_128")
    ap.add_argument("--value-bits", type=int, nargs="+", default=[10, 7], help="packed modes to run")
    ap.add_argument("--max-clients", type=int, default=None, help="packing capacity (default: max(8, clients))")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    params = preset(args.preset, n_threads=args.threads)
    max_clients = args.max_clients or max(8, args.clients)
    ids = [f"c{i}" for i in range(args.clients)]
    rng = np.random.default_rng(args.seed)
    vals = rng.uniform(-1.0, 1.0, size=(args.clients, args.values))
    weights = rng.uniform(0.2, 1.0, size=args.clients)
    ref = (weights[:, None] * vals).sum(0) / weights.sum()

    with tempfile.TemporaryDirectory() as d:
        bundle = init_keys(d, ids, params)
        clients = {cid: load_client_context(p) for cid, p in bundle.client_paths.items()}
        server = load_server_context(bundle.server_path)

    print(
        f"preset={args.preset} N={params.poly_modulus_degree} chain={list(params.coeff_mod_bit_sizes)} "
        f"security={params.security_bits}-bit symmetric={params.symmetric} threads={args.threads} "
        f"values={args.values} clients={args.clients}"
    )
    header = (
        f"{'mode':<28}{'bytes/value':>12}{'MB/client':>11}{'enc val/s':>12}{'agg val/s':>12}"
        f"{'dec val/s':>12}{'max|err|':>11}{'bound':>11}"
    )
    print(header)
    modes: list[tuple[str, QuantizedPacking | None]] = [("exact (1 value/slot)", None)]
    for b in args.value_bits:
        p = QuantizedPacking.for_params(params, b, 1.0, max_clients)
        modes.append((f"packed b={b} K<={max_clients} k={p.digits_per_slot}", p))
    for name, packing in modes:
        blobs = {}
        t_enc = 0.0
        nbytes = 0
        for i, cid in enumerate(ids):
            t0 = time.perf_counter()
            upd = encrypt_update(clients[cid], vals[i], float(weights[i]), 1, client_id=cid, packing=packing)
            blobs[cid] = upd.to_bytes()
            t_enc += time.perf_counter() - t0
            nbytes += upd.nbytes
        t0 = time.perf_counter()
        res = aggregate_encrypted(server, blobs, round_id=1, num_values=args.values, packing=packing)
        t_agg = time.perf_counter() - t0
        if res.rejected:
            print(f"rejected: {res.rejected}", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        out = decrypt_aggregate(clients[ids[0]], res.aggregate, packing=packing)
        t_dec = time.perf_counter() - t0
        err = float(np.max(np.abs(out - ref)))
        w = float(weights.sum())
        bound = (
            packing.error_bound(args.clients, w) if packing is not None else exact_error_bound(params, args.clients, w)
        )
        per_value = nbytes / args.clients / args.values
        print(
            f"{name:<28}{per_value:>12.2f}{nbytes / args.clients / 1e6:>11.1f}"
            f"{args.values * args.clients / t_enc:>12.3g}{args.values * args.clients / t_agg:>12.3g}"
            f"{args.values / t_dec:>12.3g}{err:>11.2e}{bound:>11.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
