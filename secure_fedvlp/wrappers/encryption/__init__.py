"""Encrypted aggregation (CKKS) wired into Flower: settings, a client mod, a strategy wrapper and the release.

* :mod:`.settings`: :class:`EncryptionSettings`, the run's CKKS settings built once by
  :func:`encryption_settings` from ``(cfg, run_dir)`` and handed to every part below;
* :mod:`.records`: how a ciphertext travels in a Flower record;
* :mod:`.client`: a site's key-holding state (:class:`ClientEncryption`) and its client mod;
* :mod:`.strategy`: the strategy wrapper (:func:`encrypted_strategy`), encrypted anchors included;
* :mod:`.release`: the server's encrypted model, a key holder's export, the pre-run checks.

Protocol
--------
* **Keys** come from ``secure-fedvlp keys init`` (or, in a CLI simulation run without
  ``encryption.key_dir``, from the CLI acting as key authority before the apps start).  Every
  site loads ``client-<site>.key`` (secret key, mode 0600); the ServerApp loads ``server.ctx``,
  which :func:`~secure_fedvlp.encryption.load_server_context` refuses if it holds a secret key.
  Nothing but ciphertexts travels in messages: the context is distributed once per run as files.
* **Client mod** (:func:`make_encryption_mod`): an incoming message whose ``arrays`` record is an
  encrypted global model is checked and decrypted before the handler runs (a failing aggregate is
  refused, the site keeps its previous model); an outgoing train reply is encoded (below),
  multiplied by the aggregation weight (``encryption-weight`` from the server, else the reply's
  ``num-examples``), encrypted with the weight in every vector, and signed with the site's key over
  the server's ``encryption-nonce``.  The mod runs after the trainer (and its DP-SGD wrapper): clip
  and noise, then the public clip and quantisation (post-processing), then weight, then encrypt.
* **Strategy wrapper** (:func:`encrypted_strategy`): a subclass of any method's strategy whose
  ``configure_train`` adds each node's planned weight and a fresh nonce, and whose aggregation
  verifies each contribution's signature (by the key of the site the transport delivered it from)
  and sums ciphertexts (:func:`~secure_fedvlp.encryption.aggregate_encrypted`), dropping each
  invalid contribution with its reason.
* **Delta protocol** (``encryption.codec = "packed_delta"``, the default): a site sends its update
  relative to the global model it trained from, clipped to ``[-delta_bound, delta_bound]``,
  multiplied by its normalised weight (at most 1), quantised and packed three values per CKKS slot
  (about 10.7 bytes per model value), with the weight in the last slot of every vector.  The
  server keeps every adopted aggregate; the encrypted global model is that list (the seeded
  initial model, public, plus each aggregate's mean delta), and :class:`EncryptedModelGrid` sends
  each site the aggregates it lacks: a site in step gets the newest one, a site that joins late or
  returns after a failure gets all of them first.  Each site checks each aggregate
  (:func:`~secure_fedvlp.encryption.check_and_decrypt`) and adds its mean delta; the decrypted
  mean is the plaintext mean of the quantised updates, bit for bit.  Anchors keep the exact codec.
* **Exact codec** (``encryption.codec = "exact"``): weighted full models on a fixed-point grid,
  one value per slot (about 32 bytes per value); the encrypted global model is the last aggregate,
  self-contained.  Every weighted value is rounded to a multiple of ``2**-f`` before encryption and
  every decrypted sum is rounded back, with ``f`` chosen so that the CKKS error stays below half a
  step except with probability < 2**-75 per slot
  (:func:`~secure_fedvlp.encryption.packing.fixed_point_bits_for`).  Either way a decrypted model
  is an exact function of the plaintexts and carries no CKKS error for an IND-CPA-D attack to
  exploit; see :func:`export_model` for the release.
"""

from secure_fedvlp.wrappers.encryption.client import (
    ClientEncryption,
    make_encryption_mod,
)
from secure_fedvlp.wrappers.encryption.records import (
    CIPHERTEXT_KEY,
    WEIGHT_KEY,
    anchor_layout_hash,
    is_encrypted,
)
from secure_fedvlp.wrappers.encryption.release import (
    check_encryption_supported,
    export_model,
    save_encrypted_model,
)
from secure_fedvlp.wrappers.encryption.settings import (
    EncryptionSettings,
    encryption_settings,
)
from secure_fedvlp.wrappers.encryption.strategy import (
    EncryptedAnchorsMixin,
    EncryptionStrategyMixin,
    encrypted_strategy,
    load_server_encryption,
)

__all__ = [
    "CIPHERTEXT_KEY",
    "WEIGHT_KEY",
    "ClientEncryption",
    "EncryptedAnchorsMixin",
    "EncryptionSettings",
    "EncryptionStrategyMixin",
    "anchor_layout_hash",
    "check_encryption_supported",
    "encrypted_strategy",
    "encryption_settings",
    "export_model",
    "is_encrypted",
    "load_server_encryption",
    "make_encryption_mod",
    "save_encrypted_model",
]
