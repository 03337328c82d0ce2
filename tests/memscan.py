"""Scan a process's memory and a directory's files for a run's secrets, from a separate process.

``python -m tests.memscan --pid PID --key CLIENT_KEY --model EXPORT.npz --config CONFIG.toml
[--files DIR --skip SUBDIR] [--dump COPY]`` prints one JSON object: which needles were found where.
``--dump-pid PID --dump-out COPY`` only copies a (stopped) process's memory, reading no needle, for a scan
once the needles exist (a key holder's export made after the process's last round).

The needles are read here, never by the process under scan (which would otherwise hold them):

* the secret key: windows of the serialised TenSEAL body of a client key file (what the process that
  created or loaded the key would have held);
* the plaintext model: windows of 16 float32 values (and the same values as float64) of the key
  holder's decrypted export, taken where every value differs from the seeded initial model (which
  the server legitimately holds).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

_WINDOW_BYTES = 48
_CHUNK = 64 << 20


def key_needles(key_file: Path, n: int = 4) -> list[bytes]:
    data = key_file.read_bytes()
    start = 12 + struct.unpack(">I", data[8:12])[0]  # magic (8), header length (4), header
    body = data[start:]
    step = max(1, (len(body) - _WINDOW_BYTES) // (n + 1))
    return [body[(i + 1) * step : (i + 1) * step + _WINDOW_BYTES] for i in range(n)]


def model_needles(export: Path, config: Path, n: int = 4) -> list[bytes]:
    from secure_fedvlp.build import build_model
    from secure_fedvlp.config import load_config
    from secure_fedvlp.models.state import federated_state

    initial = federated_state(build_model(load_config(config)))
    out: list[bytes] = []
    with np.load(export) as npz:
        names = sorted(npz.files, key=lambda k: -npz[k].size)
        for name in names:
            trained = np.asarray(npz[name], dtype=np.float32).ravel()
            init = np.asarray(initial[name], dtype=np.float32).ravel()
            changed = trained != init
            for start in range(0, trained.size - 16, max(16, trained.size // 8)):
                if changed[start : start + 16].all():
                    window = trained[start : start + 16]
                    out += [window.tobytes(), window.astype(np.float64).tobytes()]
                if len(out) >= 2 * n:
                    return out
    return out


def _regions(pid: int):
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        perms, name = parts[1], parts[5] if len(parts) > 5 else ""
        if "r" not in perms or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            continue
        if "w" not in perms and name.startswith("/"):  # code and read-only data of a file on disk
            continue
        yield lo, hi


def scan_memory(pid: int, needles: dict[str, list[bytes]]) -> dict[str, int]:
    """How many needles of each kind occur in the memory of process ``pid``."""
    found = {k: 0 for k in needles}
    pattern = {k: [n for n in v if n] for k, v in needles.items()}
    seen: dict[str, set[int]] = {k: set() for k in needles}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi in _regions(pid):
            pos = lo
            while pos < hi:
                size = min(_CHUNK, hi - pos)
                try:
                    mem.seek(pos)
                    buf = mem.read(size + _WINDOW_BYTES * 2)  # overlap across chunks
                except (OSError, ValueError, OverflowError):
                    break
                for kind, ns in pattern.items():
                    for i, n in enumerate(ns):
                        if i not in seen[kind] and buf.find(n) >= 0:
                            seen[kind].add(i)
                pos += size
    for k in needles:
        found[k] = len(seen[k])
    return found


def dump_memory(pid: int, out: Path) -> int:
    """Copy the readable memory of process ``pid`` (stopped by the caller) into ``out``; return its size.

    For a process that must not stay stopped long (a ServerApp the SuperLink expects heartbeats from): the
    copy takes seconds, the search for needles (which needs a key holder's export first) runs on the copy.
    """
    total = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, os.fdopen(fd, "wb") as dst:
        for lo, hi in _regions(pid):
            pos = lo
            while pos < hi:
                size = min(_CHUNK, hi - pos)
                try:
                    mem.seek(pos)
                    buf = mem.read(size)
                except (OSError, ValueError, OverflowError):
                    break
                dst.write(buf)
                total += len(buf)
                pos += size
    return total


def scan_dump(path: Path, needles: dict[str, list[bytes]]) -> dict[str, int]:
    """How many needles of each kind occur in a memory copy made by :func:`dump_memory`."""
    seen: dict[str, set[int]] = {k: set() for k in needles}
    overlap = _WINDOW_BYTES * 2
    with open(path, "rb") as fh:
        prev = b""
        while chunk := fh.read(_CHUNK):
            buf = prev + chunk
            for kind, ns in needles.items():
                for i, n in enumerate(ns):
                    if n and i not in seen[kind] and buf.find(n) >= 0:
                        seen[kind].add(i)
            prev = buf[-overlap:]
    return {k: len(v) for k, v in seen.items()}


def scan_files(root: Path, needles: dict[str, list[bytes]], skip: list[str]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {k: [] for k in needles}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        data = p.read_bytes()
        for kind, ns in needles.items():
            if any(n and n in data for n in ns):
                hits[kind].append(rel)
    return hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, action="append", default=[])
    ap.add_argument("--dump-pid", type=int, help="only copy this (stopped) process's memory to --dump-out")
    ap.add_argument("--dump-out", type=Path)
    ap.add_argument("--dump", type=Path, action="append", default=[], help="a memory copy to scan")
    ap.add_argument("--key", type=Path)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--files", type=Path)
    ap.add_argument("--skip", action="append", default=[])
    args = ap.parse_args(argv)
    if args.dump_pid is not None:  # no needles are read in this mode
        print(json.dumps({"dumped": dump_memory(args.dump_pid, args.dump_out)}))
        return 0
    if args.key is None:
        ap.error("--key is required")
    needles = {"secret_key": key_needles(args.key)}
    if args.model is not None:
        needles["plaintext_model"] = model_needles(args.model, args.config)
    out: dict = {"needles": {k: len(v) for k, v in needles.items()}, "memory": {}, "files": None}
    for pid in args.pid:
        out["memory"][str(pid)] = scan_memory(pid, needles)
    for dump in args.dump:
        out["memory"][str(dump)] = scan_dump(dump, needles)
    if args.files is not None:
        out["files"] = scan_files(args.files, needles, args.skip)
    # a self-check that the scanner can find what it looks for: its own memory holds every needle
    out["self_check"] = scan_memory(os.getpid(), needles)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
