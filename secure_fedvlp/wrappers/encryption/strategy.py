"""The server side of encrypted aggregation (CKKS): a wrapper around any method's strategy.

:func:`encrypted_strategy` subclasses a method's strategy so that ``configure_train`` adds each
node's planned weight and a fresh nonce, and aggregation verifies each contribution's signature
(by the key of the site the transport delivered it from, over the nonce issued to that node),
refuses a ciphertext already received in the run, and sums the ciphertexts
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
    ReplayGuard,
    add_plaintext_noise,
    aggregate_encrypted,
    load_server_context,
    load_signing_public_keys,
    new_nonce,
)
from secure_fedvlp.encryption.envelope import encode_chain
from secure_fedvlp.encryption.packing import UpdateLayout, quantize_weight
from secure_fedvlp.errors import CiphertextError, KeyMaterialError
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES
from secure_fedvlp.wrappers.encryption.records import (
    CHAIN_KEY,
    NONCE_KEY,
    WEIGHT_KEY,
    anchor_layout_hash,
    blob_record,
    is_chain_record,
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
        self.encryption_public_keys = load_signing_public_keys(settings.manifest, server_ctx.fingerprint)
        self.encryption_nonces: dict[tuple[int, str, str], str] = {}
        self.encryption_replay = ReplayGuard()
        self.encryption_packing = settings.packing
        self.encryption_chain: list[bytes] = []  # delta protocol: the adopted aggregates, oldest first
        self.encryption_synced: dict[str, int] = {}  # delta protocol: the version each site is known to hold
        logger.info(
            "CKKS aggregation on: context %s, %d values, fixed point 2^-%d.",
            server_ctx.fingerprint,
            self.encryption_layout.num_values,
            self.encryption_bits,
        )

    # -- weights fixed before training ----------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        messages = []
        base = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        weights = self._node_weights(base)
        for msg in base:
            site = self.sites[msg.metadata.dst_node_id].site  # type: ignore[attr-defined]
            stage = str(msg.content[CONFIG_KEY].get("stage", "full"))
            node_cfg = ConfigRecord(dict(msg.content[CONFIG_KEY]))
            w = weights[msg.metadata.dst_node_id]
            if w is not None:
                if not (math.isfinite(w) and w > 0):
                    raise ValueError(f"planned weight of site {site!r} is {w!r}; it must be a positive number.")
                node_cfg[WEIGHT_KEY] = float(w)
                self.encryption_planned[(server_round, stage, site)] = float(w)
            node_cfg[NONCE_KEY] = self.issue_nonce(server_round, stage, site)
            content = RecordDict(dict(msg.content.items()))
            content[CONFIG_KEY] = node_cfg
            messages.append(Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.TRAIN))
        return messages

    def _node_weights(self, messages: list[Message]) -> dict[int, float | None]:
        """Each node's planned weight; for packed deltas every node gets one, normalised to at most 1.

        Packed deltas need weights in ``(0, 1]`` (the packing's ``max_weight``): the method's planned
        weights, or the sites' training-set sizes from discovery, divided by their largest.  The
        weighted mean is unchanged; each weight is then rounded to the 2**-16 weight grid.
        """
        out: dict[int, float | None] = {}
        for msg in messages:
            site = self.sites[msg.metadata.dst_node_id].site  # type: ignore[attr-defined]
            stage = str(msg.content[CONFIG_KEY].get("stage", "full"))
            out[msg.metadata.dst_node_id] = self.planned_weight(site, stage)  # type: ignore[attr-defined]
        if self.encryption_packing is None:
            return out
        raw = {
            nid: float(w) if w is not None else float(max(1, self.sites[nid].num_train))  # type: ignore[attr-defined]
            for nid, w in out.items()
        }
        top = max(raw.values(), default=1.0)
        return {nid: quantize_weight(w / top, self.encryption_packing) for nid, w in raw.items()}

    def issue_nonce(self, server_round: int, stage: str, site: str) -> str:
        """A fresh nonce for ``site``'s contribution to ``(server_round, stage)``; the site signs over it."""
        nonce = new_nonce()
        self.encryption_nonces[(server_round, stage, site)] = nonce
        return nonce

    def round_nonces(self, server_round: int, stage: str) -> dict[str, str]:
        """``{site: nonce}`` issued for ``(server_round, stage)``."""
        return {s: n for (r, st, s), n in self.encryption_nonces.items() if r == server_round and st == stage}

    def aggregate_signed(
        self,
        server_round: int,
        stage: str,
        updates: Mapping[str, EncryptedUpdate],
        num_values: int,
        layout_hash: str,
        packing=None,
    ):
        """Verify (signature by the transport's site, nonce, no replay) and sum; see :func:`aggregate_encrypted`."""
        return aggregate_encrypted(
            self.encryption_ctx,
            updates,
            round_id=server_round,
            num_values=num_values,
            stage=stage,
            layout_hash=layout_hash,
            packing=packing,
            fixed_point_bits=None if packing is not None else self.encryption_bits,
            weight_slot=True,
            public_keys=self.encryption_public_keys,
            nonces=self.round_nonces(server_round, stage),
            replay=self.encryption_replay,
        )

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
        self,
        accepted: list[Message],
        key: str,
        expected_weight: Callable[[Message, str], float],
        why: str,
        packing=None,
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
            want = quantize_weight(expected_weight(msg, site), packing, None if packing else self.encryption_bits)
            if upd.weight is None or upd.weight != want:
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

        packing = self.encryption_packing
        updates, rejected = self._parse_contributions(accepted, ARRAYS_KEY, expected, "the server expects", packing)
        result = self.aggregate_signed(
            server_round,
            stage,
            updates,
            self.encryption_layout.num_values,
            self.encryption_layout.layout_hash(),
            packing,
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
        if packing is None:
            return blob_record(agg.to_bytes()), MetricRecord(metrics), rejected
        # Delta protocol: the new global model is the seeded initial model plus every adopted aggregate's mean
        # delta; the server keeps all of them and sends each site the ones it lacks (see EncryptedModelGrid).
        self.encryption_chain.append(agg.to_bytes())
        return self.encrypted_model(0), MetricRecord(metrics), rejected

    # -- the delta protocol's encrypted global model ---------------------------------------
    def encrypted_model(self, base_version: int) -> ArrayRecord:
        """The encrypted global model as the aggregates of versions ``base_version`` on."""
        return blob_record(encode_chain(base_version, self.encryption_chain[base_version:]), CHAIN_KEY)

    def start(self, grid, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        """As the method's ``start``, through :class:`EncryptedModelGrid` when updates are packed deltas."""
        if getattr(self, "encryption_packing", None) is not None:
            grid = EncryptedModelGrid(grid, self)
        return super().start(grid, *args, **kwargs)  # type: ignore[misc]


class EncryptedAnchorsMixin:
    """Anchors of an encrypted run: contributions summed as ciphertexts, the noise added in the ciphertext domain.

    Overrides the combine/validate hooks of :class:`~secure_fedvlp.wrappers.anchors.AnchoredStrategyMixin`;
    :func:`encrypted_strategy` adds it only to anchored strategies.
    """

    def anchor_mode(self) -> str:
        if self.cfg.anchors.noise == "distributed":  # type: ignore[attr-defined]
            return "distributed noise shares added by the sites, summed under CKKS"
        return "server noise added in the ciphertext domain (the server never sees an anchor)"

    def anchor_query_config(self, server_round: int, node_id: int) -> ConfigRecord:
        cfg = super().anchor_query_config(server_round, node_id)  # type: ignore[misc]
        site = self.sites[node_id].site  # type: ignore[attr-defined]
        cfg[NONCE_KEY] = self.issue_nonce(server_round, "anchors", site)  # type: ignore[attr-defined]
        return cfg

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
        )  # anchors stay on the exact fixed-point codec (the server adds its noise to them)
        dim = self.anchor_dim  # type: ignore[attr-defined]
        result = self.aggregate_signed(server_round, "anchors", updates, dim, anchor_layout_hash(dim))  # type: ignore[attr-defined]
        rejected.update(result.rejected)
        agg = result.aggregate
        if agg is None or len(result.accepted) < self.cfg.anchors.min_contributors:  # type: ignore[attr-defined]
            return None, rejected
        if self.cfg.anchors.noise == "server":  # type: ignore[attr-defined]
            # ciphertext + plaintext noise: the server never sees the anchors, noised or not
            agg = add_plaintext_noise(agg, server_noise(self.cfg, dim, self.anchor_rng))  # type: ignore[attr-defined]
        self.anchor_contributors = list(result.accepted)
        return blob_record(agg.to_bytes()), rejected


class EncryptedModelGrid:
    """The strategy's grid, sending each site only the part of the encrypted global model it lacks.

    Under the delta protocol the encrypted global model is the list of adopted aggregates
    (:meth:`EncryptionStrategyMixin.encrypted_model`).  Every message that carries it (train,
    evaluate, anchor and DRO queries) is rewritten per destination to the aggregates from the version
    that site is known to hold: a site that joins late, or returns after a failure (any error reply
    resets it to version 0), gets the whole current model, encrypted, first; a site in step gets the
    newest aggregate only.  A site's version advances when it answers a message without error.
    """

    def __init__(self, grid: Any, strategy: EncryptionStrategyMixin) -> None:
        self._grid = grid
        self._strategy = strategy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        s = self._strategy
        sites = s.sites  # type: ignore[attr-defined]
        pending: dict[int, int] = {}
        out = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            content = msg.content
            if ARRAYS_KEY in content.array_records and is_chain_record(content[ARRAYS_KEY]) and nid in sites:
                have = min(s.encryption_synced.get(sites[nid].site, 0), len(s.encryption_chain))
                copy = RecordDict(dict(content.items()))
                copy[ARRAYS_KEY] = s.encrypted_model(have)
                msg.content = copy
                pending[nid] = len(s.encryption_chain)
            out.append(msg)
        replies = list(self._grid.send_and_receive(out, timeout=timeout))
        for reply in replies:
            nid = reply.metadata.src_node_id
            if nid not in sites:
                continue
            site = sites[nid].site
            if reply.has_error():
                s.encryption_synced[site] = 0  # it may have lost its state: send everything next time
            elif nid in pending:
                s.encryption_synced[site] = max(s.encryption_synced.get(site, 0), pending[nid])
        return replies


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
