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
  encrypted global model is decrypted before the handler runs; an outgoing train reply has its
  parameters flattened, multiplied by the aggregation weight (``encryption-weight`` from the server,
  else the reply's ``num-examples``), rounded to the fixed-point grid and encrypted.  The mod runs
  after the trainer (and its DP-SGD wrapper): clip and noise, then weight, then encrypt.
* **Strategy wrapper** (:func:`encrypted_strategy`): a subclass of any method's strategy whose
  ``configure_train`` adds each node's planned weight and whose aggregation sums ciphertexts
  (:func:`~secure_fedvlp.encryption.aggregate_encrypted`), dropping each malformed contribution with
  its reason.  The new global model is that encrypted weighted sum with its clear total weight: the
  server keeps it encrypted and sends it as is; clients divide by the total weight after
  decrypting.  The round-1 model is the seeded initialisation, which depends on no data.
* **Full parameters, not deltas**, are aggregated: the encrypted global is then self-contained (a
  site that missed a round, or a held-out site, can decrypt it without history), and dropouts only
  change the total weight.
* **Fixed-point exact decryption**: every weighted value is rounded to a multiple of ``2**-f``
  before encryption and every decrypted sum is rounded back, with ``f`` chosen so that the CKKS
  error stays below half a step except with probability < 2**-75 per slot
  (:func:`~secure_fedvlp.encryption.packing.fixed_point_bits_for`).  A decrypted model is thus an exact
  function of the plaintexts and carries no CKKS error for an IND-CPA-D attack to exploit; see
  :func:`export_model` for the release.
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
