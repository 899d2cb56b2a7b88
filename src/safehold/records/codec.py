"""Value codecs for :class:`~safehold.records.engine.RecordEngine`.

A codec turns the engine's inner plaintext into the sealed body stored in a row, under
associated data the engine computes from the row's coordinates (namespace, blind index,
version). Two codecs exist:

* :class:`EnvelopeCodec` — the real one: AES-256-GCM envelopes (:mod:`safehold.crypto.envelope`)
  under a :class:`~safehold.crypto.keyset.Keyset`.
* :class:`UnsafePlainCodec` — pass-through, **no confidentiality and no integrity**. It exists
  only so benchmarks can measure the engine without encryption on the same store; it warns
  on construction and must never hold patient data.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

from safehold.crypto import envelope
from safehold.crypto.keyset import Keyset


class Codec(ABC):
    """Seals and opens row bodies. Implementations are thread-safe."""

    #: Short name for logs and benchmark output.
    name: str = "codec"

    @abstractmethod
    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Return the sealed body of ``plaintext`` bound to ``aad``."""

    @abstractmethod
    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Return the plaintext of ``sealed``.

        Raises:
            EnvelopeFormatError: ``sealed`` is not in the codec's format.
            UnknownKeyError: it names a key the codec does not hold.
            DecryptionError: authentication failed (tampered bytes or other ``aad``).
        """

    def key_id(self, sealed: bytes) -> int | None:
        """Key id a sealed body names (``None`` for keyless codecs). Raises EnvelopeFormatError."""
        return None

    def primary_key_id(self) -> int | None:
        """Key id new bodies are sealed under (``None`` for keyless codecs)."""
        return None


class EnvelopeCodec(Codec):
    """AES-256-GCM envelopes under ``keyset`` (format in :mod:`safehold.crypto.envelope`).

    Adds :data:`safehold.crypto.envelope.OVERHEAD` (33) bytes per value.
    """

    name = "aes-256-gcm"

    def __init__(self, keyset: Keyset):
        self.keyset = keyset

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """See :meth:`Codec.seal`; uses the keyset's primary key."""
        return envelope.seal(self.keyset, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """See :meth:`Codec.open`; picks the key by the envelope's key id."""
        return envelope.open_envelope(self.keyset, sealed, aad)

    def key_id(self, sealed: bytes) -> int | None:
        """See :meth:`Codec.key_id`."""
        return envelope.envelope_key_id(sealed)

    def primary_key_id(self) -> int | None:
        """See :meth:`Codec.primary_key_id`."""
        return self.keyset.primary_id


class UnsafePlainCodec(Codec):
    """Pass-through codec for benchmark baselines: stores plaintext, checks nothing.

    Warns (:class:`UserWarning`) every time one is constructed.
    """

    name = "plain"

    def __init__(self) -> None:
        warnings.warn(
            "UnsafePlainCodec stores record values in clear without integrity; "
            "benchmark baselines only, never patient data",
            UserWarning,
            stacklevel=2,
        )

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Returns ``plaintext`` unchanged."""
        return plaintext

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Returns ``sealed`` unchanged."""
        return sealed
