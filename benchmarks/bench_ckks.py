"""Benchmark CKKS-encrypted aggregation: bytes on the wire per model value, throughput, signature cost.

Runs the real path -- ``init_keys`` -> ``encrypt_update`` -> ``to_bytes`` -> ``aggregate_encrypted``
(server context, parse + validate + sum) -> decryption -- and prints one row per mode:

* ``flower: packed delta`` -- what the Flower apps send by default (``encryption.codec =
  "packed_delta"``): deltas clipped to 0.25, quantised to the most bits that fit 3 per slot, the
  weight in the last slot of every vector, each contribution signed (Ed25519 over the header and the
  sha256 of the ciphertexts) and verified by the server, the aggregate checked by the site
  (``check_and_decrypt``);
* ``flower: exact`` -- the same with ``encryption.codec = "exact"`` (fixed-point full models);
* ``exact`` and ``packed b=...`` -- the unsigned library codecs, for reference.

The signature cost is reported apart: per contribution, the site's digest + sign and the server's
digest + verify (both included in the encrypt and aggregate throughputs of the ``flower`` rows).

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
    ReplayGuard,
    aggregate_encrypted,
    check_and_decrypt,
    decrypt_aggregate,
    encrypt_update,
    exact_error_bound,
    init_keys,
    load_client_context,
    load_server_context,
    load_signing_public_keys,
    new_nonce,
    preset,
)
from secure_fedvlp.encryption.auth import verify_statement
from secure_fedvlp.encryption.envelope import EncryptedUpdate
from secure_fedvlp.encryption.packing import delta_packing, fixed_point_bits_for, quantize_weight


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
        keys = load_signing_public_keys(d, server.fingerprint)

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
    fbits = fixed_point_bits_for(params, max_clients)
    dpack = delta_packing(params, max_clients, 0.25)
    # (name, packing, signed flower path, fixed-point bits)
    modes: list[tuple[str, QuantizedPacking | None, bool, int | None]] = [
        (f"flower: packed delta b={dpack.value_bits}", dpack, True, None),
        (f"flower: exact f={fbits}", None, True, fbits),
        ("exact (1 value/slot)", None, False, None),
    ]
    for b in args.value_bits:
        p = QuantizedPacking.for_params(params, b, 1.0, max_clients)
        modes.append((f"packed b={b} K<={max_clients} k={p.digits_per_slot}", p, False, None))
    sig_rows = []
    for name, packing, signed, bits in modes:
        data = vals * 0.25 if signed and packing is not None else vals  # deltas within the public bound
        w = weights / weights.max() if signed else weights  # the Flower path normalises weights
        w = np.array([quantize_weight(x, packing, bits) for x in w]) if signed else w
        ref_mean = (w[:, None] * data).sum(0) / w.sum()
        nonces = {cid: new_nonce() for cid in ids}
        blobs = {}
        t_enc = 0.0
        nbytes = 0
        for i, cid in enumerate(ids):
            t0 = time.perf_counter()
            upd = encrypt_update(
                clients[cid],
                data[i],
                float(w[i]),
                1,
                client_id=cid,
                packing=packing,
                fixed_point_bits=bits,
                max_clients=max_clients if bits is not None else None,
                weight_slot=signed,
                nonce=nonces[cid] if signed else None,
            )
            blobs[cid] = upd.to_bytes()
            t_enc += time.perf_counter() - t0
            nbytes += upd.nbytes
        if signed:  # the signature's share of those times, measured apart
            upd = EncryptedUpdate.from_bytes(blobs[ids[0]])
            t0 = time.perf_counter()
            head = upd.signed_header()  # the digest of the ciphertexts
            clients[ids[0]].signing_key.sign(b"x" * 200)
            t_sign = time.perf_counter() - t0
            t0 = time.perf_counter()
            verify_statement(upd.signed_header(), keys, ids[0])
            t_verify = time.perf_counter() - t0
            sig_rows.append((name, t_sign, t_verify, len(head.signature) // 2))
        t0 = time.perf_counter()
        res = aggregate_encrypted(
            server,
            blobs,
            round_id=1,
            num_values=args.values,
            packing=packing,
            fixed_point_bits=bits,
            weight_slot=signed,
            public_keys=keys if signed else None,
            nonces=nonces if signed else None,
            replay=ReplayGuard() if signed else None,
        )
        t_agg = time.perf_counter() - t0
        if res.rejected:
            print(f"rejected: {res.rejected}", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        if signed:
            out = check_and_decrypt(
                clients[ids[0]], res.aggregate, keys, min_contributors=2, packing=packing, fixed_point_bits=bits
            )
        else:
            out = decrypt_aggregate(clients[ids[0]], res.aggregate, packing=packing)
        t_dec = time.perf_counter() - t0
        ref = ref_mean
        if packing is not None:
            ref = (w[:, None] * np.clip(data, -packing.bound, packing.bound)).sum(0) / w.sum()
        err = float(np.max(np.abs(out - ref)))
        tw = float(w.sum())
        if packing is not None:
            bound = packing.error_bound(args.clients, tw)
        elif bits is not None:  # fixed point: the CKKS error is rounded away; each weighted value is rounded to 2**-f
            bound = args.clients * 2.0 ** -(bits + 1) / tw
        else:
            bound = exact_error_bound(params, args.clients, tw)
        per_value = nbytes / args.clients / args.values
        print(
            f"{name:<28}{per_value:>12.2f}{nbytes / args.clients / 1e6:>11.1f}"
            f"{args.values * args.clients / t_enc:>12.3g}{args.values * args.clients / t_agg:>12.3g}"
            f"{args.values / t_dec:>12.3g}{err:>11.2e}{bound:>11.2e}"
        )
    print("\nsignature cost per contribution (Ed25519 over the header and the sha256 of the ciphertexts):")
    print(f"{'mode':<28}{'site: digest+sign ms':>22}{'server: digest+verify ms':>26}{'signature bytes':>17}")
    for name, t_sign, t_verify, nsig in sig_rows:
        print(f"{name:<28}{1e3 * t_sign:>22.1f}{1e3 * t_verify:>26.1f}{nsig:>17}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
