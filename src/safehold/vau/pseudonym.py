"""E-Rezept user pseudonyms (gemSpec_Krypt A_20162, A_20163 steps 6–7, A_20175).

* The VAU computes the **pre-user pseudonym** ``PNP = hex(AES-128-CMAC(k_vau, sub))`` (32 hex
  characters) from the verified access token's ``sub`` claim (NIST SP 800-38B CMAC).
* The web interface turns it into the **Userpseudonym** ``PNP "-" hex(AES-128-CMAC(k_web, PNP))``
  and returns it in the outer ``Userpseudonym`` header; the client puts it into the path of its
  next request, ``POST /VAU/<Userpseudonym>`` (``/VAU/0`` when it has none).

Both CMAC keys rotate at least every 10 days (A_20163 step 6); the previous key is still accepted
so pseudonyms handed out just before a rotation keep working. Safehold refuses a path pseudonym
that (a) is neither ``0`` nor a well-formed Userpseudonym, (b) fails the web-interface CMAC, or
(c) was issued for another ``sub`` — clients that switch users start again at ``/VAU/0``.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

from safehold.vau.errors import VauPseudonymError

__all__ = ["ROTATION_SECONDS", "PseudonymService"]

#: Longest life of a CMAC key (A_20163 step 6: at least every 10 days).
ROTATION_SECONDS = 10 * 86_400
_USER_PSEUDONYM = re.compile(r"([0-9a-f]{32})-([0-9a-f]{32})")


def _cmac(key: bytes, data: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


class _RotatingKey:
    def __init__(self, key: bytes | None, clock: Callable[[], float]):
        self._clock = clock
        self._current = (key if key is not None else os.urandom(16), clock())
        self._previous: bytes | None = None
        self._lock = threading.Lock()
        if len(self._current[0]) != 16:
            raise ValueError("pseudonym CMAC keys are 16 bytes (AES-128)")

    def live(self) -> list[bytes]:
        with self._lock:
            key, born = self._current
            if self._clock() - born >= ROTATION_SECONDS:
                self._previous = key
                self._current = (os.urandom(16), self._clock())
            return [self._current[0]] + ([self._previous] if self._previous else [])


class PseudonymService:
    """PNP (VAU side) and Userpseudonym (web-interface side) with rotating AES-CMAC keys.

    Args:
        vau_key, web_key: 16-byte initial keys, random when None. Keys live in process memory
            only; after a restart old pseudonyms are refused and clients fall back to ``/VAU/0``.
        clock: seconds since the epoch (rotation).
    """

    def __init__(
        self,
        vau_key: bytes | None = None,
        web_key: bytes | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self._vau = _RotatingKey(vau_key, clock)
        self._web = _RotatingKey(web_key, clock)

    def __repr__(self) -> str:
        return "PseudonymService(<keys hidden>)"

    @classmethod
    def generate(cls, *, clock: Callable[[], float] = time.time) -> PseudonymService:
        """A service with fresh random keys."""
        return cls(clock=clock)

    def pnp(self, sub: str) -> str:
        """``hex(AES-CMAC(k_vau, sub))`` under the current VAU key (A_20163 step 7)."""
        return _cmac(self._vau.live()[0], sub.encode("utf-8")).hex()

    def user_pseudonym(self, pnp: str) -> str:
        """``PNP-hex(AES-CMAC(k_web, PNP))`` under the current web-interface key (A_20162)."""
        return f"{pnp}-{_cmac(self._web.live()[0], pnp.encode('ascii')).hex()}"

    def check_path(self, pseudonym: str) -> str | None:
        """Web-interface check of the path pseudonym: None for ``0``, else its PNP.

        Raises:
            VauPseudonymError: malformed, or its CMAC fails under the current and previous key.
        """
        if pseudonym == "0":
            return None
        m = _USER_PSEUDONYM.fullmatch(pseudonym or "")
        if m is None:
            raise VauPseudonymError(
                "user pseudonym in the VAU path is malformed (expected '0' or "
                "'<32 hex>-<32 hex>' as issued in the Userpseudonym header)"
            )
        pnp, tag = m.group(1), bytes.fromhex(m.group(2))
        if not any(hmac.compare_digest(_cmac(k, pnp.encode("ascii")), tag) for k in self._web.live()):
            raise VauPseudonymError(
                "user pseudonym in the VAU path was not issued by this VAU "
                "(or has expired); send the request to /VAU/0"
            )
        return pnp

    def check_owner(self, pnp: str, sub: str) -> None:
        """Refuse a PNP that was not computed from ``sub`` under the current or previous VAU key.

        Raises:
            VauPseudonymError: the pseudonym belongs to another user.
        """
        want = bytes.fromhex(pnp)
        if not any(hmac.compare_digest(_cmac(k, sub.encode("utf-8")), want) for k in self._vau.live()):
            raise VauPseudonymError(
                "user pseudonym in the VAU path belongs to another user; send the request to /VAU/0"
            )
