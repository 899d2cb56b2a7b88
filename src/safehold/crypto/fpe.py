"""Format-preserving encryption: FF1 (NIST SP 800-38G Rev. 1), and FF3/FF3-1 *decryption only*.

FF1 (SP 800-38G Rev. 1 §5.1, Algorithms 7 and 8) is a 10-round Feistel network over numeral
strings in radix 2..65536, built on AES (here ``cryptography``'s AES; keys of 16, 24 or 32
bytes). This implementation works on Python integers between rounds and precomputes, per key,
the single-block AES encryptor and, per ``(message length, tweak)``, the CBC-MAC prefix state
and the ten round constants, so a round with a one-block ``Q`` costs one AES call, one XOR
and two int/bytes conversions.

The standard's minimum domain (Rev. 1 §5: ``radix ** minlen >= 1_000_000``) is enforced on
every call; a shorter message raises :class:`~safehold.errors.FPEError`.

FF3 and FF3-1 (SP 800-38G §5.2, Rev. 1 §5.2) are withdrawn for new data (NIST's 2025 draft
revision removes FF3-1). :class:`LegacyFF3Decryptor` only *decrypts* values that an older
system encrypted with FF3 (64-bit tweak) or FF3-1 (56-bit tweak), so they can be migrated to
FF1; there is deliberately no encrypt method.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from safehold.errors import FPEError

__all__ = ["FF1", "LegacyFF3Decryptor", "MIN_DOMAIN", "Alphabet", "DIGITS", "min_length"]

#: SP 800-38G Rev. 1 §5: radix ** minlen must be at least one million.
MIN_DOMAIN = 1_000_000
#: SP 800-38G Rev. 1: the radix is in 2..2**16.
MAX_RADIX = 65536
_MAXLEN = 2**32 - 1
#: FF1 round constants: ``(fast, b, d, mod_u, mod_v, ks, (state, tail))``, see ``FF1._round_consts``.
_RoundConsts = tuple[bool, int, int, int, int, list[int], tuple[int, bytes]]
_MAX_TWEAK = 2**32 - 1
_TWEAK_CACHE_MAX = 4096
DIGITS = "0123456789"
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class Alphabet:
    """An ordered set of distinct characters: numeral ``i`` is ``chars[i]``.

    Implements NUM_radix / STR^m_radix (SP 800-38G §4.5, Algorithms 1 and 3) over the
    alphabet with cached helpers: for radix <= 36, conversion goes through ``str.translate``
    and the C ``int(s, radix)``; output is built from a table of pre-rendered numeral chunks.

    Args:
        chars: 2..65536 distinct characters (any Unicode code points).

    Raises:
        FPEError: fewer than 2 or more than 65536 characters, or a repeated character.
    """

    __slots__ = ("chars", "radix", "_index", "_to_std", "_chunk", "_chunk_mod", "_chunk_tab", "_is_digits")

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise FPEError("alphabet must be a str")
        if not 2 <= len(chars) <= MAX_RADIX:
            raise FPEError(f"alphabet must have 2..{MAX_RADIX} characters, got {len(chars)}")
        if len(set(chars)) != len(chars):
            raise FPEError("alphabet characters must be distinct")
        self.chars = chars
        self.radix = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}
        self._is_digits = chars == DIGITS
        self._to_std = str.maketrans(dict(zip(chars, _BASE36, strict=False))) if self.radix <= 36 else None
        # Output chunk table: every numeral string of length k for the largest k with
        # radix**k <= 4096, so STR needs one divmod per k numerals.
        k = 1
        while self.radix ** (k + 1) <= 4096:
            k += 1
        self._chunk = k
        self._chunk_mod = self.radix**k
        self._chunk_tab: list[str] | None = None

    def __len__(self) -> int:
        return self.radix

    def __contains__(self, ch: object) -> bool:
        return ch in self._index

    def num(self, s: str) -> int:
        """NUM_radix(s) (SP 800-38G Algorithm 1). Raises FPEError for a character outside it."""
        try:
            if len(s) > 4000:  # beyond CPython's int/str conversion limit: fold by hand
                return self._num_slow(s)
            if self._is_digits:
                if s.isascii() and s.isdigit():
                    return int(s)
                raise ValueError
            if self._to_std is not None:
                if not all(c in self._index for c in s):
                    raise ValueError
                return int(s.translate(self._to_std), self.radix) if s else 0
            return self._num_slow(s)
        except (ValueError, KeyError):
            raise FPEError("input has a character outside the FPE alphabet") from None

    def _num_slow(self, s: str) -> int:
        x = 0
        r = self.radix
        idx = self._index
        for c in s:
            x = x * r + idx[c]
        return x

    def string(self, x: int, m: int) -> str:
        """STR^m_radix(x) (SP 800-38G Algorithm 3): ``m`` numerals, most significant first."""
        if self._is_digits and m <= 4000:
            return f"{x:0{m}d}"
        tab = self._chunk_tab
        if tab is None:
            tab = self._chunk_tab = self._build_chunks()
        k = self._chunk
        mod = self._chunk_mod
        parts: list[str] = []
        left = m
        while left >= k:
            x, r = divmod(x, mod)
            parts.append(tab[r])
            left -= k
        if left:
            parts.append(tab[x][k - left :])
        parts.reverse()
        return "".join(parts)

    def _build_chunks(self) -> list[str]:
        tab = [""]
        for _ in range(self._chunk):
            tab = [a + c for a in tab for c in self.chars]
        return tab


def _aes_block(key: bytes) -> Callable[[bytes], bytes]:
    """Per-key single-block AES-ECB encrypt function (CIPH_K of SP 800-38G §4.3)."""
    if not isinstance(key, (bytes, bytearray)) or len(key) not in (16, 24, 32):
        raise FPEError("FPE key must be 16, 24 or 32 bytes (AES-128/192/256)")
    # ECB is used only as the raw one-block primitive CIPH_K that FF1/FF3 are defined on.
    return Cipher(algorithms.AES(bytes(key)), modes.ECB()).encryptor().update  # noqa: S305


class FF1:
    """FF1 format-preserving encryption (NIST SP 800-38G Rev. 1 §5.1, Algorithms 7 and 8).

    Args:
        key: AES key, 16, 24 or 32 bytes.
        alphabet: the numeral alphabet (``str`` of 2..65536 distinct characters or an
            :class:`Alphabet`); default the ten ASCII digits.

    Messages are strings over the alphabet of length ``minlen..2**32-1`` where ``minlen`` is
    the smallest length with ``radix ** minlen >= 1_000_000`` (at least 2). Tweaks are bytes
    of length 0..2**32-1. Instances are not thread-safe (one AES context per instance).

    Raises (from the constructor and every method):
        FPEError: wrong key length, bad alphabet, message too short/long, character outside
            the alphabet, integer outside its domain.
    """

    __slots__ = ("alphabet", "radix", "minlen", "_aes", "_consts")

    def __init__(self, key: bytes, alphabet: str | Alphabet = DIGITS):
        self._aes = _aes_block(key)
        self.alphabet = alphabet if isinstance(alphabet, Alphabet) else Alphabet(alphabet)
        self.radix = self.alphabet.radix
        self.minlen = min_length(self.radix)
        # (radix, n, tweak) -> round constants, see _round_consts
        self._consts: dict[tuple[int, int, bytes], _RoundConsts] = {}

    # ---- string API ------------------------------------------------------------------------

    def encrypt(self, x: str, tweak: bytes = b"") -> str:
        """FF1.Encrypt(K, T, X) (Algorithm 7): same-length string over the same alphabet."""
        n = len(x)
        if n < self.minlen or n > _MAXLEN:
            raise FPEError(self._len_msg(n))
        u = n // 2
        alpha = self.alphabet
        a, b = self.encrypt_ints(alpha.num(x[:u]), alpha.num(x[u:]), n, tweak, self.radix)
        return alpha.string(a, u) + alpha.string(b, n - u)

    def decrypt(self, y: str, tweak: bytes = b"") -> str:
        """FF1.Decrypt(K, T, Y) (Algorithm 8): inverse of :meth:`encrypt`."""
        n = len(y)
        if n < self.minlen or n > _MAXLEN:
            raise FPEError(self._len_msg(n))
        u = n // 2
        alpha = self.alphabet
        a, b = self.decrypt_ints(alpha.num(y[:u]), alpha.num(y[u:]), n, tweak, self.radix)
        return alpha.string(a, u) + alpha.string(b, n - u)

    # ---- integer domain (rank-then-encipher) ------------------------------------------------

    def encrypt_int(self, value: int, domain: int, tweak: bytes = b"") -> int:
        """Encrypt ``0 <= value < domain`` to an integer in the same range.

        FF1 over radix-2 numeral strings of ``(domain-1).bit_length()`` bits, with cycle
        walking (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002) to stay
        inside the domain. ``domain`` must be >= 1,000,000 (SP 800-38G Rev. 1 minimum).
        """
        n, v, mask = self._int_params(value, domain)
        y = value
        while True:
            a, b = self.encrypt_ints(y >> v, y & mask, n, tweak, 2)
            y = (a << v) | b
            if y < domain:
                return y

    def decrypt_int(self, value: int, domain: int, tweak: bytes = b"") -> int:
        """Inverse of :meth:`encrypt_int` for the same key, domain and tweak."""
        n, v, mask = self._int_params(value, domain)
        y = value
        while True:
            a, b = self.decrypt_ints(y >> v, y & mask, n, tweak, 2)
            y = (a << v) | b
            if y < domain:
                return y

    @staticmethod
    def _int_params(value: int, domain: int) -> tuple[int, int, int]:
        if domain < MIN_DOMAIN:
            raise FPEError(f"FPE domain {domain} is below the SP 800-38G Rev. 1 minimum of {MIN_DOMAIN}")
        if not 0 <= value < domain:
            raise FPEError("FPE integer input is outside its domain")
        n = (domain - 1).bit_length()
        v = n - n // 2
        return n, v, (1 << v) - 1

    def _len_msg(self, n: int) -> str:
        return (
            f"FF1 message length {n} is outside {self.minlen}..{_MAXLEN} for radix {self.radix} "
            f"(SP 800-38G Rev. 1 requires radix**minlen >= {MIN_DOMAIN})"
        )

    # ---- core ------------------------------------------------------------------------------

    def _round_consts(self, radix: int, n: int, tweak: bytes) -> _RoundConsts:
        """Everything in a round that depends only on (key, radix, n, tweak).

        Returns ``(fast, b, d, mod_u, mod_v, ks, general)``. When ``1 + b <= 16`` (the last
        block of Q holds ``[i] || NUM(B)`` entirely) ``fast`` is true and ``ks`` is the list of
        ten ints ``K_i = state ^ (last-block prefix) ^ (i << 8b)``, where ``state`` is the
        CBC-MAC chain value after ``P || Q[:-16]``; the round's MAC input block is then
        ``K_i ^ NUM(B)``. Otherwise ``general`` is ``(state, prefix_tail_bytes)`` for the
        general path (and ``ks`` is empty).
        """
        if type(tweak) is not bytes:
            if not isinstance(tweak, (bytes, bytearray, memoryview)):
                raise FPEError("FF1 tweak must be bytes of length 0..2**32-1")
            tweak = bytes(tweak)
        key = (radix, n, tweak)
        c = self._consts.get(key)
        if c is not None:
            return c
        if len(tweak) > _MAX_TWEAK:
            raise FPEError("FF1 tweak must be bytes of length 0..2**32-1")
        t = len(tweak)
        u = n // 2
        v = n - u
        b = ((radix**v - 1).bit_length() + 7) // 8  # ceil(ceil(v*log2(radix))/8), exactly
        d = 4 * ((b + 3) // 4) + 4
        p = (
            bytes((1, 2, 1))
            + radix.to_bytes(3, "big")
            + bytes((10, u % 256))
            + n.to_bytes(4, "big")
            + t.to_bytes(4, "big")
        )
        aes = self._aes
        pad = (-t - b - 1) % 16
        prefix = tweak + bytes(pad)  # Q = prefix || [i] || [NUM(B)]^b
        qlen = t + pad + 1 + b
        # CBC-MAC over P and every full block of Q that lies inside the constant prefix
        fixed_blocks = (t + pad) // 16 if 1 + b > 16 else qlen // 16 - 1
        state = int.from_bytes(aes(p), "big")
        for off in range(0, 16 * fixed_blocks, 16):
            blk = int.from_bytes(prefix[off : off + 16], "big") ^ state
            state = int.from_bytes(aes(blk.to_bytes(16, "big")), "big")
        tail = prefix[16 * fixed_blocks :]
        if 1 + b <= 16:
            base = state ^ (int.from_bytes(tail, "big") << (8 * (b + 1)))
            ks = [base ^ (i << (8 * b)) for i in range(10)]
            general = (0, b"")
            fast = True
        else:
            ks = []
            general = (state, tail)
            fast = False
        c = (fast, b, d, radix**u, radix**v, ks, general)
        if len(self._consts) >= _TWEAK_CACHE_MAX:
            self._consts.clear()
        self._consts[key] = c
        return c

    def _prf_general(self, state: int, tail: bytes, i: int, bnum: int, b: int, d: int) -> int:
        """Round function for long Q or d > 16: CBC-MAC continuation and S extension."""
        aes = self._aes
        q = tail + bytes((i,)) + bnum.to_bytes(b, "big")
        r = state
        for off in range(0, len(q), 16):
            r = int.from_bytes(aes((int.from_bytes(q[off : off + 16], "big") ^ r).to_bytes(16, "big")), "big")
        return self._extend(r, d)

    def encrypt_ints(self, a: int, b_: int, n: int, tweak: bytes, radix: int) -> tuple[int, int]:
        """Algorithm 7 steps 6-7 on NUM(A), NUM(B) (lengths ``n//2`` and ``n - n//2``)."""
        fast, b, d, mod_u, mod_v, ks, (state, tail) = self._round_consts(radix, n, tweak)
        if fast and d <= 16:
            aes = self._aes
            shift = 8 * (16 - d)
            frm = int.from_bytes
            for i in range(0, 10, 2):
                y = frm(aes((ks[i] ^ b_).to_bytes(16, "big")), "big") >> shift
                a = (a + y) % mod_u
                y = frm(aes((ks[i + 1] ^ a).to_bytes(16, "big")), "big") >> shift
                b_ = (b_ + y) % mod_v
            return a, b_
        for i in range(10):
            y = self._prf_general_fast(ks[i] ^ b_, d) if fast else self._prf_general(state, tail, i, b_, b, d)
            a, b_ = b_, (a + y) % (mod_u if i % 2 == 0 else mod_v)
        return a, b_

    def decrypt_ints(self, a: int, b_: int, n: int, tweak: bytes, radix: int) -> tuple[int, int]:
        """Algorithm 8 steps 6-7 on NUM(A), NUM(B)."""
        fast, b, d, mod_u, mod_v, ks, (state, tail) = self._round_consts(radix, n, tweak)
        if fast and d <= 16:
            aes = self._aes
            shift = 8 * (16 - d)
            frm = int.from_bytes
            for i in range(9, 0, -2):
                y = frm(aes((ks[i] ^ a).to_bytes(16, "big")), "big") >> shift
                b_ = (b_ - y) % mod_v
                y = frm(aes((ks[i - 1] ^ b_).to_bytes(16, "big")), "big") >> shift
                a = (a - y) % mod_u
            return a, b_
        for i in range(9, -1, -1):
            y = self._prf_general_fast(ks[i] ^ a, d) if fast else self._prf_general(state, tail, i, a, b, d)
            a, b_ = (b_ - y) % (mod_u if i % 2 == 0 else mod_v), a
        return a, b_

    def _prf_general_fast(self, block: int, d: int) -> int:
        """One-block MAC (already XORed) followed by the S extension for d > 16."""
        return self._extend(int.from_bytes(self._aes(block.to_bytes(16, "big")), "big"), d)

    def _extend(self, r: int, d: int) -> int:
        if d <= 16:
            return r >> (8 * (16 - d))
        nblocks = -(-(d - 16) // 16)
        ext = self._aes(b"".join((r ^ j).to_bytes(16, "big") for j in range(1, nblocks + 1)))
        return int.from_bytes((r.to_bytes(16, "big") + ext)[:d], "big")


def min_length(radix: int) -> int:
    """Smallest message length with ``radix ** len >= 1_000_000`` and at least 2 (Rev. 1 §5)."""
    if not 2 <= radix <= MAX_RADIX:
        raise FPEError(f"radix must be in 2..{MAX_RADIX}, got {radix}")
    n = 2
    while radix**n < MIN_DOMAIN:
        n += 1
    return n


class LegacyFF3Decryptor:
    """**Decrypt-only** FF3 / FF3-1 for migrating data encrypted by older systems. Withdrawn.

    FF3 (SP 800-38G (2016) §5.2, Algorithm 10) was broken (Durak & Vaudenay 2017); FF3-1
    (SP 800-38G Rev. 1 draft, 56-bit tweak) is withdrawn in NIST's 2025 draft revision. Neither
    is offered for new data: there is no encrypt method. Re-encrypt what you decrypt with
    :class:`FF1`.

    Args:
        key: AES key as the legacy system stored it, 16, 24 or 32 bytes (the algorithm applies
            REVB(K) internally, as the standard specifies).
        alphabet: numeral alphabet (radix 2..2**16).

    Tweaks: 8 bytes selects original FF3 (T_L = T[0..3], T_R = T[4..7]); 7 bytes selects
    FF3-1 (T_L = T[0..27 bits] || 0^4, T_R = T[32..55 bits] || T[28..31 bits] || 0^4).

    Raises:
        FPEError: bad key, alphabet, tweak length, or message length outside
            ``minlen..2*floor(log_radix(2**96))``.
    """

    __slots__ = ("alphabet", "radix", "minlen", "maxlen", "_aes")

    def __init__(self, key: bytes, alphabet: str | Alphabet = DIGITS):
        if not isinstance(key, (bytes, bytearray)):
            raise FPEError("FF3 key must be bytes")
        self._aes = _aes_block(bytes(key)[::-1])
        self.alphabet = alphabet if isinstance(alphabet, Alphabet) else Alphabet(alphabet)
        self.radix = self.alphabet.radix
        self.minlen = min_length(self.radix)
        # maxlen = 2 * floor(log_radix(2**96)), computed exactly with integers
        k = 0
        while self.radix ** (k + 1) <= 2**96:
            k += 1
        self.maxlen = 2 * k

    def decrypt(self, y: str, tweak: bytes) -> str:
        """FF3.Decrypt / FF3-1.Decrypt(K, T, Y): the legacy plaintext for ciphertext ``y``."""
        n = len(y)
        if not self.minlen <= n <= self.maxlen:
            raise FPEError(
                f"FF3 message length {n} is outside {self.minlen}..{self.maxlen} for radix {self.radix}"
            )
        tl, tr = _ff3_tweak_halves(tweak)
        u = (n + 1) // 2
        v = n - u
        alpha = self.alphabet
        # State is kept as NUM_radix(REV(.)) of each half; REV is undone at the end.
        a = alpha.num(y[:u][::-1])
        b = alpha.num(y[u:][::-1])
        mod_u = self.radix**u
        mod_v = self.radix**v
        aes = self._aes
        for i in range(7, -1, -1):
            if i % 2 == 0:
                m_mod, w = mod_u, tr
            else:
                m_mod, w = mod_v, tl
            if a >= 1 << 96:
                raise FPEError("FF3 numeral half exceeds 96 bits")
            p = (w ^ i).to_bytes(4, "big") + a.to_bytes(12, "big")
            s = aes(p[::-1])[::-1]
            c = (b - int.from_bytes(s, "big")) % m_mod
            a, b = c, a
        return alpha.string(a, u)[::-1] + alpha.string(b, v)[::-1]


def _ff3_tweak_halves(tweak: bytes) -> tuple[int, int]:
    if not isinstance(tweak, (bytes, bytearray)):
        raise FPEError("FF3 tweak must be bytes")
    if len(tweak) == 8:
        return int.from_bytes(tweak[:4], "big"), int.from_bytes(tweak[4:], "big")
    if len(tweak) == 7:
        t = int.from_bytes(tweak, "big")  # 56 bits, T[0] the most significant
        tl = ((t >> 28) & 0xFFFFFFF) << 4
        tr = ((t & 0xFFFFFF) << 8) | (((t >> 24) & 0xF) << 4)
        return tl, tr
    raise FPEError(f"FF3 tweak must be 8 bytes (FF3) or 7 bytes (FF3-1), got {len(tweak)}")

