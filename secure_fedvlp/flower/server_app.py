"""The Flower ServerApp: runs the configured method's strategy and writes the run's report.

``app`` (module level) is the entry point for ``flwr run .``; the CLI builds its own with
:func:`make_server_app` and a closure over the config it parsed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from secure_fedvlp.build import expected_num_nodes
from secure_fedvlp.config import config_to_dict, dump_toml
from secure_fedvlp.errors import DataError, SecureFedVLPError
from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.flower.runtime import ConfigProvider, RunSetup, config_from_run_config
from secure_fedvlp.layout import FinishedRun, RunLayout
from secure_fedvlp.models.state import federated_state
from secure_fedvlp.wire import arrays_to_numpy, numpy_to_arrays
from secure_fedvlp.wrappers.compose import method_model, strategy_class

logger = logging.getLogger(__name__)

__all__ = ["make_server_app", "app", "save_checkpoint", "load_checkpoint", "RunInterrupted"]


class RunInterrupted(Exception):  # noqa: N818 - not an error of the run: the user stopped it
    """The user interrupted the run (Ctrl-C): the ServerApp stops at its next exchange with the sites,
    keeping the last checkpoint, and writes no report (the run is not over: ``--resume`` continues it)."""


class _StoppableGrid(Grid):
    """``grid``, refusing every exchange once ``stop`` is set (polled while waiting for replies)."""

    def __init__(self, grid: Grid, stop: threading.Event, poll_s: float = 0.1) -> None:
        self._grid, self._stop, self._poll_s = grid, stop, poll_s

    def _check(self) -> None:
        if self._stop.is_set():
            raise RunInterrupted("the run was interrupted; the ServerApp stopped before its next exchange")

    def set_run(self, run) -> None:  # noqa: ANN001, D102
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201, D102
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001, D102
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        self._check()
        return self._grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201, D102
        self._check()
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        self._check()
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` passed, stopping as soon as ``stop`` is set."""
        ids = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while ids and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(ids))
            replies += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if ids:
                self._stop.wait(self._poll_s)
        self._check()  # replies cut short by an interruption are not the sites' answers
        return replies


def make_server_app(
    provider: ConfigProvider = config_from_run_config, *, stop: threading.Event | None = None
) -> ServerApp:
    """A ServerApp whose config comes from ``provider(context)``.

    ``stop`` (the CLI's Ctrl-C): once set, the ServerApp's next exchange with the sites raises
    :class:`RunInterrupted`, before replies cut short by the interruption can be taken for failures.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if stop is not None:
            grid = _StoppableGrid(grid, stop)
        setup = provider(context)
        run_dir = setup.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        layout = RunLayout(run_dir)
        if not layout.config.exists():  # deployment (`flwr run`): the run directory's record of its config
            layout.config.write_text(dump_toml(config_to_dict(setup.cfg)), encoding="utf-8")
        recorder = RunRecorder(run_dir)
        try:
            _serve(grid, setup, recorder)
        except SecureFedVLPError as exc:
            # Said in the run's own files (metrics, report, log) before Flower sees the exception.
            logger.error("FAILED: %s", exc)
            recorder.record({"round": 0, "phase": "run", "status": "failed", "reason": str(exc)})
            write_report(FinishedRun(RunLayout(run_dir), setup.cfg))
            raise

    return server_app


def _serve(grid: Grid, setup: RunSetup, recorder: RunRecorder) -> None:
    cfg, run_dir = setup.cfg, setup.run_dir
    run = FinishedRun(RunLayout(run_dir), cfg)  # the report reads this config, not a copy on disk
    model = method_model(cfg)
    initial = numpy_to_arrays(federated_state(model))
    n_values = int(sum(v.size for v in arrays_to_numpy(initial).values()))
    recorder.progress(
        f"method={cfg.federation.method} rounds={cfg.federation.num_rounds} federated parameters={n_values:,}"
    )
    strategy = strategy_class(cfg)(cfg, recorder)
    if setup.node_binding is not None:
        from secure_fedvlp.flower.nodes import bind_sites

        bind_sites(strategy, setup.node_binding, grid)
    if cfg.encryption.enabled:
        from secure_fedvlp.wrappers.encryption import encryption_settings, load_server_encryption

        settings = encryption_settings(cfg, run_dir)
        strategy.setup_encryption(settings, load_server_encryption(settings), arrays_to_numpy(initial))
        recorder.progress(
            f"CKKS encrypted aggregation on (context {strategy.encryption_ctx.fingerprint}, "
            f"fixed point 2^-{strategy.encryption_bits})"
        )
    first_round, start, state = 1, initial, None
    if setup.resume:
        ckpt = load_checkpoint(run.layout)
        if ckpt is not None:
            first_round, start, state = ckpt[0] + 1, ckpt[1], ckpt[2]

    def on_round(rnd: int, arrays: ArrayRecord) -> None:
        save_checkpoint(run.layout, rnd, arrays, strategy.checkpoint_state())

    result = strategy.start(
        grid,
        start,
        num_rounds=cfg.federation.num_rounds,
        timeout=cfg.federation.round_timeout_s,
        expected_nodes=expected_num_nodes(cfg),
        first_round=first_round,
        resume_state=state,
        on_round=on_round,
    )
    final_record = result.arrays if result.arrays is not None else start
    model_dir = run.layout.model_dir
    model_dir.mkdir(exist_ok=True)
    if cfg.encryption.enabled:
        from secure_fedvlp.wrappers.encryption import is_encrypted, save_encrypted_model

        earlier = _read_encryption_stats(run.layout, before=first_round) if first_round > 1 else []
        _write_encryption_stats(run.layout, earlier + list(strategy.encryption_stats))
        if is_encrypted(final_record):
            save_encrypted_model(final_record, run.layout, cfg)
            write_report(run)
            return
    final = arrays_to_numpy(final_record)
    np.savez(run.layout.model_params, **final)
    run.layout.model_readme.write_text(
        f"Federated parameters of model config {cfg.model.name!r} after {cfg.federation.num_rounds} rounds.\n"
        "Load with secure_fedvlp.build.build_model(cfg) and "
        "secure_fedvlp.models.state.load_federated_state(model, dict(np.load(path))).\n"
    )
    write_report(run)


def save_checkpoint(layout: RunLayout, server_round: int, arrays: ArrayRecord, state: dict[str, Any]) -> None:
    """Keep the model adopted after ``server_round`` (parameters, or the ciphertext) for ``--resume``.

    The arrays are written first and replaced atomically, then the JSON that names their digest: a
    crash between the two leaves the previous round's pair, which the digest check tells apart.
    """
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    tmp = layout.checkpoint_arrays.with_name(".checkpoint.npz.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays_to_numpy(arrays))
        fh.flush()
        os.fsync(fh.fileno())
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, layout.checkpoint_arrays)
    meta = {"round": int(server_round), "arrays_sha256": digest, "state": state}
    tmp_meta = layout.checkpoint.with_name(".checkpoint.json.tmp")
    tmp_meta.write_text(json.dumps(meta, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_meta, layout.checkpoint)


def load_checkpoint(layout: RunLayout) -> tuple[int, ArrayRecord, dict[str, Any]] | None:
    """``(round, arrays, strategy state)`` of the run's last checkpoint, or None when it has none.

    Raises :class:`~secure_fedvlp.errors.DataError` when the checkpoint's arrays do not match its digest.
    """
    if not layout.checkpoint.exists():
        return None
    try:
        meta = json.loads(layout.checkpoint.read_text(encoding="utf-8"))
        rnd = int(meta["round"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{layout.checkpoint} is not a checkpoint record: {exc}.") from None
    data = layout.checkpoint_arrays.read_bytes() if layout.checkpoint_arrays.exists() else b""
    if hashlib.sha256(data).hexdigest() != meta.get("arrays_sha256"):
        raise DataError(
            f"{layout.checkpoint_arrays} does not match the digest in {layout.checkpoint}: the checkpoint of "
            f"round {rnd} is damaged; rerun with --force to start a new run."
        )
    with np.load(io.BytesIO(data)) as npz:
        arrays = numpy_to_arrays({k: npz[k] for k in npz.files})
    return rnd, arrays, dict(meta.get("state") or {})


def _read_encryption_stats(layout: RunLayout, before: int) -> list[dict[str, Any]]:
    """The encryption statistics of rounds before ``before`` (a resumed run keeps them)."""
    if not layout.encryption_rounds.exists():
        return []
    return [r for r in json.loads(layout.encryption_rounds.read_text(encoding="utf-8")) if int(r["round"]) < before]


def _write_encryption_stats(layout: RunLayout, stats) -> None:
    layout.encryption_rounds.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")


app = make_server_app()
