"""CKKS secure aggregation wired into Flower: a client mod and a strategy wrapper.

Protocol (DESIGN.md, "CKKS aggregation"; issue 5)
-------------------------------------------------
* **Keys** come from ``secure-fedvlp keys init`` (or, in a CLI simulation run without
  ``encryption.key_dir``, from the CLI acting as key authority before the apps start).  Every
  site loads ``client-<site>.key`` (secret key, mode 0600); the ServerApp loads ``server.ctx``,
  which :func:`~secure_fedvlp.secagg.load_server_context` refuses if it holds a secret key.
  Nothing but ciphertexts travels in messages: the context is distributed once per run as files.
* **Client mod** (:func:`make_secagg_mod`): an incoming message whose ``arrays`` record is an
  encrypted global model is decrypted before the handler runs; an outgoing train reply has its
  parameters flattened, multiplied by the aggregation weight (``secagg-weight`` from the server,
  else the reply's ``num-examples``), rounded to the fixed-point grid and encrypted.  The mod runs
  after the trainer (and its DP-SGD wrapper): clip and noise, then weight, then encrypt.
* **Strategy wrapper** (:func:`encrypted_strategy`): a subclass of any method's strategy whose
  ``configure_train`` adds each node's planned weight and whose aggregation sums ciphertexts
  (:func:`~secure_fedvlp.secagg.aggregate_encrypted`), dropping each malformed contribution with
  its reason.  The new global model is that encrypted weighted sum with its clear total weight: the
  server keeps it encrypted and sends it as is; clients divide by the total weight after
  decrypting.  The round-1 model is the seeded initialisation, which depends on no data.
* **Full parameters, not deltas**, are aggregated: the encrypted global is then self-contained (a
  site that missed a round, or a held-out site, can decrypt it without history), and dropouts only
  change the total weight.
* **Fixed-point exact decryption**: every weighted value is rounded to a multiple of ``2**-f``
  before encryption and every decrypted sum is rounded back, with ``f`` chosen so that the CKKS
  error stays below half a step except with probability < 2**-75 per slot
  (:func:`~secure_fedvlp.secagg.packing.fixed_point_bits_for`).  A decrypted model is thus an exact
  function of the plaintexts and carries no CKKS error for an IND-CPA-D attack to exploit; see
  :func:`export_model` for the release.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.errors import CiphertextError, ConfigError, KeyMaterialError
from secure_fedvlp.methods.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    VLPStrategy,
    arrays_to_numpy,
    numpy_to_arrays,
)
from secure_fedvlp.secagg import (
    AggregateCiphertext,
    add_plaintext_noise,
    EncryptedUpdate,
    SecAggContext,
    aggregate_encrypted,
    decrypt_aggregate,
    encrypt_update,
    flatten_update,
    load_client_context,
    load_server_context,
    preset,
    unflatten_update,
)
from secure_fedvlp.secagg.keys import SERVER_FILE
from secure_fedvlp.secagg.packing import UpdateLayout, fixed_point_bits_for, fixed_point_failure_bound

logger = logging.getLogger(__name__)

__all__ = [
    "CIPHERTEXT_KEY",
    "WEIGHT_KEY",
    "key_dir",
    "client_key_path",
    "fixed_point_bits",
    "is_encrypted",
    "ClientSecAgg",
    "make_secagg_mod",
    "SecAggStrategyMixin",
    "encrypted_strategy",
    "export_model",
    "ENCRYPTED_MODEL_FILE",
]

#: Key, inside an ``arrays`` ArrayRecord, of a serialised ciphertext (a uint8 array).
CIPHERTEXT_KEY = "secagg.ciphertext"
#: Config key of the aggregation weight the server assigns to a node.
WEIGHT_KEY = "secagg-weight"
#: Where the ServerApp keeps the final encrypted global model.
ENCRYPTED_MODEL_FILE = "global_model.ckks"


# ------------------------------------------------------------------------------------ settings
def key_dir(cfg: ExperimentConfig, run_dir: str | Path) -> Path:
    """The run's key directory: ``encryption.key_dir``, else ``<run_dir>/keys``."""
    return Path(cfg.encryption.key_dir) if cfg.encryption.key_dir else Path(run_dir) / "keys"


def client_key_path(cfg: ExperimentConfig, run_dir: str | Path, site: str) -> Path:
    """A site's key file (as ``keys init`` names it)."""
    return key_dir(cfg, run_dir) / f"client-{site}.key"


def max_contributions(cfg: ExperimentConfig) -> int:
    """Most contributions one aggregate may hold: the configured training sites (at least 2)."""
    from secure_fedvlp.flower.runtime import expected_num_nodes

    return max(2, expected_num_nodes(cfg))


def fixed_point_bits(cfg: ExperimentConfig) -> int:
    """Fractional bits of the run's fixed-point grid (public: part of the codec every party checks)."""
    return fixed_point_bits_for(preset(cfg.encryption.preset), max_contributions(cfg))


def _threads(cfg: ExperimentConfig) -> int:
    return cfg.encryption.n_threads or max(1, cfg.run.threads_per_client)


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether an ``arrays`` record carries a ciphertext instead of parameters."""
    return CIPHERTEXT_KEY in record


def _blob_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({CIPHERTEXT_KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())})


def _record_blob(record: ArrayRecord) -> bytes:
    arr = record[CIPHERTEXT_KEY].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CiphertextError(f"'{CIPHERTEXT_KEY}' must be a 1-D uint8 array; found {arr.dtype} {arr.shape}.")
    return arr.tobytes()


def _canonical(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 arrays with 0-d scalars as shape (1,), as Flower's ``Array`` carries them."""
    return {k: np.atleast_1d(np.asarray(v, dtype=np.float32)) for k, v in state.items()}


def _layout_of(state: Mapping[str, np.ndarray]) -> UpdateLayout:
    return flatten_update(_canonical(state))[1]


# ------------------------------------------------------------------------------------ client side
@dataclass
class ClientSecAgg:
    """One site's encryption state: its key-holding context, the model layout and the grid."""

    ctx: SecAggContext
    layout: UpdateLayout
    fixed_point_bits: int
    site: str
    max_clients: int

    @classmethod
    def load(cls, cfg: ExperimentConfig, run_dir: str | Path, site: str,
             reference_state: Mapping[str, np.ndarray]) -> "ClientSecAgg":
        path = client_key_path(cfg, run_dir, site)
        if not path.exists():
            raise KeyMaterialError(
                f"encryption is on but site {site!r} has no key file at {path}; create the run's keys with "
                f"`secure-fedvlp keys init --out {key_dir(cfg, run_dir)} --clients <every site>` "
                "(or leave encryption.key_dir empty in a `secure-fedvlp run` simulation).")
        ctx = load_client_context(path, n_threads=_threads(cfg))
        expected = preset(cfg.encryption.preset)
        if (ctx.params.poly_modulus_degree, tuple(ctx.params.coeff_mod_bit_sizes), ctx.params.global_scale_bits) != (
                expected.poly_modulus_degree, tuple(expected.coeff_mod_bit_sizes), expected.global_scale_bits):
            raise KeyMaterialError(f"{path} was made for other CKKS parameters than encryption.preset = "
                                   f"{cfg.encryption.preset!r}.")
        return cls(ctx, _layout_of(reference_state), fixed_point_bits(cfg), site, max_contributions(cfg))

    def decrypt_global(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """Decrypt an encrypted global model (exact, by the fixed-point rounding) into named arrays."""
        agg = AggregateCiphertext.from_bytes(_record_blob(record), self.ctx)
        if agg.layout_hash != self.layout.layout_hash():
            raise CiphertextError(f"the encrypted global model has layout {agg.layout_hash!r}; this site's model "
                                  f"has {self.layout.layout_hash()!r}.")
        flat = decrypt_aggregate(self.ctx, agg, fixed_point_bits=self.fixed_point_bits)
        state = unflatten_update(flat, self.layout)
        return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}

    def encrypt_update(self, state: Mapping[str, np.ndarray], weight: float, server_round: int,
                       stage: str) -> ArrayRecord:
        """Weight, round to the grid and encrypt this site's new parameters."""
        canon = _canonical(state)
        try:
            ordered = {e.name: canon[e.name] for e in self.layout.entries}
        except KeyError as exc:
            raise ValueError(f"the trained parameters lack {exc.args[0]!r} of the federated model.") from None
        vec, layout = flatten_update(ordered)
        if len(canon) != len(ordered) or layout.layout_hash() != self.layout.layout_hash():
            raise ValueError("the trained parameters do not have the federated model's layout.")
        upd = encrypt_update(self.ctx, vec, float(weight), int(server_round), client_id=self.site, stage=stage,
                             layout_hash=layout.layout_hash(), fixed_point_bits=self.fixed_point_bits,
                             max_clients=self.max_clients)
        return _blob_record(upd.to_bytes())


def anchor_layout_hash(dim: int) -> str:
    """Layout hash of an anchor contribution of ``dim`` values (both sides compute it)."""
    from secure_fedvlp.privacy.anchors import SUM_KEY

    return flatten_update({SUM_KEY: np.zeros(int(dim))})[1].layout_hash()


def _encrypt_anchors(sa: "ClientSecAgg", record: ArrayRecord, server_round: int) -> ArrayRecord:
    from secure_fedvlp.privacy.anchors import SUM_KEY

    vec = np.asarray(record[SUM_KEY].numpy(), dtype=np.float64).reshape(-1)
    upd = encrypt_update(sa.ctx, vec, 1.0, int(server_round), client_id=sa.site, stage="anchors",
                         layout_hash=anchor_layout_hash(vec.size), fixed_point_bits=sa.fixed_point_bits,
                         max_clients=sa.max_clients)
    return _blob_record(upd.to_bytes())


def _decrypt_anchors(sa: "ClientSecAgg", record: ArrayRecord) -> ArrayRecord:
    """The noised anchor bank (a sum: decrypted with total weight 1), exact on the fixed-point grid."""
    from secure_fedvlp.privacy.anchors import SUM_KEY

    agg = AggregateCiphertext.from_bytes(_record_blob(record), sa.ctx)
    if agg.stage != "anchors" or agg.layout_hash != anchor_layout_hash(agg.num_values):
        raise CiphertextError(f"the encrypted anchor bank has stage {agg.stage!r} and layout {agg.layout_hash!r}; "
                              "it is not an anchor bank.")
    vec = decrypt_aggregate(sa.ctx, agg, total_weight=1.0, fixed_point_bits=sa.fixed_point_bits)
    return ArrayRecord({SUM_KEY: Array(np.asarray(vec, dtype=np.float64))})


def make_secagg_mod(runtime: Callable[[Context], Any]) -> Callable[[Message, Context, Callable], Message]:
    """A Flower client mod that decrypts incoming global models and encrypts train replies.

    ``runtime(context)`` returns the node's :class:`~secure_fedvlp.flower.client_app.ClientRuntime`;
    its ``secagg`` attribute is ``None`` when encryption is off, and the mod then passes messages
    through untouched.
    """

    def secagg_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        rt = runtime(context)
        sa: ClientSecAgg | None = getattr(rt, "secagg", None)
        if sa is None or msg.has_error():
            return call_next(msg, context)
        original = msg.content
        content = original
        from secure_fedvlp.privacy.anchors import ANCHORS_KEY

        if ARRAYS_KEY in original.array_records and is_encrypted(original[ARRAYS_KEY]):
            content = RecordDict(dict(original.items()))  # a copy: the sender's object stays as sent
            content[ARRAYS_KEY] = numpy_to_arrays(sa.decrypt_global(original[ARRAYS_KEY]))
        if ANCHORS_KEY in original.array_records and is_encrypted(original[ANCHORS_KEY]):
            content = RecordDict(dict(content.items())) if content is original else content
            content[ANCHORS_KEY] = _decrypt_anchors(sa, original[ANCHORS_KEY])
        msg.content = content
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = original
        if (msg.metadata.message_type == MessageType.TRAIN and not reply.has_error()
                and ARRAYS_KEY in reply.content.array_records):
            cfg = original[CONFIG_KEY]
            metrics = reply.content[METRICS_KEY]
            weight = float(cfg[WEIGHT_KEY]) if WEIGHT_KEY in cfg else float(metrics[NUM_EXAMPLES])
            state = arrays_to_numpy(reply.content[ARRAYS_KEY])
            reply.content[ARRAYS_KEY] = sa.encrypt_update(state, weight, int(cfg["server-round"]),
                                                          str(cfg.get("stage", "full")))
            metrics[WEIGHT_KEY] = weight
        if (msg.metadata.message_type == MessageType.QUERY and not reply.has_error()
                and ANCHORS_KEY in reply.content.array_records):
            reply.content[ANCHORS_KEY] = _encrypt_anchors(sa, reply.content[ANCHORS_KEY],
                                                          int(original[CONFIG_KEY]["server-round"]))
        return reply

    return secagg_mod


# ------------------------------------------------------------------------------------ server side
class SecAggStrategyMixin:
    """Turns a :class:`~secure_fedvlp.methods.base.VLPStrategy` into its encrypted version.

    Use :func:`encrypted_strategy`; call :meth:`setup_secagg` before ``start``.  Everything the
    method decides (sampling, stages, DRO weights, evaluation) is unchanged; what changes is
    how updates are combined: by adding ciphertexts, with weights fixed before training.
    """

    secagg_ctx: SecAggContext
    secagg_layout: UpdateLayout
    secagg_bits: int
    secagg_planned: dict[tuple[int, str, str], float]

    def setup_secagg(self, server_ctx: SecAggContext, reference_state: Mapping[str, np.ndarray]) -> None:
        """Attach the server's key-less context and the federated model's layout."""
        if server_ctx.can_decrypt:
            raise KeyMaterialError("the server was given a context that can decrypt; it must only hold server.ctx.")
        self.secagg_ctx = server_ctx
        self.secagg_layout = _layout_of(reference_state)
        self.secagg_bits = fixed_point_bits(self.cfg)
        self.secagg_planned = {}
        self.secagg_stats: list[dict[str, Any]] = []
        logger.info("CKKS aggregation on: context %s, %d values, fixed point 2^-%d.", server_ctx.fingerprint,
                    self.secagg_layout.num_values, self.secagg_bits)

    # -- weights fixed before training ----------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        messages = []
        for msg in super().configure_train(server_round, arrays, config, grid):  # type: ignore[misc]
            site = self.sites[msg.metadata.dst_node_id].site  # type: ignore[attr-defined]
            stage = str(msg.content[CONFIG_KEY].get("stage", "full"))
            node_cfg = ConfigRecord(dict(msg.content[CONFIG_KEY]))
            w = self.planned_weight(site, stage)
            if w is not None:
                if not (math.isfinite(w) and w > 0):
                    raise ValueError(f"planned weight of site {site!r} is {w!r}; it must be a positive number.")
                node_cfg[WEIGHT_KEY] = float(w)
                self.secagg_planned[(server_round, stage, site)] = float(w)
            content = RecordDict(dict(msg.content.items()))
            content[CONFIG_KEY] = node_cfg
            messages.append(Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.TRAIN))
        return messages

    # -- screening and combining ----------------------------------------------------------
    def reference_state(self, reference: ArrayRecord | None) -> Mapping[str, np.ndarray] | None:
        return None  # the global model is (usually) a ciphertext; replies are checked by their headers

    def validate_reply(self, msg: Message, reference: Mapping[str, np.ndarray] | None) -> str | None:
        content = msg.content
        if METRICS_KEY not in content.metric_records or NUM_EXAMPLES not in content[METRICS_KEY]:
            return f"reply carries no '{METRICS_KEY}.{NUM_EXAMPLES}'"
        weight = float(content[METRICS_KEY][NUM_EXAMPLES])
        if not (weight > 0 and math.isfinite(weight)):
            return f"weight {NUM_EXAMPLES}={weight!r} is not a positive finite number"
        if ARRAYS_KEY not in content.array_records:
            return "reply carries no 'arrays' record"
        if not is_encrypted(content[ARRAYS_KEY]):
            return ("reply carries plaintext parameters although encryption is on; refused unread "
                    "(is the site's client app running without the secagg mod?)")
        if len(content[ARRAYS_KEY]) != 1:
            return "encrypted reply carries other arrays beside the ciphertext"
        return None

    def _parse_contributions(self, accepted: list[Message], key: str, expected_weight: Callable[[Message, str], float],
                             why: str) -> tuple[dict[str, EncryptedUpdate], dict[str, str]]:
        """Parse each reply's ciphertext under ``key``; reject unparsable ones and unexpected weights."""
        updates: dict[str, EncryptedUpdate] = {}
        rejected: dict[str, str] = {}
        for msg in accepted:
            site = self.site_name(msg)  # type: ignore[attr-defined]
            try:
                upd = EncryptedUpdate.from_bytes(_record_blob(msg.content[key]))
            except CiphertextError as exc:
                rejected[site] = str(exc)
                continue
            want = expected_weight(msg, site)
            if upd.weight is None or not math.isclose(upd.weight, want, rel_tol=1e-9):
                rejected[site] = f"encrypted weight {upd.weight!r} differs from the weight {want!r} ({why})"
                continue
            updates[site] = upd
        return updates, rejected

    def combine_updates(self, server_round: int, stage: str,
                        accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
        def expected(msg: Message, site: str) -> float:
            planned = self.secagg_planned.get((server_round, stage, site))
            return float(msg.content[METRICS_KEY][NUM_EXAMPLES]) if planned is None else planned

        updates, rejected = self._parse_contributions(accepted, ARRAYS_KEY, expected, "the server expects")
        result = aggregate_encrypted(self.secagg_ctx, updates, round_id=server_round,
                                     num_values=self.secagg_layout.num_values, stage=stage,
                                     layout_hash=self.secagg_layout.layout_hash(), fixed_point_bits=self.secagg_bits)
        rejected.update(result.rejected)
        need = int(self.cfg.encryption.min_contributors)  # type: ignore[attr-defined]
        if result.aggregate is not None and len(result.accepted) < need:
            # Every site would decrypt this "aggregate": with too few contributors it is (nearly) one
            # site's own update.  It is discarded unread and the global model is kept.
            reason = (f"only {len(result.accepted)} valid contribution(s), fewer than encryption.min_contributors = "
                      f"{need}; the aggregate was discarded and the global model kept")
            logger.warning("Round %d (%s): %s.", server_round, stage, reason)
            rejected.update({s: reason for s in result.accepted})
            result = type(result)(aggregate=None, accepted=[], rejected=result.rejected)
        self.secagg_stats.append({"round": server_round, "stage": stage, "accepted": list(result.accepted),
                                  "rejected": dict(rejected),
                                  "bytes_per_update": {s: int(u.nbytes) for s, u in updates.items()}})
        if result.aggregate is None:
            return None, None, rejected
        agg = result.aggregate
        kept = [m for m in accepted if self.site_name(m) in set(result.accepted)]  # type: ignore[attr-defined]
        loss = [float(m.content[METRICS_KEY].get("train_loss", float("nan"))) for m in kept]
        metrics = {NUM_EXAMPLES: float(sum(float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in kept)),
                   "clients": float(len(kept)), "total_weight": float(agg.total_weight or 0.0)}
        if loss and all(math.isfinite(x) for x in loss):
            metrics["train_loss"] = float(np.mean(loss))
        return _blob_record(agg.to_bytes()), MetricRecord(metrics), rejected


    # -- anchors (issue 6): summed as ciphertexts, noised in the ciphertext domain ---------------
    def anchor_mode(self) -> str:
        if self.cfg.anchors.noise == "distributed":  # type: ignore[attr-defined]
            return "distributed noise shares added by the sites, summed under CKKS"
        return "server noise added in the ciphertext domain (the server never sees an anchor)"

    def validate_anchor_reply(self, msg: Message, server_round: int) -> str | None:
        from secure_fedvlp.privacy.anchors import ANCHORS_KEY

        if ANCHORS_KEY not in msg.content.array_records:
            return f"reply carries no '{ANCHORS_KEY}' record"
        if not is_encrypted(msg.content[ANCHORS_KEY]) or len(msg.content[ANCHORS_KEY]) != 1:
            return "anchor contribution is not a single ciphertext although encryption is on; refused unread"
        return None

    def combine_anchors(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, dict[str, str]]:
        from secure_fedvlp.privacy.anchors import ANCHORS_KEY, server_noise

        updates, rejected = self._parse_contributions(accepted, ANCHORS_KEY, lambda msg, site: 1.0,
                                                      "anchors are plain sums")
        dim = self.anchor_dim  # type: ignore[attr-defined]
        result = aggregate_encrypted(self.secagg_ctx, updates, round_id=server_round, num_values=dim,
                                     stage="anchors", layout_hash=anchor_layout_hash(dim),
                                     fixed_point_bits=self.secagg_bits)
        rejected.update(result.rejected)
        agg = result.aggregate
        if agg is None or len(result.accepted) < self.cfg.anchors.min_contributors:  # type: ignore[attr-defined]
            return None, rejected
        if self.cfg.anchors.noise == "server":  # type: ignore[attr-defined]
            # ciphertext + plaintext noise: the server never sees the anchors, noised or not
            agg = add_plaintext_noise(agg, server_noise(self.cfg, dim, self.anchor_rng))  # type: ignore[attr-defined]
        self.anchor_contributors = list(result.accepted)
        return _blob_record(agg.to_bytes()), rejected


def encrypted_strategy(strategy_cls: type[VLPStrategy]) -> type[VLPStrategy]:
    """The encrypted version of a method's strategy class (same constructor)."""
    return type(f"Encrypted{strategy_cls.__name__}", (SecAggStrategyMixin, strategy_cls), {
        "__doc__": f"{strategy_cls.__name__} with CKKS-encrypted aggregation ({__name__})."})


def load_server_secagg(cfg: ExperimentConfig, run_dir: str | Path) -> SecAggContext:
    """Load the server's context; a clear error if the run has no keys."""
    path = key_dir(cfg, run_dir) / SERVER_FILE
    if not path.exists():
        raise KeyMaterialError(f"encryption is on but there is no server context at {path}; create the run's keys "
                               "with `secure-fedvlp keys init` first.")
    return load_server_context(path, n_threads=_threads(cfg))


def save_encrypted_model(record: ArrayRecord, model_dir: Path, cfg: ExperimentConfig) -> Path:
    """Write the final encrypted global model (the server cannot decrypt it)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / ENCRYPTED_MODEL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(_record_blob(record))
    tmp.replace(path)
    (model_dir / "README.txt").write_text(
        f"Encrypted federated parameters of model config {cfg.model.name!r} ({ENCRYPTED_MODEL_FILE}): the CKKS "
        "weighted sum of the last round, which the server cannot decrypt.\nA key holder releases it with "
        "`secure-fedvlp export RUN_DIR --key KEYFILE` (decrypted exactly by the fixed-point encoding).\n")
    return path


def export_model(run_dir: str | Path, key_file: str | Path, *, out: str | Path | None = None,
                 flooding_bits: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """A key holder decrypts the final encrypted model for release; returns what it wrote.

    The aggregate was encoded on the fixed-point grid, so the decryption is rounded to an exact
    function of the plaintexts: the release contains no CKKS error term, the target of IND-CPA-D
    attacks, and no flooding noise is needed for it.  The probability that any slot decodes
    wrongly is reported.  For an aggregate without a fixed-point codec (none is made by this
    package's Flower path) Gaussian noise flooding with ``flooding_bits`` of statistical security is
    added instead (:func:`~secure_fedvlp.secagg.flooding_sigma`), and its sigma is reported.

    Writes ``<run_dir>/model/federated_params.npz`` (or ``out``) and ``<run_dir>/model/export.json``.
    """
    from secure_fedvlp.config import load_config
    from secure_fedvlp.secagg import exact_error_bound, flooding_sigma, noise_flood_for_export
    from secure_fedvlp.secagg.aggregate import _fixed_point_bits

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    blob_path = run_dir / "model" / ENCRYPTED_MODEL_FILE
    if not blob_path.exists():
        raise FileNotFoundError(f"{blob_path} does not exist: was this run encrypted, and did it finish a round?")
    ctx = load_client_context(key_file, n_threads=_threads(cfg))
    agg = AggregateCiphertext.from_bytes(blob_path.read_bytes(), ctx)
    from secure_fedvlp.flower.runtime import build_model
    from secure_fedvlp.methods.base import federated_state

    layout = _layout_of(federated_state(build_model(cfg)))
    if agg.layout_hash != layout.layout_hash():
        raise CiphertextError(f"{blob_path}: layout {agg.layout_hash!r} does not match model {cfg.model.name!r}.")
    bits = _fixed_point_bits(agg.codec)
    flat = decrypt_aggregate(ctx, agg, fixed_point_bits=bits)
    info: dict[str, Any] = {"source": str(blob_path), "codec": agg.codec, "contributors": list(agg.contributors),
                            "round": agg.round_id, "num_values": agg.num_values,
                            "total_weight": agg.total_weight, "context_fingerprint": agg.fingerprint}
    if bits is not None:
        p_slot = fixed_point_failure_bound(ctx.params, len(agg.contributors), bits)
        info.update({"decryption": "exact (fixed-point)", "fixed_point_bits": bits,
                     "slot_failure_probability_bound": p_slot,
                     "model_failure_probability_bound": min(1.0, p_slot * agg.num_values),
                     "flooding_sigma": 0.0,
                     "flooding_reason": "the decrypted values are rounded to the 2^-f grid they were encoded on, "
                                        "so they are an exact function of the plaintexts and reveal no CKKS error"})
    else:
        kappa = int(flooding_bits or cfg.encryption.export_flooding_bits)
        err = math.sqrt(agg.num_values) * exact_error_bound(ctx.params, len(agg.contributors),
                                                            float(agg.total_weight or 1.0))
        sigma = flooding_sigma(err, kappa)
        gen = np.random.default_rng(seed)
        flat = noise_flood_for_export(flat, sigma, gen)
        info.update({"decryption": "approximate, noise-flooded", "flooding_bits": kappa, "error_l2_bound": err,
                     "flooding_sigma": sigma})
    state = {k: np.asarray(v, dtype=np.float32) for k, v in unflatten_update(flat, layout).items()}
    out_path = Path(out) if out else run_dir / "model" / "federated_params.npz"
    np.savez(out_path, **state)
    info["output"] = str(out_path)
    (run_dir / "model" / "export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("exported the decrypted model to %s (%s)", out_path, info["decryption"])
    return info


def check_encryption_supported(cfg: ExperimentConfig) -> None:
    """Configuration problems of an encrypted run, raised before anything starts."""
    if not cfg.encryption.enabled:
        return
    try:
        fixed_point_bits(cfg)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"encryption: {exc}") from exc
    sites = cfg.data.synthetic.num_sites if cfg.data.source == "synthetic" else cfg.federation.min_train_clients
    if sites < cfg.encryption.min_contributors:
        raise ConfigError(f"encryption.min_contributors = {cfg.encryption.min_contributors} but the run has only "
                          f"{sites} training site(s): no encrypted aggregate could ever be adopted.")
