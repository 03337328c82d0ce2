"""CreamFL's representation ensemble under CKKS: a ratio of two encrypted sums.

The con_w ensemble of one modality is, per public item ``j``,
``(sum_c w_{c,j} r^c_j) / (sum_c w_{c,j})`` with ``w_{c,j} = max(exp(s_{c,j} + log M), floor)``
(:func:`~secure_fedvlp.objectives.creamfl.shifted_weights`), and each site computes its own
``s_{c,j}`` from its representations and the broadcast global bank.  So:

* **site** (:func:`encrypt_representations`, called by the client mod on a train reply): for each
  modality it holds, the vector ``[w_j r_j for every item (M d values), w_j for every item (M)]`` is
  rounded to the run's fixed-point grid and encrypted (weight 1: the weights are inside the vector);
  the plaintext representations never leave the site;
* **server** (:class:`EncryptedEnsembleMixin`): sums the ciphertexts of each modality; an aggregate
  of fewer than ``encryption.min_contributors`` sites is discarded (per modality); the server never
  holds one site's representations;
* **key holder** (:class:`EnsembleKeyHolder`, a client extension at every site): decrypts an
  aggregate the server sends it (exact on the fixed-point grid), refuses one of fewer contributors
  than the minimum, and returns the ratio, the ensemble, which the server then distils from.

Error bound: every weighted value is rounded to ``2^-f`` (error at most ``2^-(f+1)``) and CKKS noise is
rounded away, so with ``K`` contributors the numerator and the weight sum of item ``j`` are each
within ``K 2^-(f+1)`` of their plaintext values; with representations of norm at most 1
(:func:`ensemble_error_bound`) the ensemble is within ``K 2^-(f+1) (1 + 1) / (W_j - K 2^-(f+1))``
of the plaintext ratio, ``W_j`` the plaintext weight sum.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from secure_fedvlp.encryption import (
    AggregateCiphertext,
    aggregate_encrypted,
    decrypt_aggregate,
    encrypt_update,
    flatten_update,
)
from secure_fedvlp.errors import CiphertextError, ProtocolError
from secure_fedvlp.methods.creamfl import GLOBAL_REPS_KEY, REPS_KEY
from secure_fedvlp.objectives.creamfl import contrastive_scores, ratio_ensemble, shifted_weights
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, INFO_KEY, QUERY, SERVER_ROUND
from secure_fedvlp.wrappers.encryption.records import blob_record, is_encrypted, record_blob

logger = logging.getLogger(__name__)

__all__ = [
    "ENSEMBLE_QUERY",
    "ENSEMBLE_KEY",
    "ensemble_record_key",
    "ensemble_layout_hash",
    "ensemble_vector",
    "encrypt_representations",
    "decrypt_ensemble",
    "ensemble_error_bound",
    "EncryptedEnsembleMixin",
    "EnsembleKeyHolder",
]

#: Query kind: a key holder decrypts an aggregate ensemble.
ENSEMBLE_QUERY = "creamfl-ensemble"
#: Record of the decrypted ensemble in the key holder's reply.
ENSEMBLE_KEY = "ensemble"
#: Record of the encrypted aggregate in the key holder's query (not ``arrays``: that is the global model).
AGGREGATE_KEY = "creamfl-aggregate"
_OTHER = {"image": "text", "text": "image"}


def ensemble_record_key(modality: str) -> str:
    """Reply record holding one modality's encrypted contribution."""
    return f"{REPS_KEY}.{modality}"


def ensemble_layout_hash(num_items: int, dim: int) -> str:
    """Layout hash of one modality's contribution (both sides compute it)."""
    return flatten_update({"weighted": np.zeros((num_items, dim)), "weights": np.zeros(num_items)})[1].layout_hash()


def ensemble_vector(reps: np.ndarray, global_other: np.ndarray, floor: float) -> np.ndarray:
    """``[w_j r_j (M d values), w_j (M values)]`` of one site and one modality (float64)."""
    r = torch.from_numpy(np.asarray(reps, np.float64))
    s = contrastive_scores(r, torch.from_numpy(np.asarray(global_other, np.float64)))
    w = shifted_weights(s, r.shape[0], floor)
    return np.concatenate([(w[:, None] * r).reshape(-1).numpy(), w.numpy()])


def encrypt_representations(sa: Any, original: RecordDict, reply: Message, floor: float) -> None:
    """Replace a train reply's plaintext representations by one ciphertext per modality (in place).

    A reply without representations is left alone.  ``sa`` is the site's ``ClientEncryption``; the
    global bank comes from the train message the reply answers.
    """
    if reply.has_error() or REPS_KEY not in reply.content.array_records:
        return
    reps = {k: v.numpy() for k, v in reply.content[REPS_KEY].items()}
    bank = {k: v.numpy() for k, v in original[GLOBAL_REPS_KEY].items()}
    rnd = int(original[CONFIG_KEY][SERVER_ROUND])
    del reply.content[REPS_KEY]
    for m, r in sorted(reps.items()):
        upd = encrypt_update(
            sa.ctx,
            ensemble_vector(r, bank[_OTHER[m]], floor),
            1.0,
            rnd,
            client_id=sa.site,
            stage=f"creamfl-{m}",
            layout_hash=ensemble_layout_hash(*r.shape),
            fixed_point_bits=sa.fixed_point_bits,
            max_clients=sa.max_clients,
        )
        reply.content[ensemble_record_key(m)] = blob_record(upd.to_bytes())


def decrypt_ensemble(sa: Any, agg: AggregateCiphertext, num_items: int, dim: int, min_contributors: int) -> np.ndarray:
    """A key holder's side: the ensemble ``[M, d]`` of an aggregate it may release."""
    if not agg.stage.startswith("creamfl-") or agg.layout_hash != ensemble_layout_hash(num_items, dim):
        raise CiphertextError(f"aggregate of stage {agg.stage!r} is not a CreamFL ensemble of {num_items}x{dim}.")
    if len(agg.contributors) < min_contributors:
        raise ProtocolError(
            f"the aggregate holds {len(agg.contributors)} contribution(s), fewer than encryption.min_contributors = "
            f"{min_contributors}; it would be (nearly) one site's representations. Refused."
        )
    flat = decrypt_aggregate(sa.ctx, agg, total_weight=1.0, fixed_point_bits=sa.fixed_point_bits)
    weighted = torch.from_numpy(np.asarray(flat[: num_items * dim], np.float64).reshape(num_items, dim))
    weights = torch.from_numpy(np.asarray(flat[num_items * dim :], np.float64))
    return ratio_ensemble(weighted, weights).numpy()


def ensemble_error_bound(num_contributors: int, fixed_point_bits: int, weight_sums: np.ndarray) -> np.ndarray:
    """Per-item bound on ``|CKKS ensemble - plaintext ensemble|`` for representations of norm <= 1 (module doc)."""
    e = num_contributors * 2.0 ** -(fixed_point_bits + 1)
    return 2.0 * e / (np.asarray(weight_sums, np.float64) - e)


class EncryptedEnsembleMixin:
    """CreamFL's strategy under CKKS: representations summed as ciphertexts, the ratio taken by a key holder.

    :func:`~secure_fedvlp.wrappers.encryption.encrypted_strategy` adds it to strategies whose replies are
    representations.
    """

    def validate_representations(self, msg: Message) -> str | None:
        content = msg.content
        if ARRAYS_KEY in content.array_records:
            return "reply carries model parameters; a CreamFL site sends public-set representations only"
        if REPS_KEY in content.array_records:
            return "reply carries plaintext representations although encryption is on; refused unread"
        for m in self.expected_modalities(msg):  # type: ignore[attr-defined]
            key = ensemble_record_key(m)
            if key not in content.array_records:
                return f"reply carries no encrypted {m} representations"
            if not is_encrypted(content[key]) or len(content[key]) != 1:
                return f"{m} representations are not a single ciphertext although encryption is on; refused unread"
        return None

    def combine_representations(self, server_round: int, accepted: list[Message], bank):
        m_items, dim = len(self.public), self.embed_dim  # type: ignore[attr-defined]
        need = int(self.cfg.encryption.min_contributors)  # type: ignore[attr-defined]
        ens: dict[str, torch.Tensor | None] = {}
        who: dict[str, list[str]] = {}
        rejected: dict[str, str] = {}
        for m in ("image", "text"):
            key = ensemble_record_key(m)
            msgs = [x for x in accepted if key in x.content.array_records]
            updates, bad = self._parse_contributions(msgs, key, lambda msg, site: 1.0, "ensembles are plain sums")  # type: ignore[attr-defined]
            rejected.update(bad)
            result = aggregate_encrypted(
                self.encryption_ctx,  # type: ignore[attr-defined]
                updates,
                round_id=server_round,
                num_values=m_items * dim + m_items,
                stage=f"creamfl-{m}",
                layout_hash=ensemble_layout_hash(m_items, dim),
                fixed_point_bits=self.encryption_bits,  # type: ignore[attr-defined]
            )
            rejected.update(result.rejected)
            who[m] = list(result.accepted)
            self.encryption_stats.append(  # type: ignore[attr-defined]
                {"round": server_round, "stage": f"creamfl-{m}", "accepted": list(result.accepted), "rejected": bad}
            )
            if result.aggregate is None or len(result.accepted) < need:
                if msgs:
                    logger.warning(
                        "Round %d: %d valid %s contribution(s), fewer than encryption.min_contributors = %d; no %s "
                        "ensemble this round.",
                        server_round,
                        len(result.accepted),
                        m,
                        need,
                        m,
                    )
                ens[m] = None
                continue
            ens[m] = self.decrypt_by_key_holder(server_round, result.aggregate, m)
        return ens, who, rejected

    def decrypt_by_key_holder(self, server_round: int, agg: AggregateCiphertext, modality: str) -> torch.Tensor | None:
        """Ask training sites in turn to decrypt ``agg``; the first valid ensemble (``[M, d]``) is used."""
        grid = self._grid  # type: ignore[attr-defined]
        for nid in self.train_nodes():  # type: ignore[attr-defined]
            msg = Message(
                RecordDict(
                    {
                        AGGREGATE_KEY: blob_record(agg.to_bytes()),
                        CONFIG_KEY: ConfigRecord({QUERY: ENSEMBLE_QUERY, SERVER_ROUND: server_round}),
                    }
                ),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            (reply,) = list(grid.send_and_receive([msg], timeout=self._timeout))  # type: ignore[attr-defined]
            if reply.has_error() or ENSEMBLE_KEY not in reply.content.array_records:
                continue
            a = reply.content[ENSEMBLE_KEY]["ensemble"].numpy()
            if a.shape == (len(self.public), self.embed_dim) and np.isfinite(a).all():  # type: ignore[attr-defined]
                return torch.from_numpy(a.astype(np.float32))
        logger.warning("Round %d: no key holder decrypted the %s ensemble.", server_round, modality)
        return None

    def train_round(self, server_round: int, grid, arrays, timeout: float):
        self._grid, self._timeout = grid, timeout
        return super().train_round(server_round, grid, arrays, timeout)  # type: ignore[misc]


class EnsembleKeyHolder:
    """A site's key-holder side of the encrypted ensemble (a client extension)."""

    queries = (ENSEMBLE_QUERY,)

    def __init__(self, min_contributors: int) -> None:
        self.min_contributors = int(min_contributors)

    def extend_task(self, rt: Any, msg: Message, task: Any) -> Any:
        """Train jobs are unchanged."""
        return task

    def answer(self, rt: Any, msg: Message) -> RecordDict:
        sa = rt.encryption
        if sa is None:
            raise ProtocolError("an ensemble can only be decrypted with encryption on.")
        agg = AggregateCiphertext.from_bytes(record_blob(msg.content[AGGREGATE_KEY]), sa.ctx)
        public = rt.trainer.public
        dim = int(rt.model.spec.embed_dim)
        ens = decrypt_ensemble(sa, agg, len(public), dim, self.min_contributors)
        return RecordDict({ENSEMBLE_KEY: ArrayRecord({"ensemble": Array(ens.astype(np.float32))}), INFO_KEY: rt.info()})
