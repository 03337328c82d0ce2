"""The Flower ServerApp: runs the configured method's strategy and writes the run's report.

``app`` (module level) is the entry point for ``flwr run .``; the CLI builds its own with
:func:`make_server_app` and a closure over the config it parsed.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from secure_fedvlp.build import expected_num_nodes
from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.flower.runtime import ConfigProvider, config_from_run_config
from secure_fedvlp.layout import FinishedRun, RunLayout
from secure_fedvlp.models.state import federated_state
from secure_fedvlp.wire import arrays_to_numpy, numpy_to_arrays
from secure_fedvlp.wrappers.compose import method_model, strategy_class

logger = logging.getLogger(__name__)

__all__ = ["make_server_app", "app"]


def make_server_app(provider: ConfigProvider = config_from_run_config) -> ServerApp:
    """A ServerApp whose config comes from ``provider(context)``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        setup = provider(context)
        cfg, run_dir = setup.cfg, setup.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        recorder = RunRecorder(run_dir)
        run = FinishedRun(RunLayout(run_dir), cfg)  # the report reads this config, not a copy on disk
        model = method_model(cfg)
        initial = numpy_to_arrays(federated_state(model))
        n_values = int(sum(v.size for v in arrays_to_numpy(initial).values()))
        recorder.progress(
            f"method={cfg.federation.method} rounds={cfg.federation.num_rounds} federated parameters={n_values:,}"
        )
        strategy = strategy_class(cfg)(cfg, recorder)
        if cfg.encryption.enabled:
            from secure_fedvlp.wrappers.encryption import encryption_settings, load_server_encryption

            settings = encryption_settings(cfg, run_dir)
            strategy.setup_encryption(settings, load_server_encryption(settings), arrays_to_numpy(initial))
            recorder.progress(
                f"CKKS encrypted aggregation on (context {strategy.encryption_ctx.fingerprint}, "
                f"fixed point 2^-{strategy.encryption_bits})"
            )
        result = strategy.start(
            grid,
            initial,
            num_rounds=cfg.federation.num_rounds,
            timeout=cfg.federation.round_timeout_s,
            expected_nodes=expected_num_nodes(cfg),
        )
        final_record = result.arrays if result.arrays is not None else initial
        model_dir = run.layout.model_dir
        model_dir.mkdir(exist_ok=True)
        if cfg.encryption.enabled:
            from secure_fedvlp.wrappers.encryption import is_encrypted, save_encrypted_model

            _write_encryption_stats(run.layout, strategy.encryption_stats)
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

    return server_app


def _write_encryption_stats(layout: RunLayout, stats) -> None:
    import json

    layout.encryption_rounds.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")


app = make_server_app()
