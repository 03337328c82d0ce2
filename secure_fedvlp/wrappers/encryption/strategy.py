"""The server side of encrypted aggregation (CKKS): a wrapper around any method's strategy.

:func:`encrypted_strategy` subclasses a method's strategy so that ``configure_train`` adds each
node's planned weight and aggregation sums ciphertexts
(:func:`~secure_fedvlp.encryption.aggregate_encrypted`), dropping each malformed contribution with
its reason.  The new global model is that encrypted weighted sum with its clear total weight: the
server keeps it encrypted and sends it as is; clients divide by the total weight after decrypting.
Anchored strategies also get :class:`EncryptedAnchorsMixin`: anchor contributions summed as
ciphertexts, the server's noise added in the ciphertext domain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from secure_fedvlp.encryption import (
    EncryptedUpdate,
    EncryptionContext,
    add_plaintext_noise,
    aggregate_encrypted,
    load_server_context,
)
from secure_fedvlp.encryption.packing import UpdateLayout
from secure_fedvlp.errors import CiphertextError, KeyMaterialError
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES
from secure_fedvlp.wrappers.encryption.records import (
    WEIGHT_KEY,
    anchor_layout_hash,
    blob_record,
    is_encrypted,
    layout_of,
    record_blob,
)
from secure_fedvlp.wrappers.encryption.settings import EncryptionSettings

logger = logging.getLogger(__name__)

__all__ = ["EncryptedAnchorsMixin", "EncryptionStrategyMixin", "encrypted_strategy", "load_server_encryption"]


class EncryptionStrategyMixin:
    """Turns a :class:`~secure_fedvlp.methods.strategy.VLPStrategy` into its encrypted version.

    Use :func:`encrypted_strategy`; call :meth:`setup_encryption` before ``start``.  Everything the
    method decides (sampling, stages, DRO weights, evaluation) is unchanged; what changes is
    how updates are combined: by adding ciphertexts, with weights fixed before training.
    """

    encryption_settings: EncryptionSettings
    encryption_ctx: EncryptionContext
    encryption_layout: UpdateLayout
    encryption_bits: int
    encryption_planned: dict[tuple[int, str, str], float]

    def setup_encryption(
        self, settings: EncryptionSettings, server_ctx: EncryptionContext, reference_state: Mapping[str, np.ndarray]
    ) -> None:
        """Attach the run's settings, the server's key-less context and the federated model's layout."""
        if server_ctx.can_decrypt:
            raise KeyMaterialError("the server was given a context that can decrypt; it must only hold server.ctx.")
        self.encryption_settings = settings
        self.encryption_ctx = server_ctx
        self.encryption_layout = layout_of(reference_state)
        self.encryption_bits = settings.fixed_point_bits
        self.encryption_planned = {}
        self.encryption_stats: list[dict[str, Any]] = []
        logger.info(
            "CKKS aggregation on: context %s, %d values, fixed point 2^-%d.",
            server_ctx.fingerprint,
            self.encryption_layout.num_values,
            self.encryption_bits,
        )

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
                self.encryption_planned[(server_round, stage, site)] = float(w)
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
            return (
                "reply carries plaintext parameters although encryption is on; refused unread "
                "(is the site's client app running without the encryption mod?)"
            )
        if len(content[ARRAYS_KEY]) != 1:
            return "encrypted reply carries other arrays beside the ciphertext"
        return None

    def _parse_contributions(
        self, accepted: list[Message], key: str, expected_weight: Callable[[Message, str], float], why: str
    ) -> tuple[dict[str, EncryptedUpdate], dict[str, str]]:
        """Parse each reply's ciphertext under ``key``; reject unparsable ones and unexpected weights."""
        updates: dict[str, EncryptedUpdate] = {}
        rejected: dict[str, str] = {}
        for msg in accepted:
            site = self.site_name(msg)  # type: ignore[attr-defined]
            try:
                upd = EncryptedUpdate.from_bytes(record_blob(msg.content[key]))
            except CiphertextError as exc:
                rejected[site] = str(exc)
                continue
            want = expected_weight(msg, site)
            if upd.weight is None or not math.isclose(upd.weight, want, rel_tol=1e-9):
                rejected[site] = f"encrypted weight {upd.weight!r} differs from the weight {want!r} ({why})"
                continue
            updates[site] = upd
        return updates, rejected

    def combine_updates(
        self, server_round: int, stage: str, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None, dict[str, str]]:
        def expected(msg: Message, site: str) -> float:
            planned = self.encryption_planned.get((server_round, stage, site))
            return float(msg.content[METRICS_KEY][NUM_EXAMPLES]) if planned is None else planned

        updates, rejected = self._parse_contributions(accepted, ARRAYS_KEY, expected, "the server expects")
        result = aggregate_encrypted(
            self.encryption_ctx,
            updates,
            round_id=server_round,
            num_values=self.encryption_layout.num_values,
            stage=stage,
            layout_hash=self.encryption_layout.layout_hash(),
            fixed_point_bits=self.encryption_bits,
        )
        rejected.update(result.rejected)
        need = int(self.cfg.encryption.min_contributors)  # type: ignore[attr-defined]
        if result.aggregate is not None and len(result.accepted) < need:
            # Every site would decrypt this "aggregate": with too few contributors it is (nearly) one
            # site's own update.  It is discarded unread and the global model is kept.
            reason = (
                f"only {len(result.accepted)} valid contribution(s), fewer than encryption.min_contributors = "
                f"{need}; the aggregate was discarded and the global model kept"
            )
            logger.warning("Round %d (%s): %s.", server_round, stage, reason)
            rejected.update({s: reason for s in result.accepted})
            result = type(result)(aggregate=None, accepted=[], rejected=result.rejected)
        self.encryption_stats.append(
            {
                "round": server_round,
                "stage": stage,
                "accepted": list(result.accepted),
                "rejected": dict(rejected),
                "bytes_per_update": {s: int(u.nbytes) for s, u in updates.items()},
            }
        )
        if result.aggregate is None:
            return None, None, rejected
        agg = result.aggregate
        kept = [m for m in accepted if self.site_name(m) in set(result.accepted)]  # type: ignore[attr-defined]
        loss = [float(m.content[METRICS_KEY].get("train_loss", float("nan"))) for m in kept]
        metrics = {
            NUM_EXAMPLES: float(sum(float(m.content[METRICS_KEY][NUM_EXAMPLES]) for m in kept)),
            "clients": float(len(kept)),
            "total_weight": float(agg.total_weight or 0.0),
        }
        if loss and all(math.isfinite(x) for x in loss):
            metrics["train_loss"] = float(np.mean(loss))
        return blob_record(agg.to_bytes()), MetricRecord(metrics), rejected


class EncryptedAnchorsMixin:
    """Anchors of an encrypted run: contributions summed as ciphertexts, the noise added in the ciphertext domain.

    Overrides the combine/validate hooks of :class:`~secure_fedvlp.wrappers.anchors.AnchoredStrategyMixin`;
    :func:`encrypted_strategy` adds it only to anchored strategies.
    """

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

        updates, rejected = self._parse_contributions(
            accepted, ANCHORS_KEY, lambda msg, site: 1.0, "anchors are plain sums"
        )
        dim = self.anchor_dim  # type: ignore[attr-defined]
        result = aggregate_encrypted(
            self.encryption_ctx,
            updates,
            round_id=server_round,
            num_values=dim,
            stage="anchors",
            layout_hash=anchor_layout_hash(dim),
            fixed_point_bits=self.encryption_bits,
        )
        rejected.update(result.rejected)
        agg = result.aggregate
        if agg is None or len(result.accepted) < self.cfg.anchors.min_contributors:  # type: ignore[attr-defined]
            return None, rejected
        if self.cfg.anchors.noise == "server":  # type: ignore[attr-defined]
            # ciphertext + plaintext noise: the server never sees the anchors, noised or not
            agg = add_plaintext_noise(agg, server_noise(self.cfg, dim, self.anchor_rng))  # type: ignore[attr-defined]
        self.anchor_contributors = list(result.accepted)
        return blob_record(agg.to_bytes()), rejected


def encrypted_strategy(strategy_cls: type[VLPStrategy]) -> type[VLPStrategy]:
    """The encrypted version of a method's strategy class (same constructor); anchored ones get encrypted anchors."""
    from secure_fedvlp.wrappers.anchors import AnchoredStrategyMixin

    bases: tuple[type, ...] = (EncryptionStrategyMixin, strategy_cls)
    if issubclass(strategy_cls, AnchoredStrategyMixin):
        bases = (EncryptedAnchorsMixin, *bases)
    if getattr(strategy_cls, "reply_payload", "parameters") == "representations":
        from secure_fedvlp.wrappers.encryption.ensemble import EncryptedEnsembleMixin

        bases = (EncryptedEnsembleMixin, *bases)
    return type(
        f"Encrypted{strategy_cls.__name__}",
        bases,
        {"__doc__": f"{strategy_cls.__name__} with CKKS-encrypted aggregation ({__name__})."},
    )


def load_server_encryption(settings: EncryptionSettings) -> EncryptionContext:
    """Load the server's key-less context; a clear error if the run has no keys."""
    path = settings.server_context
    if not path.exists():
        raise KeyMaterialError(
            f"encryption is on but there is no server context at {path}; create the run's keys "
            "with `secure-fedvlp keys init` first."
        )
    return load_server_context(path, n_threads=settings.n_threads)
