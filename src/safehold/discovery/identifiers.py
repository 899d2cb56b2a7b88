"""Identifier kinds for contact discovery: normalisation, validation, and the OPRF input.

Built in:

* ``e164`` — telephone numbers, parsed and validated with ``phonenumbers`` (Google's
  libphonenumber metadata) and written in E.164 form (ITU-T E.164: ``+`` country code national
  number, at most 15 digits). A number without ``+`` needs a default region (``DE``, ``NL``...).
* ``kvnr`` — the unchangeable part of the German health insurance number
  (Krankenversichertennummer, KVNR, § 290 SGB V): 10 characters, an upper-case letter and
  9 digits, the last being the check digit. Check digit (the GKV-Spitzenverband's KVNR rules, as
  implemented in gematik's E-Rezept Fachdienst ``Kvnr::validChecksum``): the letter becomes its
  two-digit position in the alphabet (A = 01 … Z = 26), followed by the next 8 digits; these
  10 digits are weighted 1, 2, 1, 2, … from the left; a product above 9 is replaced by its
  digit sum; the check digit is the total modulo 10.

Other kinds plug in through :func:`register_kind` (an object with ``name`` and
``normalise(text, region)``).

The OPRF input is :func:`oprf_input`: ``b"safehold-discovery/v1" 0x00 kind 0x00 canonical``, so
equal strings of different kinds never collide. Errors never echo the identifier.
"""

from __future__ import annotations

import re
from typing import Protocol

import phonenumbers

from safehold.discovery.errors import InvalidIdentifierError

_DOMAIN = b"safehold-discovery/v1"
_KIND_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class IdentifierKind(Protocol):
    """A pluggable identifier kind."""

    name: str

    def normalise(self, text: str, region: str | None = None) -> str:
        """The canonical form of ``text``; raises InvalidIdentifierError if it is not valid."""
        ...


class E164:
    """Telephone numbers in E.164 form (``+4930123456``), validated against libphonenumber's
    metadata (``is_valid_number``: a number that can be assigned in its region)."""

    name = "e164"

    def normalise(self, text: str, region: str | None = None) -> str:
        """``+<country code><national number>``.

        Args:
            text: any common notation (spaces, dashes, parentheses, ``00`` or ``+`` prefix).
            region: ISO 3166-1 alpha-2 region for numbers written without ``+`` (e.g. ``DE``).

        Raises:
            InvalidIdentifierError: unparsable, or not a valid number.
        """
        if not isinstance(text, str) or not text.strip():
            raise InvalidIdentifierError("e164: empty phone number")
        try:
            num = phonenumbers.parse(text.strip(), region.upper() if region else None)
        except phonenumbers.NumberParseException as e:
            hint = " (no '+' and no default region)" if e.error_type == e.INVALID_COUNTRY_CODE else ""
            raise InvalidIdentifierError(f"e164: not a phone number{hint}") from None
        if not phonenumbers.is_valid_number(num):
            raise InvalidIdentifierError("e164: not a valid number for its country")
        return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


def kvnr_check_digit(first9: str) -> int:
    """The KVNR check digit of a letter followed by 8 digits (see the module docstring).

    Raises:
        InvalidIdentifierError: ``first9`` is not an upper-case letter plus 8 digits.
    """
    if not re.fullmatch(r"[A-Z][0-9]{8}", first9):
        raise InvalidIdentifierError("kvnr: expected a letter A-Z followed by digits")
    digits = f"{ord(first9[0]) - ord('A') + 1:02d}" + first9[1:]
    total = 0
    for i, d in enumerate(digits):
        p = int(d) * (1 if i % 2 == 0 else 2)
        total += p - 9 if p > 9 else p
    return total % 10


class KVNR:
    """The 10-character KVNR (``A123456780``); spaces are dropped and letters upper-cased."""

    name = "kvnr"

    def normalise(self, text: str, region: str | None = None) -> str:
        """The canonical KVNR.

        Raises:
            InvalidIdentifierError: not a letter and 9 digits, or a wrong check digit.
        """
        if not isinstance(text, str):
            raise InvalidIdentifierError("kvnr: must be a string")
        value = "".join(text.split()).upper()
        if not re.fullmatch(r"[A-Z][0-9]{9}", value):
            raise InvalidIdentifierError("kvnr: expected 10 characters, a letter A-Z and 9 digits")
        if kvnr_check_digit(value[:9]) != int(value[9]):
            raise InvalidIdentifierError("kvnr: wrong check digit")
        return value


_KINDS: dict[str, IdentifierKind] = {}


def register_kind(kind: IdentifierKind) -> None:
    """Make ``kind`` available by its ``name`` (lower-case letters, digits, ``-``; ≤ 32 chars).

    Raises:
        ValueError: a bad name, or the name is taken by another object.
    """
    if not isinstance(kind.name, str) or not _KIND_NAME.match(kind.name):
        raise ValueError(f"identifier kind name must match {_KIND_NAME.pattern}")
    if _KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"identifier kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind


def kinds() -> list[str]:
    """Names of the registered kinds."""
    return sorted(_KINDS)


def get_kind(name: str) -> IdentifierKind:
    """The kind called ``name``.

    Raises:
        InvalidIdentifierError: no such kind.
    """
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise InvalidIdentifierError(f"unknown identifier kind {str(name)[:40]!r}; known: {kinds()}")
    return kind


def normalise(kind: str, text: str, region: str | None = None) -> str:
    """Canonical form of ``text`` as an identifier of ``kind`` (raises InvalidIdentifierError)."""
    return get_kind(kind).normalise(text, region)


def oprf_input(kind: str, canonical: str) -> bytes:
    """The RFC 9497 input for a canonical identifier: domain, kind and value, 0x00-separated.

    The canonical value is normalised again and must come back unchanged (fail closed on a
    caller that skipped normalisation).

    Raises:
        InvalidIdentifierError: unknown kind, or ``canonical`` is not in canonical form.
    """
    k = get_kind(kind)
    if k.normalise(canonical) != canonical:
        raise InvalidIdentifierError(f"{kind}: identifier is not in canonical form")
    return _DOMAIN + b"\x00" + kind.encode("ascii") + b"\x00" + canonical.encode("utf-8")


register_kind(E164())
register_kind(KVNR())
