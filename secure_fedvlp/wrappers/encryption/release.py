"""Releasing an encrypted run's model: the server saves the ciphertext, a key holder exports it.

Also the configuration checks an encrypted run must pass before anything starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.encryption import (
    AggregateCiphertext,
    check_and_decrypt,
    decrypt_aggregate,
    load_client_context,
    load_signing_public_keys,
    unflatten_update,
)
from secure_fedvlp.encryption.envelope import decode_chain, is_chain
from secure_fedvlp.encryption.packing import fixed_point_failure_bound
from secure_fedvlp.errors import CiphertextError, ConfigError, DataError
from secure_fedvlp.layout import RunLayout, load_run
from secure_fedvlp.wrappers.encryption.records import CHAIN_KEY, blob_record, canonical_state, layout_of, record_blob
from secure_fedvlp.wrappers.encryption.settings import (
    contribution_grid,
    encryption_settings,
)

logger = logging.getLogger(__name__)

__all__ = ["check_encryption_supported", "export_model", "save_encrypted_model"]


def save_encrypted_model(record: ArrayRecord, layout: RunLayout, cfg: ExperimentConfig) -> Path:
    """Write the final encrypted global model (the server cannot decrypt it) and its README."""
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    path = layout.encrypted_model
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(record_blob(record))
    tmp.replace(path)
    layout.model_readme.write_text(
        f"Encrypted federated parameters of model config {cfg.model.name!r} ({path.name}): the CKKS "
        "weighted sum of the last round, which the server cannot decrypt.\nA key holder releases it with "
        "`secure-fedvlp export RUN_DIR --key KEYFILE` (decrypted exactly by the fixed-point encoding).\n"
    )
    return path


def export_model(
    run_dir: str | os.PathLike,
    key_file: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    flooding_bits: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """A key holder decrypts the final encrypted model for release; returns what it wrote.

    The aggregate was encoded on the fixed-point grid, so the decryption is rounded to an exact
    function of the plaintexts: the release contains no CKKS error term, the target of IND-CPA-D
    attacks, and no flooding noise is needed for it.  The probability that any slot decodes
    wrongly is reported.  An aggregate of signed contributions is checked as a site checks it
    (:func:`~secure_fedvlp.encryption.check_and_decrypt`) and refused if it fails.  For an
    aggregate without a fixed-point codec (none is made by this package's Flower path) Gaussian
    noise flooding with ``flooding_bits`` of statistical security is added instead
    (:func:`~secure_fedvlp.encryption.flooding_sigma`), and its sigma is reported.

    Writes the plaintext model to ``out`` (default :attr:`~secure_fedvlp.layout.RunLayout.model_params`),
    mode 0600, and what was released (no parameter values) to
    :attr:`~secure_fedvlp.layout.RunLayout.export_info`.  A missing encrypted model or output directory
    is refused before anything is decrypted.
    """
    from secure_fedvlp.encryption import (
        exact_error_bound,
        flooding_sigma,
        noise_flood_for_export,
    )
    from secure_fedvlp.encryption.aggregate import _fixed_point_bits
    from secure_fedvlp.methods.registry import method_model
    from secure_fedvlp.models.state import federated_state

    run = load_run(run_dir)
    cfg, layout = run.cfg, run.layout
    blob_path = layout.encrypted_model
    if not blob_path.exists():
        raise DataError(
            f"{blob_path} does not exist: {layout.root} holds no encrypted final model (was the run encrypted, "
            "and did it finish?)."
        )
    out_path = Path(out) if out else layout.model_params
    if not out_path.parent.is_dir():  # checked before anything is decrypted
        raise DataError(f"--out {out_path}: the directory {out_path.parent} does not exist.")
    if out_path.is_dir():
        raise DataError(f"--out {out_path} is a directory; name the file to write (e.g. {out_path / 'model.npz'}).")
    settings = encryption_settings(cfg, layout.root)
    ctx = load_client_context(key_file, n_threads=settings.n_threads)
    if is_chain(blob_path.read_bytes()):
        return _export_delta_model(cfg, layout, settings, ctx, blob_path, out)
    agg = AggregateCiphertext.from_bytes(blob_path.read_bytes(), ctx)
    model_layout = layout_of(federated_state(method_model(cfg)))
    if agg.layout_hash != model_layout.layout_hash():
        raise CiphertextError(f"{blob_path}: layout {agg.layout_hash!r} does not match model {cfg.model.name!r}.")
    bits = _fixed_point_bits(agg.codec)
    if agg.codec.endswith("/ws"):  # signed contributions: the release passes every check a site makes
        keys = load_signing_public_keys(settings.manifest, ctx.fingerprint)
        flat = check_and_decrypt(
            ctx, agg, keys, min_contributors=settings.min_contributors, fixed_point_bits=bits, value_bound=settings.clip
        )
    else:
        flat = decrypt_aggregate(ctx, agg, fixed_point_bits=bits)
    info: dict[str, Any] = {
        "source": str(blob_path),
        "codec": agg.codec,
        "contributors": list(agg.contributors),
        "round": agg.round_id,
        "num_values": agg.num_values,
        "total_weight": agg.total_weight,
        "context_fingerprint": agg.fingerprint,
    }
    if bits is not None:
        p_slot = fixed_point_failure_bound(ctx.params, len(agg.contributors), bits)
        info.update(
            {
                "decryption": "exact (fixed-point)",
                "fixed_point_bits": bits,
                "slot_failure_probability_bound": p_slot,
                "model_failure_probability_bound": min(1.0, p_slot * agg.num_values),
                "flooding_sigma": 0.0,
                "flooding_reason": "the decrypted values are rounded to the 2^-f grid they were encoded on, "
                "so they are an exact function of the plaintexts and reveal no CKKS error",
            }
        )
    else:
        kappa = int(flooding_bits or cfg.encryption.export_flooding_bits)
        err = math.sqrt(agg.num_values) * exact_error_bound(
            ctx.params, len(agg.contributors), float(agg.total_weight or 1.0)
        )
        sigma = flooding_sigma(err, kappa)
        gen = np.random.default_rng(seed)
        flat = noise_flood_for_export(flat, sigma, gen)
        info.update(
            {
                "decryption": "approximate, noise-flooded",
                "flooding_bits": kappa,
                "error_l2_bound": err,
                "flooding_sigma": sigma,
            }
        )
    state = {k: np.asarray(v, dtype=np.float32) for k, v in unflatten_update(flat, model_layout).items()}
    _save_private_npz(out_path, state)
    info["output"] = str(out_path)
    layout.export_info.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("exported the decrypted model to %s (%s)", out_path, info["decryption"])
    return info


def _export_delta_model(cfg, layout, settings, ctx, blob_path: Path, out) -> dict[str, Any]:  # noqa: ANN001
    """Release of a delta-protocol run: the seeded initial model plus every adopted aggregate, each checked."""
    from secure_fedvlp.build import build_model
    from secure_fedvlp.encryption.packing import packed_failure_bound
    from secure_fedvlp.models.state import federated_state
    from secure_fedvlp.wrappers.encryption.client import ClientEncryption

    initial = federated_state(build_model(cfg))
    keys = load_signing_public_keys(settings.manifest, ctx.fingerprint)
    holder = ClientEncryption(ctx, layout_of(initial), ctx.site or "key holder", settings, keys)
    holder.remember(canonical_state(initial))
    holder.memory["version"] = 0
    blob = blob_path.read_bytes()
    _, aggregates = decode_chain(blob)
    state = holder.apply_chain(blob_record(blob, CHAIN_KEY))
    packing = settings.packing
    p_slot = packed_failure_bound(ctx.params, packing, settings.max_contributions) if packing else 1.0
    num_values = holder.layout.num_values
    info: dict[str, Any] = {
        "source": str(blob_path),
        "codec": "packed deltas"
        if packing is None
        else f"packed deltas ({packing.value_bits}-bit, bound {packing.bound})",
        "aggregates": len(aggregates),
        "refused_aggregates": holder.refused(),
        "num_values": num_values,
        "context_fingerprint": ctx.fingerprint,
        "decryption": "exact (packed integers)",
        "slot_failure_probability_bound": p_slot,
        "model_failure_probability_bound": min(1.0, p_slot * num_values * max(1, len(aggregates))),
        "flooding_sigma": 0.0,
        "flooding_reason": "each aggregate decodes to exact integers (the CKKS error is rounded away), so the "
        "released model is an exact function of the plaintexts and reveals no CKKS error",
    }
    out_path = Path(out) if out else layout.model_params
    _save_private_npz(out_path, {k: np.asarray(v, dtype=np.float32) for k, v in state.items()})
    info["output"] = str(out_path)
    layout.export_info.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("exported the decrypted model to %s (%s)", out_path, info["decryption"])
    return info


def _save_private_npz(path: Path, state: dict[str, np.ndarray]) -> None:
    """Write the decrypted model readable by its owner only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            np.savez(fh, **state)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_encryption_supported(cfg: ExperimentConfig) -> None:
    """Configuration problems of an encrypted run, raised before anything starts."""
    if not cfg.encryption.enabled:
        return
    contribution_grid(cfg)  # a ConfigError when the preset cannot hold the fixed-point grid
    settings = encryption_settings(cfg, ".")
    try:
        _ = settings.packing  # a ConfigError when no packing fits the contributor bound
    except ConfigError as exc:
        raise ConfigError(f"encryption.codec = 'packed_delta': {exc}") from exc
    sites = cfg.data.synthetic.num_sites if cfg.data.source == "synthetic" else cfg.federation.min_train_clients
    if sites < cfg.encryption.min_contributors:
        raise ConfigError(
            f"encryption.min_contributors = {cfg.encryption.min_contributors} but the run has only "
            f"{sites} training site(s): no encrypted aggregate could ever be adopted."
        )
