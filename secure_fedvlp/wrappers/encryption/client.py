"""The client side of encrypted aggregation (CKKS): a site's key-holding state and its Flower mod.

A site signs every contribution with its own Ed25519 key over the server's nonce for the round
and stage, encrypts its weight in every vector, clips every value to the public ``encryption.clip``
first, and checks every aggregate before it uses it
(:func:`~secure_fedvlp.encryption.check_and_decrypt`: signatures, contributor count, total weight,
grid residual, magnitude).  An aggregate that fails is refused with the reason in the site's log,
and the site keeps the previous model it accepted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

from secure_fedvlp.encryption import (
    AggregateCiphertext,
    EncryptionContext,
    check_and_decrypt,
    encrypt_update,
    flatten_update,
    load_client_context,
    load_signing_public_keys,
    unflatten_update,
)
from secure_fedvlp.encryption.envelope import decode_chain
from secure_fedvlp.encryption.packing import QuantizedPacking, UpdateLayout
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
    NONCE_KEY,
    WEIGHT_KEY,
    anchor_layout_hash,
    blob_record,
    canonical_state,
    is_chain_record,
    is_encrypted,
    layout_of,
    record_blob,
)
from secure_fedvlp.wrappers.encryption.settings import EncryptionSettings

__all__ = ["ClientEncryption", "make_encryption_mod"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientEncryption:
    """One site's encryption state: its key-holding context, the model layout and the run's settings.

    ``public_keys`` are the sites' signing public keys from the manifest; ``memory`` holds the last
    global model the site accepted (``"previous"``; the seeded initial model at first), the version
    of the delta protocol's encrypted model it holds (``"version"``: how many aggregates it has
    processed) and the reasons of the aggregates it refused (``"refused"``).  A site's messages may be
    handled by different processes (Flower's Simulation Engine runs clients in Ray workers), so the
    model and version are also kept in the site's own directory (``state_path``, mode 0600) and read
    back before each use.
    """

    ctx: EncryptionContext
    layout: UpdateLayout
    site: str
    settings: EncryptionSettings
    public_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)
    memory: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    state_path: Path | None = None

    @property
    def fixed_point_bits(self) -> int:
        return self.settings.fixed_point_bits

    @property
    def max_clients(self) -> int:
        return self.settings.max_contributions

    @property
    def packing(self) -> QuantizedPacking | None:
        return self.settings.packing

    @classmethod
    def load(
        cls,
        settings: EncryptionSettings,
        site: str,
        reference_state: Mapping[str, np.ndarray],
        state_path: str | os.PathLike | None = None,
    ) -> ClientEncryption:
        """Load ``site``'s key file and check it was made for the run's CKKS parameters.

        ``state_path``: where the site keeps the global model it holds and its version (its own directory).
        """
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
        if ctx.site is not None and ctx.site != site:
            raise KeyMaterialError(f"{path} is site {ctx.site!r}'s key file, not site {site!r}'s.")
        if ctx.signing_key is None:
            raise KeyMaterialError(
                f"{path} holds no signing key (made before contributions were signed); create the run's keys "
                f"again with `secure-fedvlp keys init --out {settings.key_dir} --clients <every site>`."
            )
        public_keys = load_signing_public_keys(settings.manifest, ctx.fingerprint)
        enc = cls(ctx, layout_of(reference_state), site, settings, public_keys, state_path=_path_or_none(state_path))
        enc.memory["previous"] = canonical_state(reference_state)  # version 0: the seeded initial model
        enc.memory["version"] = 0
        enc.restore()
        return enc

    def restore(self) -> None:
        """Read the model and version this site last stored, when another process of the site stored a newer one."""
        p = self.state_path
        if p is None or not p.exists():
            return
        try:
            with np.load(p) as z:
                version = int(z[_VERSION_KEY])
                if version != self.memory.get("version") or "previous" not in self.memory:
                    self.memory["previous"] = {k: np.array(z[k]) for k in z.files if k != _VERSION_KEY}
                    self.memory["version"] = version
        except (OSError, KeyError, ValueError) as exc:
            raise CiphertextError(f"site {self.site}: its encryption state {p} is unreadable: {exc}.") from None

    def _store(self) -> None:
        p = self.state_path
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **self.memory["previous"], **{_VERSION_KEY: np.asarray(self.memory.get("version", 0))})
        os.replace(tmp, p)

    def _flat(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        canon = canonical_state(state)
        try:
            ordered = {e.name: canon[e.name] for e in self.layout.entries}
        except KeyError as exc:
            raise ValueError(f"the parameters lack {exc.args[0]!r} of the federated model.") from None
        vec, layout = flatten_update(ordered)
        if len(canon) != len(ordered) or layout.layout_hash() != self.layout.layout_hash():
            raise ValueError("the parameters do not have the federated model's layout.")
        return vec

    def _state(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in unflatten_update(flat, self.layout).items()}

    def apply_chain(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """The current global model of the delta protocol, from an encrypted model (:data:`CHAIN_KEY`).

        The record holds the aggregates of versions ``base ..``; the site applies those it has not
        processed yet, each after every check of :func:`~secure_fedvlp.encryption.check_and_decrypt`:
        ``global += decrypted mean delta`` (float64 sum, stored as float32: every site computes the
        same bits).  A refused aggregate is skipped with its reason logged (every site refuses the
        same one: the checks are deterministic), so the site keeps the model it held.
        """
        base, blobs = decode_chain(record_blob(record))
        self.restore()
        version = int(self.memory.get("version", 0))
        if base > version:
            raise CiphertextError(
                f"the encrypted global model starts at version {base}, but site {self.site} holds version "
                f"{version}; it needs the aggregates from version {version} on."
            )
        current = self.memory["previous"]
        for i, blob in enumerate(blobs):
            index = base + i
            if index < version:
                continue
            try:
                agg = AggregateCiphertext.from_bytes(blob, self.ctx)
                if agg.layout_hash != self.layout.layout_hash():
                    raise CiphertextError(
                        f"aggregate {index} has layout {agg.layout_hash!r}; this site's model has "
                        f"{self.layout.layout_hash()!r}."
                    )
                mean = check_and_decrypt(
                    self.ctx,
                    agg,
                    self.public_keys,
                    min_contributors=self.settings.min_contributors,
                    packing=self.packing,
                )
                current = self._state(self._flat(current).astype(np.float64) + mean)
            except CiphertextError as exc:
                self.memory.setdefault("refused", []).append(str(exc))
                logger.warning(
                    "site %s refused aggregate %d of the encrypted global model: %s; it keeps the previous model "
                    "it accepted",
                    self.site,
                    index,
                    exc,
                )
            version = index + 1
        self.remember(current, version)
        return {k: v.copy() for k, v in current.items()}

    def encrypt_delta(
        self,
        state: Mapping[str, np.ndarray],
        global_state: Mapping[str, np.ndarray],
        weight: float,
        server_round: int,
        stage: str,
        nonce: str,
    ) -> ArrayRecord:
        """Encrypt this site's update relative to the global model it trained from (delta protocol).

        ``state - global_state`` (after DP-SGD: the clipping and quantisation are post-processing) is
        clipped to the public ``[-delta_bound, delta_bound]``, multiplied by the normalised weight
        (at most 1), rounded to the packing's integer levels, packed three values per slot with the
        weight in the last slot of every vector, encrypted and signed.
        """
        packing = self.packing
        assert packing is not None
        if not 0 < float(weight) <= packing.max_weight:
            raise ValueError(f"weight {weight!r} is outside (0, {packing.max_weight}] (normalised weights).")
        delta = self._flat(state).astype(np.float64) - self._flat(global_state).astype(np.float64)
        clipped = int(np.count_nonzero(np.abs(delta) > packing.bound))
        if clipped:
            logger.warning(
                "site %s: %d update value(s) clipped to encryption.delta_bound = %g before encryption",
                self.site,
                clipped,
                packing.bound,
            )
        upd = encrypt_update(
            self.ctx,
            delta,
            float(weight),
            int(server_round),
            client_id=self.site,
            stage=stage,
            layout_hash=self.layout.layout_hash(),
            packing=packing,
            weight_slot=True,
            nonce=nonce,
        )
        return blob_record(upd.to_bytes())

    def remember(self, state: Mapping[str, np.ndarray], version: int | None = None) -> None:
        """Keep ``state`` (and the delta protocol's ``version``) as the last global model this site accepted."""
        self.memory["previous"] = {k: np.array(v, dtype=np.float32, copy=True) for k, v in state.items()}
        if version is not None:
            self.memory["version"] = int(version)
        self._store()

    def refused(self) -> list[str]:
        """Reasons of the aggregates this site refused, oldest first."""
        return list(self.memory.get("refused", []))

    def decrypt_global(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """Check and decrypt an encrypted global model (exact, by the fixed-point rounding) into named arrays.

        An aggregate that fails a check (:func:`~secure_fedvlp.encryption.check_and_decrypt`) is refused:
        the reason is logged and kept in :meth:`refused`, and the previous model the site accepted is
        returned instead.  With no previous model the refusal is an error.  An encrypted model of the
        delta protocol is applied by :meth:`apply_chain`.
        """
        if is_chain_record(record):
            return self.apply_chain(record)
        self.restore()
        try:
            agg = AggregateCiphertext.from_bytes(record_blob(record), self.ctx)
            if agg.layout_hash != self.layout.layout_hash():
                raise CiphertextError(
                    f"the encrypted global model has layout {agg.layout_hash!r}; this site's model "
                    f"has {self.layout.layout_hash()!r}."
                )
            flat = check_and_decrypt(
                self.ctx,
                agg,
                self.public_keys,
                min_contributors=self.settings.min_contributors,
                fixed_point_bits=self.fixed_point_bits,
                value_bound=self.settings.clip,
            )
        except CiphertextError as exc:
            self.memory.setdefault("refused", []).append(str(exc))
            previous = self.memory.get("previous")
            logger.warning(
                "site %s refused the encrypted global model: %s%s",
                self.site,
                exc,
                "; it keeps the previous model it accepted" if previous is not None else "",
            )
            if previous is None:
                raise
            return {k: v.copy() for k, v in previous.items()}
        state = unflatten_update(flat, self.layout)
        out = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
        self.remember(out, int(self.memory.get("version", 0)) + 1)  # a newer model for the site's other processes
        return out

    def encrypt_update(
        self, state: Mapping[str, np.ndarray], weight: float, server_round: int, stage: str, nonce: str
    ) -> ArrayRecord:
        """Clip to the public bound, weight, round to the grid, encrypt (weight in every vector) and sign."""
        canon = canonical_state(state)
        try:
            ordered = {e.name: canon[e.name] for e in self.layout.entries}
        except KeyError as exc:
            raise ValueError(f"the trained parameters lack {exc.args[0]!r} of the federated model.") from None
        vec, layout = flatten_update(ordered)
        if len(canon) != len(ordered) or layout.layout_hash() != self.layout.layout_hash():
            raise ValueError("the trained parameters do not have the federated model's layout.")
        if not 0 < float(weight) <= self.settings.max_weight:
            raise ValueError(
                f"weight {weight!r} is outside (0, {self.settings.max_weight:g}], the largest weight for which "
                f"{self.max_clients} contributions clipped to encryption.clip = {self.settings.clip:g} fit the "
                "CKKS modulus."
            )
        clip = self.settings.clip
        clipped = int(np.count_nonzero(np.abs(vec) > clip))
        if clipped:  # post-processing of the (DP-noised) parameters; the public bound every site applies
            logger.warning(
                "site %s: %d value(s) clipped to encryption.clip = %g before encryption", self.site, clipped, clip
            )
            vec = np.clip(vec, -clip, clip)
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
            weight_slot=True,
            nonce=nonce,
        )
        return blob_record(upd.to_bytes())

    def encrypt_anchors(self, record: ArrayRecord, server_round: int, nonce: str) -> ArrayRecord:
        """Encrypt and sign this site's anchor contribution (a plain sum: weight 1)."""
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
            weight_slot=True,
            nonce=nonce,
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
        vec = check_and_decrypt(
            self.ctx,
            agg,
            self.public_keys,
            min_contributors=self.settings.anchor_min_contributors,
            fixed_point_bits=self.fixed_point_bits,
            plain_sum=True,
        )
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

        global_state = None
        if ARRAYS_KEY in original.array_records and is_encrypted(original[ARRAYS_KEY]):
            content = RecordDict(dict(original.items()))  # a copy: the sender's object stays as sent
            global_state = sa.decrypt_global(original[ARRAYS_KEY])
            content[ARRAYS_KEY] = numpy_to_arrays(global_state)
        elif ARRAYS_KEY in original.array_records:
            global_state = arrays_to_numpy(original[ARRAYS_KEY])  # the public initial model
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
            rnd, stage = int(cfg["server-round"]), str(cfg.get("stage", "full"))
            if sa.packing is not None:
                if global_state is None or WEIGHT_KEY not in cfg:
                    raise CiphertextError("a train message of the delta protocol lacks the global model or its weight.")
                reply.content[ARRAYS_KEY] = sa.encrypt_delta(state, global_state, weight, rnd, stage, _nonce(cfg))
            else:
                reply.content[ARRAYS_KEY] = sa.encrypt_update(state, weight, rnd, stage, _nonce(cfg))
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
                reply.content[ANCHORS_KEY], int(original[CONFIG_KEY]["server-round"]), _nonce(original[CONFIG_KEY])
            )
        return reply

    return encryption_mod


_VERSION_KEY = "__encryption_version__"


def _path_or_none(p: str | os.PathLike | None) -> Path | None:
    return None if p is None else Path(p)


def _nonce(cfg: Any) -> str:
    """The server's nonce for this contribution; a message without one is not answered."""
    nonce = cfg.get(NONCE_KEY) if hasattr(cfg, "get") else None
    if not isinstance(nonce, str) or len(nonce) < 16:
        raise CiphertextError(f"the server sent no '{NONCE_KEY}' to sign this contribution over; refused.")
    return nonce
