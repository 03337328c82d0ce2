"""The client side of encrypted aggregation (CKKS): a site's key-holding state and its Flower mod."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

from secure_fedvlp.encryption import (
    AggregateCiphertext,
    EncryptionContext,
    decrypt_aggregate,
    encrypt_update,
    flatten_update,
    load_client_context,
    unflatten_update,
)
from secure_fedvlp.encryption.packing import UpdateLayout
from secure_fedvlp.errors import CiphertextError, KeyMaterialError
from secure_fedvlp.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    arrays_to_numpy,
    numpy_to_arrays,
)
from secure_fedvlp.wrappers.encryption.records import (
    WEIGHT_KEY,
    anchor_layout_hash,
    blob_record,
    canonical_state,
    is_encrypted,
    layout_of,
    record_blob,
)
from secure_fedvlp.wrappers.encryption.settings import EncryptionSettings

__all__ = ["ClientEncryption", "make_encryption_mod"]


@dataclass(frozen=True)
class ClientEncryption:
    """One site's encryption state: its key-holding context, the model layout and the run's settings."""

    ctx: EncryptionContext
    layout: UpdateLayout
    site: str
    settings: EncryptionSettings

    @property
    def fixed_point_bits(self) -> int:
        return self.settings.fixed_point_bits

    @property
    def max_clients(self) -> int:
        return self.settings.max_contributions

    @classmethod
    def load(
        cls, settings: EncryptionSettings, site: str, reference_state: Mapping[str, np.ndarray]
    ) -> ClientEncryption:
        """Load ``site``'s key file and check it was made for the run's CKKS parameters."""
        path = settings.client_key(site)
        if not path.exists():
            raise KeyMaterialError(
                f"encryption is on but site {site!r} has no key file at {path}; create the run's keys with "
                f"`secure-fedvlp keys init --out {settings.key_dir} --clients <every site>` "
                "(or leave encryption.key_dir empty in a `secure-fedvlp run` simulation)."
            )
        ctx = load_client_context(path, n_threads=settings.n_threads)
        expected = settings.params
        if (ctx.params.poly_modulus_degree, tuple(ctx.params.coeff_mod_bit_sizes), ctx.params.global_scale_bits) != (
            expected.poly_modulus_degree,
            tuple(expected.coeff_mod_bit_sizes),
            expected.global_scale_bits,
        ):
            raise KeyMaterialError(
                f"{path} was made for other CKKS parameters than encryption.preset = {settings.preset!r}."
            )
        return cls(ctx, layout_of(reference_state), site, settings)

    def decrypt_global(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """Decrypt an encrypted global model (exact, by the fixed-point rounding) into named arrays."""
        agg = AggregateCiphertext.from_bytes(record_blob(record), self.ctx)
        if agg.layout_hash != self.layout.layout_hash():
            raise CiphertextError(
                f"the encrypted global model has layout {agg.layout_hash!r}; this site's model "
                f"has {self.layout.layout_hash()!r}."
            )
        flat = decrypt_aggregate(self.ctx, agg, fixed_point_bits=self.fixed_point_bits)
        state = unflatten_update(flat, self.layout)
        return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}

    def encrypt_update(
        self, state: Mapping[str, np.ndarray], weight: float, server_round: int, stage: str
    ) -> ArrayRecord:
        """Weight, round to the grid and encrypt this site's new parameters."""
        canon = canonical_state(state)
        try:
            ordered = {e.name: canon[e.name] for e in self.layout.entries}
        except KeyError as exc:
            raise ValueError(f"the trained parameters lack {exc.args[0]!r} of the federated model.") from None
        vec, layout = flatten_update(ordered)
        if len(canon) != len(ordered) or layout.layout_hash() != self.layout.layout_hash():
            raise ValueError("the trained parameters do not have the federated model's layout.")
        upd = encrypt_update(
            self.ctx,
            vec,
            float(weight),
            int(server_round),
            client_id=self.site,
            stage=stage,
            layout_hash=layout.layout_hash(),
            fixed_point_bits=self.fixed_point_bits,
            max_clients=self.max_clients,
        )
        return blob_record(upd.to_bytes())

    def encrypt_anchors(self, record: ArrayRecord, server_round: int) -> ArrayRecord:
        """Encrypt this site's anchor contribution (a plain sum: weight 1)."""
        from secure_fedvlp.privacy.anchors import SUM_KEY

        vec = np.asarray(record[SUM_KEY].numpy(), dtype=np.float64).reshape(-1)
        upd = encrypt_update(
            self.ctx,
            vec,
            1.0,
            int(server_round),
            client_id=self.site,
            stage="anchors",
            layout_hash=anchor_layout_hash(vec.size),
            fixed_point_bits=self.fixed_point_bits,
            max_clients=self.max_clients,
        )
        return blob_record(upd.to_bytes())

    def decrypt_anchors(self, record: ArrayRecord) -> ArrayRecord:
        """The noised anchor bank (a sum: decrypted with total weight 1), exact on the fixed-point grid."""
        from secure_fedvlp.privacy.anchors import SUM_KEY

        agg = AggregateCiphertext.from_bytes(record_blob(record), self.ctx)
        if agg.stage != "anchors" or agg.layout_hash != anchor_layout_hash(agg.num_values):
            raise CiphertextError(
                f"the encrypted anchor bank has stage {agg.stage!r} and layout "
                f"{agg.layout_hash!r}; it is not an anchor bank."
            )
        vec = decrypt_aggregate(self.ctx, agg, total_weight=1.0, fixed_point_bits=self.fixed_point_bits)
        return ArrayRecord({SUM_KEY: Array(np.asarray(vec, dtype=np.float64))})


def make_encryption_mod(runtime: Callable[[Context], Any]) -> Callable[[Message, Context, Callable], Message]:
    """A Flower client mod that decrypts incoming global models and encrypts train replies.

    ``runtime(context)`` returns the node's :class:`~secure_fedvlp.flower.client_app.ClientRuntime`;
    its ``encryption`` attribute (a :class:`ClientEncryption`) is ``None`` when encryption is off,
    and the mod then passes messages through untouched.
    """

    def encryption_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        rt = runtime(context)
        sa: ClientEncryption | None = getattr(rt, "encryption", None)
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
            content[ANCHORS_KEY] = sa.decrypt_anchors(original[ANCHORS_KEY])
        msg.content = content
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = original
        if (
            msg.metadata.message_type == MessageType.TRAIN
            and not reply.has_error()
            and ARRAYS_KEY in reply.content.array_records
        ):
            cfg = original[CONFIG_KEY]
            metrics = reply.content[METRICS_KEY]
            weight = float(cfg[WEIGHT_KEY]) if WEIGHT_KEY in cfg else float(metrics[NUM_EXAMPLES])
            state = arrays_to_numpy(reply.content[ARRAYS_KEY])
            reply.content[ARRAYS_KEY] = sa.encrypt_update(
                state, weight, int(cfg["server-round"]), str(cfg.get("stage", "full"))
            )
            metrics[WEIGHT_KEY] = weight
        if msg.metadata.message_type == MessageType.TRAIN:  # CreamFL: representations, as ratio-of-sums ciphertexts
            from secure_fedvlp.wrappers.encryption.ensemble import encrypt_representations

            encrypt_representations(sa, original, reply, rt.setup.cfg.creamfl.weight_floor)
        if (
            msg.metadata.message_type == MessageType.QUERY
            and not reply.has_error()
            and ANCHORS_KEY in reply.content.array_records
        ):
            reply.content[ANCHORS_KEY] = sa.encrypt_anchors(
                reply.content[ANCHORS_KEY], int(original[CONFIG_KEY]["server-round"])
            )
        return reply

    return encryption_mod
