"""Typed exceptions for secure_fedvlp.

A small hierarchy (in the manner of Opacus ``validators/errors.py``): every error the
library raises on purpose derives from :class:`SecureFedVLPError`, so callers can catch
the family, and each subclass names one kind of failure.  Messages are sentences that
name the offending file, row, key or value.
"""

from __future__ import annotations


class SecureFedVLPError(Exception):
    """Base class of every error raised on purpose by secure_fedvlp."""


class ConfigError(SecureFedVLPError, ValueError):
    """A configuration is invalid: unknown key, wrong type, or value out of range.

    ``problems`` holds every problem found, so a user can fix them in one pass.
    """

    def __init__(self, problems: str | list[str], source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"Invalid configuration{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"Invalid configuration{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(msg)


class DataError(SecureFedVLPError, ValueError):
    """Input data is missing, unreadable or malformed (names file and row)."""


class ModelConfigError(ConfigError):
    """A model architecture config is invalid or cannot be loaded."""


class CheckpointError(SecureFedVLPError, ValueError):
    """A model checkpoint (``model.init_checkpoint``, a public start) is missing, unreadable, or does not fit
    the model it is loaded into; the message names the file and the missing or mismatched key or shape."""


class PrivacyError(SecureFedVLPError):
    """Base class of privacy-mechanism and accounting errors."""


class PrivacyBudgetExhausted(PrivacyError):
    """A release would exceed a client's (epsilon, delta) budget; it was refused before it happened."""


class LedgerError(PrivacyError):
    """A privacy ledger is missing, truncated, reordered or tampered with."""


class KeyMaterialError(SecureFedVLPError):
    """CKKS key material is missing, malformed, or held by the wrong party."""


class CiphertextError(SecureFedVLPError, ValueError):
    """An encrypted contribution is malformed, from the wrong context, the wrong round, or the wrong size."""


class NonFiniteModelError(SecureFedVLPError, ValueError):
    """A received model holds NaN or infinite values; a site refuses it before any private record touches it."""


class ProtocolError(SecureFedVLPError):
    """A request departs from the protocol a site follows (for example a second evaluation in one round, an
    evaluation for a stale round, or a model other than the round's global model); the site refuses it."""
