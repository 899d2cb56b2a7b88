"""Safehold crypto package: the primitives we compose, all on ``cryptography`` / the stdlib.

* :mod:`.envelope` — AES-256-GCM record envelopes (versioned, key id, random nonce).
* :mod:`.keyset` — keysets with one primary key, rotation, KEK wrapping.
* :mod:`.kdf` — HKDF-SHA256 sub-keys with domain separation (RFC 5869).
* :mod:`.blind_index` — HMAC-SHA256 blind indexes, per namespace.
* :mod:`.fpe`, :mod:`.siv` — format-preserving and deterministic encryption (proxy).

See ``docs/crypto.md`` for formats and decisions.
"""
