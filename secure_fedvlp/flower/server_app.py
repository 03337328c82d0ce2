"""The Flower ServerApp: runs the configured method's strategy and writes the run's report.

``app`` (module level) is the entry point for ``flwr run .``; the CLI builds its own with
:func:`make_server_app` and a closure over the config it parsed.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from secure_fedvlp.evaluation.report import RunRecorder, write_report
from secure_fedvlp.flower.runtime import ConfigProvider, build_model, config_from_run_config, expected_num_nodes
from secure_fedvlp.methods import get_method
from secure_fedvlp.methods.base import arrays_to_numpy, federated_state, numpy_to_arrays

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
        model = build_model(cfg)
        initial = numpy_to_arrays(federated_state(model))
        n_values = int(sum(v.size for v in arrays_to_numpy(initial).values()))
        recorder.progress(f"method={cfg.federation.method} rounds={cfg.federation.num_rounds} "
                          f"federated parameters={n_values:,}")
        strategy_cls = get_method(cfg.federation.method).strategy
        if cfg.encryption.enabled:
            from secure_fedvlp.flower.secagg import encrypted_strategy, load_server_secagg

            strategy = encrypted_strategy(strategy_cls)(cfg, recorder)
            strategy.setup_secagg(load_server_secagg(cfg, run_dir), arrays_to_numpy(initial))
            recorder.progress(f"CKKS encrypted aggregation on (context {strategy.secagg_ctx.fingerprint}, "
                              f"fixed point 2^-{strategy.secagg_bits})")
        else:
            strategy = strategy_cls(cfg, recorder)
        result = strategy.start(grid, initial, num_rounds=cfg.federation.num_rounds,
                                timeout=cfg.federation.round_timeout_s, expected_nodes=expected_num_nodes(cfg))
        final_record = result.arrays if result.arrays is not None else initial
        model_dir = run_dir / "model"
        model_dir.mkdir(exist_ok=True)
        if cfg.encryption.enabled:
            from secure_fedvlp.flower.secagg import is_encrypted, save_encrypted_model

            _write_secagg_stats(run_dir, strategy.secagg_stats)
            if is_encrypted(final_record):
                save_encrypted_model(final_record, model_dir, cfg)
                write_report(run_dir)
                return
        final = arrays_to_numpy(final_record)
        np.savez(model_dir / "federated_params.npz", **final)
        (model_dir / "README.txt").write_text(
            f"Federated parameters of model config {cfg.model.name!r} after {cfg.federation.num_rounds} rounds.\n"
            "Load with secure_fedvlp.flower.runtime.build_model(cfg) and "
            "secure_fedvlp.methods.base.load_federated_state(model, dict(np.load(path))).\n")
        write_report(run_dir)

    return server_app


def _write_secagg_stats(run_dir, stats) -> None:
    import json

    (run_dir / "secagg_rounds.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")


app = make_server_app()
