"""Per-value transforms of the encryption proxy: fpe, token, date-shift, deterministic,
randomized, mask, keep.

Each reversible transform takes the 32-byte keyset key with its id and derives its own
sub-key with :func:`safehold.crypto.kdf.derive_key` (purpose ``proxy/<transform>``, context =
the field name), so no two fields or transforms share a key. ``docs/proxy-leakage.md`` says
what each one leaks.

Value shapes: ``str`` in, ``str`` out; ``int`` (not ``bool``) in, ``int`` out for fpe/token
digits and for deterministic/randomized (which JSON-encode any JSON value). ``None`` and
``""`` pass through unchanged (absence is not hidden).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import re
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes, hmac

from safehold.crypto.envelope import envelope_key_id, open_with_key, seal_with_key
from safehold.crypto.fpe import FF1, Alphabet
from safehold.crypto.kdf import derive_key
from safehold.crypto.keyset import Keyset
from safehold.crypto.siv import SIV
from safehold.errors import CryptoError, FPEError, TransformError
from safehold.jsontypes import JSONValue
from safehold.proxy.schema import FieldSpec

__all__ = ["FieldTransform", "MAX_FPE_CHARS", "UPPER", "LOWER", "DIGITS", "CLASSES", "b64u", "unb64u"]

DIGITS = "0123456789"
#: Latin letters with the German umlauts, ß and the common French/Spanish accented letters.
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÜÀÁÂÇÈÉÊËÎÏÑÒÓÔÙÚÛ"
LOWER = "abcdefghijklmnopqrstuvwxyzäöüßàáâçèéêëîïñòóôùúû"
_NONZERO = "123456789"
CLASSES: dict[str, list[str]] = {
    "digits": [DIGITS],
    "letters": [UPPER, LOWER],
    "alnum": [DIGITS, UPPER, LOWER],
    "upper": [UPPER],
    "lower": [LOWER],
    # e-mail tokens stay plain ASCII so they remain syntactically valid addresses
    "ascii-alnum": [DIGITS, "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"],
}
_TOKEN_CLASSES = {"digits": "digits", "name": "letters", "email": "ascii-alnum", "alnum": "alnum"}
_VERSION = 1
_AD_PREFIX = b"safehold-proxy/v1"
#: Longest fpe/token value, in characters. FF1 (SP 800-38G Rev. 1) allows messages up to
#: 2**32-1 numerals, but its NUM/STR conversions make the cost grow with the square of the
#: length: one 384 KiB value took 17.5 s of CPU. FPE protects identifiers, names, phone
#: numbers and e-mail addresses, all far shorter; 4096 characters cost about 1 ms (digits) to
#: 15 ms (mixed letters and digits) per value, so a request's protection cost stays linear in
#: its size (cf. libffx, which caps FF1 messages at 8192 numerals). Use ``deterministic`` or
#: ``randomized`` (AES-SIV / AES-GCM, linear cost) for long free text.
MAX_FPE_CHARS = 4096


def b64u(data: bytes) -> str:
    """base64url without padding (RFC 4648 §5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    """Strict inverse of :func:`b64u`; raises ValueError on anything else."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


class _ClassCipher:
    """FF1 over the encryptable characters of a string, keeping each position's class.

    Characters in one of the classes are encrypted; other non-alphanumeric characters
    (spaces, dots, dashes, '@' ...) stay in place. When every encryptable character is in the
    same class, this is FF1 (SP 800-38G Rev. 1) over that class's alphabet directly; a pure
    digit string additionally keeps whether its first digit is zero (by cycle walking on
    strings with a non-zero first digit), so integers stay integers of the same length. Mixed
    classes are ranked into one integer of the mixed-radix domain and enciphered with
    :meth:`FF1.encrypt_int` (rank-then-encipher with cycle walking).
    """

    def __init__(self, key: bytes, classes: list[str]):
        self.alphas = [Alphabet(c) for c in classes]
        self.lookup: dict[str, tuple[int, int]] = {}
        for ci, a in enumerate(self.alphas):
            for d, ch in enumerate(a.chars):
                self.lookup.setdefault(ch, (ci, d))
        self.ff1s = [FF1(key, a) for a in self.alphas]
        self.ff1_int = FF1(key)
        self.digit_class = next((i for i, a in enumerate(self.alphas) if a.chars == DIGITS), -1)

    def run(self, text: str, tweak: bytes, keep: range | None, decrypt: bool) -> str:
        lookup = self.lookup
        pos: list[int] = []
        cls: list[int] = []
        digs: list[int] = []
        for i, ch in enumerate(text):
            e = lookup.get(ch)
            if e is None or (keep is not None and i in keep):
                if e is None and ch.isalnum():
                    raise TransformError("has a character outside the field's alphabet")
                continue
            pos.append(i)
            cls.append(e[0])
            digs.append(e[1])
        if not pos:
            return text
        c0 = cls[0]
        chars = list(text)
        if all(c == c0 for c in cls):
            sub = "".join(chars[p] for p in pos)
            if c0 == self.digit_class:
                out = self._digits(sub, tweak, decrypt)
            else:
                f = self.ff1s[c0]
                out = f.decrypt(sub, tweak) if decrypt else f.encrypt(sub, tweak)
            for p, ch in zip(pos, out, strict=True):
                chars[p] = ch
            return "".join(chars)
        radixes = [self.alphas[c].radix for c in cls]
        x = 0
        domain = 1
        for r, d in zip(radixes, digs, strict=True):
            x = x * r + d
            domain *= r
        f = self.ff1_int
        y = f.decrypt_int(x, domain, tweak) if decrypt else f.encrypt_int(x, domain, tweak)
        for k in range(len(pos) - 1, -1, -1):
            y, d = divmod(y, radixes[k])
            chars[pos[k]] = self.alphas[cls[k]].chars[d]
        return "".join(chars)

    def _digits(self, s: str, tweak: bytes, decrypt: bool) -> str:
        f = self.ff1s[self.digit_class]
        if s[0] == "0":  # leading zero kept; FF1 over the rest
            rest = f.decrypt(s[1:], tweak) if decrypt else f.encrypt(s[1:], tweak)
            return "0" + rest
        # cycle walking within the strings whose first digit is non-zero
        step = f.decrypt if decrypt else f.encrypt
        if len(s) < f.minlen:
            step(s, tweak)  # raises the domain error
        out = step(s, tweak)
        while out[0] == "0":
            out = step(out, tweak)
        return out


class FieldTransform:
    """The transform of one schema field; caches derived keys and ciphers per key id.

    Methods take ``(key_id, key)`` with ``key`` the 32-byte keyset key, and ``ctx`` the
    context field's plaintext (``str``) for contextual transforms, else ``None``.

    Raises (all methods): TransformError naming the field (never the value) when a value
    cannot be transformed: wrong type, character outside the alphabet, domain below the FPE
    minimum, unparseable date, malformed/tampered/wrong-key ciphertext.
    """

    def __init__(self, spec: FieldSpec):
        self.spec = spec
        self._cache: dict[int, Any] = {}
        if spec.transform == "fpe":
            alpha = spec.alphabet
            self._classes = [alpha[len("custom:") :]] if alpha.startswith("custom:") else CLASSES[alpha]
        elif spec.transform == "token":
            self._classes = CLASSES[_TOKEN_CLASSES[spec.kind]]

    # ---- helpers ---------------------------------------------------------------------------

    def _err(self, msg: str) -> TransformError:
        return TransformError(f"field {self.spec.name!r} ({self.spec.transform}): {msg}")

    def _material(self, key_id: int, key: bytes) -> Any:
        m = self._cache.get(key_id)
        if m is not None:
            return m
        t = self.spec.transform
        ctx = self.spec.name.encode("utf-8")
        purpose = "proxy/" + t
        if t in ("fpe", "token"):
            m = _ClassCipher(derive_key(key, purpose=purpose, context=ctx), self._classes)
        elif t == "deterministic":
            m = SIV(derive_key(key, purpose=purpose, context=ctx, length=64))
        elif t == "randomized":
            m = derive_key(key, purpose=purpose, context=ctx)
        elif t == "date-shift":
            # no field name in the context: every date field of a record shifts by the same days
            if self.spec.context is None:  # the schema requires one; refuse rather than guess
                raise self._err("date-shift needs a context field")
            m = derive_key(key, purpose=purpose, context=self.spec.context.encode("utf-8"))
        else:
            m = None
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key_id] = m
        return m

    @staticmethod
    def _is_empty(v: Any) -> bool:
        return v is None or v == ""

    # ---- public ----------------------------------------------------------------------------

    def protect(self, value: JSONValue, key_id: int, key: bytes, ctx: str | None = None) -> JSONValue:
        """Protect one value (see the module docstring for shapes)."""
        if self._is_empty(value):
            return value
        t = self.spec.transform
        if t == "keep":
            return value
        if t == "mask":
            return self._mask(value)
        if t in ("fpe", "token"):
            return self._fpe(value, key_id, key, ctx, decrypt=False)
        if t == "date-shift":
            return self._date(value, key_id, key, ctx, reveal=False)
        if t == "deterministic":
            return self._det_protect(value, key_id, key)
        return self._rnd_protect(value, key_id, key)

    def reveal(
        self, value: JSONValue, key_id: int | None, keyset: Keyset, ctx: str | None = None
    ) -> JSONValue:
        """Invert :meth:`protect`. ``key_id`` is the record's tag (fpe/token/date-shift); the
        deterministic and randomized forms carry their own key id."""
        if self._is_empty(value):
            return value
        t = self.spec.transform
        if t in ("keep", "mask"):
            return value
        try:
            if t in ("fpe", "token", "date-shift"):
                if key_id is None:
                    raise self._err("record has no key-id tag")
                key = keyset.key(key_id)
                if t == "date-shift":
                    return self._date(value, key_id, key, ctx, reveal=True)
                return self._fpe(value, key_id, key, ctx, decrypt=True)
            if t == "deterministic":
                return self._det_reveal(value, keyset)
            return self._rnd_reveal(value, keyset)
        except TransformError:
            raise
        except CryptoError as e:  # UnknownKeyError, DecryptionError, EnvelopeFormatError
            raise self._err(str(e)) from None

    # ---- mask ------------------------------------------------------------------------------

    def _mask(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise self._err(f"cannot mask a {type(value).__name__}")
        s = str(value)
        alnum = [i for i, c in enumerate(s) if c.isalnum()]
        keep = set(alnum[len(alnum) - self.spec.keep_last :]) if self.spec.keep_last else set()
        mc = self.spec.mask_char
        return "".join(c if (i in keep or not c.isalnum()) else mc for i, c in enumerate(s))

    # ---- fpe / token -----------------------------------------------------------------------

    def _fpe(self, value: Any, key_id: int, key: bytes, ctx: str | None, decrypt: bool) -> Any:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not (is_int or isinstance(value, str)):
            raise self._err(f"expected a string or integer, got {type(value).__name__}")
        text = str(value)
        if len(text) > MAX_FPE_CHARS:
            raise self._err(f"value is {len(text)} characters long, over the {self.spec.transform} cap of "
                            f"{MAX_FPE_CHARS} (FF1 cost grows with the square of the length; use "
                            "deterministic or randomized for long text)")
        if is_int and self._classes[0] != DIGITS:
            raise self._err("integer value needs a digits alphabet")
        tweak = b"" if self.spec.consistent else self._ctx_bytes(ctx)
        keep: range | None = None
        if self.spec.transform == "token" and self.spec.kind == "email":
            at = text.rfind("@")
            dot = text.rfind(".")
            if at <= 0 or dot < at:
                raise self._err("is not an e-mail address (local@domain.tld)")
            keep = range(dot, len(text))  # the top-level domain stays readable
        try:
            out = self._material(key_id, key).run(text, tweak, keep, decrypt)
        except FPEError as e:
            raise self._err(str(e)) from None
        except TransformError as e:
            raise self._err(str(e)) from None
        return int(out) if is_int else out

    def _ctx_bytes(self, ctx: str | None) -> bytes:
        if ctx is None or ctx == "":
            raise self._err(f"context field {self.spec.context!r} is missing")
        return ctx.encode("utf-8")

    # ---- date shift ------------------------------------------------------------------------

    def shift_days(self, key_id: int, key: bytes, ctx: str) -> int:
        """Days to shift: HMAC-SHA256(derived key, context value) mapped into the schema's
        ``[min_days, max_days]`` without 0. Same key, context and bounds -> same shift."""
        mac = hmac.HMAC(self._material(key_id, key), hashes.SHA256())
        mac.update(struct.pack(">ii", self.spec.min_days, self.spec.max_days) + ctx.encode("utf-8"))
        n = int.from_bytes(mac.finalize()[:8], "big")
        lo, hi = self.spec.min_days, self.spec.max_days
        choices = hi - lo + 1 - (1 if lo <= 0 <= hi else 0)
        s = lo + n % choices
        if lo <= 0 <= hi and s >= 0:
            s += 1
        return s

    def _date(self, value: Any, key_id: int, key: bytes, ctx: str | None, reveal: bool) -> str:
        if not isinstance(value, str):
            raise self._err(f"expected a date string, got {type(value).__name__}")
        days = self.shift_days(key_id, key, self._ctx_bytes(ctx).decode("utf-8"))
        if reveal:
            days = -days
        fmt, parsed = _parse_date(value, self.spec.date_format)
        if parsed is None:
            raise self._err(f"is not a date in format {self.spec.date_format}")
        try:
            if fmt == "YYYY":
                year = parsed[0] + round(days / 365.2425)
                if not 1 <= year <= 9999:
                    raise OverflowError
                return f"{year:04d}"
            if fmt == "YYYY-MM":
                months = parsed[0] * 12 + parsed[1] - 1 + round(days / 30.436875)
                year, month = divmod(months, 12)
                if not 1 <= year <= 9999:
                    raise OverflowError
                return f"{year:04d}-{month + 1:02d}"
            y, m, d, suffix = parsed
            new = _dt.date(y, m, d) + _dt.timedelta(days=days)
        except (OverflowError, ValueError):
            raise self._err("shifted date is outside years 1..9999") from None
        if fmt == "DD.MM.YYYY":
            return f"{new.day:02d}.{new.month:02d}.{new.year:04d}"
        if fmt == "MM/DD/YYYY":
            return f"{new.month:02d}/{new.day:02d}/{new.year:04d}"
        return f"{new.year:04d}-{new.month:02d}-{new.day:02d}{suffix}"

    # ---- deterministic (AES-SIV) -----------------------------------------------------------

    def _ad(self, key_id: int) -> list[bytes]:
        return [_AD_PREFIX, struct.pack(">BI", _VERSION, key_id), self.spec.name.encode("utf-8")]

    def _det_protect(self, value: Any, key_id: int, key: bytes) -> str:
        pt = _json_bytes(value, self._err)
        ct = self._material(key_id, key).encrypt(pt, self._ad(key_id))
        return b64u(struct.pack(">BI", _VERSION, key_id) + ct)

    def _det_reveal(self, value: Any, keyset: Keyset) -> Any:
        try:
            raw = unb64u(value)
        except ValueError:
            raise self._err("is not a deterministic ciphertext (base64url)") from None
        if len(raw) < 5 + 17 or raw[0] != _VERSION:
            raise self._err("deterministic ciphertext is truncated or of an unknown version")
        key_id = struct.unpack(">I", raw[1:5])[0]
        pt = self._material(key_id, keyset.key(key_id)).decrypt(raw[5:], self._ad(key_id))
        return _json_load(pt, self._err)

    # ---- randomized (AES-256-GCM envelope) --------------------------------------------------

    def _rnd_aad(self) -> bytes:
        return _AD_PREFIX + b"/randomized/" + self.spec.name.encode("utf-8")

    def _rnd_protect(self, value: Any, key_id: int, key: bytes) -> str:
        pt = _json_bytes(value, self._err)
        return b64u(seal_with_key(key_id, self._material(key_id, key), pt, self._rnd_aad()))

    def _rnd_reveal(self, value: Any, keyset: Keyset) -> Any:
        try:
            blob = unb64u(value)
        except ValueError:
            raise self._err("is not a randomized ciphertext (base64url)") from None
        key_id = envelope_key_id(blob)
        pt = open_with_key(key_id, self._material(key_id, keyset.key(key_id)), blob, self._rnd_aad())
        return _json_load(pt, self._err)


def _json_bytes(value: Any, err: Any) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        raise err(f"value of type {type(value).__name__} is not JSON") from None


def _json_load(pt: bytes, err: Any) -> Any:
    try:
        return json.loads(pt.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise err("decrypted value is not JSON") from None


_DATE_RES: list[tuple[str, re.Pattern[str]]] = [
    ("DD.MM.YYYY", re.compile(r"(\d{2})\.(\d{2})\.(\d{4})")),
    # ISO 8601 date, optionally with a time and zone that are kept unchanged
    ("YYYY-MM-DD", re.compile(
        r"(\d{4})-(\d{2})-(\d{2})((?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?)"
    )),
    ("MM/DD/YYYY", re.compile(r"(\d{2})/(\d{2})/(\d{4})")),
    ("YYYY-MM", re.compile(r"(\d{4})-(\d{2})")),
    ("YYYY", re.compile(r"(\d{4})")),
]


def _parse_date(text: str, fmt: str) -> tuple[str, Any]:
    """``(format, (y, m, d, suffix))`` or ``(format, (y,))`` for year-only; ``None`` if no match
    or an invalid calendar date. ``YYYY-MM-DD`` keeps a time/zone suffix unchanged."""
    for name, rx in _DATE_RES:
        if fmt not in ("auto", name):
            continue
        m = rx.fullmatch(text)
        if not m:
            continue
        if name == "YYYY":
            return name, (int(m.group(1)),)
        if name == "YYYY-MM":
            y, mo = int(m.group(1)), int(m.group(2))
            return name, ((y, mo) if 1 <= mo <= 12 else None)
        if name == "DD.MM.YYYY":
            d, mo, y, suffix = int(m.group(1)), int(m.group(2)), int(m.group(3)), ""
        elif name == "MM/DD/YYYY":
            mo, d, y, suffix = int(m.group(1)), int(m.group(2)), int(m.group(3)), ""
        else:
            y, mo, d, suffix = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) or ""
        try:
            _dt.date(y, mo, d)
        except ValueError:
            return name, None
        return name, (y, mo, d, suffix)
    return fmt, None
