"""Search tokens: what a record is findable by, as terms for the keyed blind index.

Framework-free. :func:`record_tokens` turns a record into the set of terms that
:class:`~safehold.records.search.PostingIndex` blinds (one posting row per term and record);
the query side (:mod:`safehold.records.fhir.search`, the native search in
:mod:`safehold.records.repository`) builds the same terms from a search value and re-checks every
candidate against the decrypted record, so a term only has to find a *superset* of the matches.
What the database learns from these terms is written down in ``docs/search-leakage.md``.

**Normalisation** (:func:`fold`), the FHIR R4 ``string`` rule "case- and accent-insensitive"
(R4 §3.1.1.4.7): Unicode NFKD, case-folded (``ß`` → ``ss``), combining marks removed
(``Königsstein`` → ``konigsstein``), a few letters without a decomposition mapped (``ø`` → ``o``,
``ł`` → ``l``, ``æ`` → ``ae``, ``œ`` → ``oe``, ``đ``/``ð`` → ``d``, ``þ`` → ``th``), blanks
collapsed. German spelling without umlauts (``Mueller`` for ``Müller``) is found through a second
token set (:func:`german_variant`) made only for values that hold ``ä``, ``ö`` or ``ü``.

**Terms** (``<field>`` as below; values folded):

==========================  ===================================================================
``<field>=<value>``         the whole value (equality; the native API's exact search, FHIR
                            ``:exact`` and ``identifier``)
``<field>^<prefix>``        prefixes of :data:`MIN_PREFIX` .. :data:`MAX_PREFIX` characters,
                            taken at the start of the value and at every word start inside it
                            (``graf freiherr von schaumberg`` → ``gr``.. , ``fr``.., ``vo``..,
                            ``sc``..``schaumbe``); a longer query is looked up by its first
                            :data:`MAX_PREFIX` characters and re-checked
``birthdate<<digits>``      date membership: the birth date lies in this millennium, century,
                            decade, year, month or day (``1``, ``19``, ``197``, ``1974``,
                            ``197412``, ``19741225``) — :func:`date_tokens`
``birthdate@<digits>``      the date's own precision (``1974`` for a year-only birth date), so
                            range searches also find coarser dates that overlap them
``ref:<Type>=<id>``         a FHIR resource's ``subject`` / ``patient`` reference target id
==========================  ===================================================================

Fields: ``family``, ``given`` (both with prefix terms), ``name`` (prefix terms of a
``HumanName.text`` whose name has neither family nor given, e.g. ``张无忌``), ``identifier``
(whole values only), ``birthDate`` (the whole value when it is not an ISO date: SCONE's ``dob``).
``gender`` is not indexed (four values: a term would tell the database every record's gender).

**Budget**: at most :data:`TOKEN_BUDGET` terms per record, kept in this order: identifiers,
whole values, date terms, references, then prefixes; a record that has more (dozens of names)
keeps the first :data:`TOKEN_BUDGET` and the rest of its prefixes are not findable by search
(reads by id are unaffected). The cut is logged, without content.
"""

from __future__ import annotations

import calendar
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from datetime import date
from typing import Any

__all__ = [
    "MAX_PREFIX",
    "MIN_PREFIX",
    "TOKEN_BUDGET",
    "DateRange",
    "count_tokens",
    "date_cover",
    "date_range",
    "date_tokens",
    "fold",
    "native_term",
    "german_variant",
    "prefix_matches",
    "record_tokens",
    "reference_id",
    "string_prefix_term",
    "string_tokens",
    "word_starts",
]

#: Shortest prefix that has a term (a one-letter prefix would split every name by its initial).
MIN_PREFIX = 2
#: Longest prefix that has a term; longer queries use this prefix and are re-checked.
MAX_PREFIX = 8
#: Most terms one record gets (see the module docstring for what is kept).
TOKEN_BUDGET = 160

log = logging.getLogger("safehold.records")

_SPECIAL = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "ŀ": "l",
                          "æ": "ae", "œ": "oe", "þ": "th", "ŧ": "t"})
_UMLAUT = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue"})
_ISO_DATE = re.compile(r"([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2}))?)?")
#: Lengths of the date-membership levels (millennium, century, decade, year, month, day).
_DATE_LEVELS = (1, 2, 3, 4, 6, 8)


def fold(value: str) -> str:
    """Fold a string for search: NFKD, case-folded, combining marks removed, special letters
    mapped, blanks collapsed (module docstring). ``fold("  Königs-STEIN ")`` → ``"konigs-stein"``.

    ASCII text takes a shortcut with the same result: NFKD leaves ASCII as it is, ASCII has no
    combining marks and none of the mapped letters, and its case folding is ``lower()``."""
    if value.isascii():
        return " ".join(value.lower().split())
    v = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", value).casefold())
    v = "".join(ch for ch in v if not unicodedata.combining(ch)).translate(_SPECIAL)
    return " ".join(v.split())


def german_variant(value: str) -> str | None:
    """The folded value with ``ä ö ü`` spelt ``ae oe ue`` (``Müller`` → ``mueller``), or None
    when the value has no umlaut."""
    if value.isascii():  # NFC and case folding keep ASCII ASCII: no umlaut can appear
        return None
    v = unicodedata.normalize("NFC", value).casefold()
    if not any(ch in v for ch in "äöü"):
        return None
    return fold(v.translate(_UMLAUT))


def word_starts(folded: str) -> list[int]:
    """Offsets where a word starts: 0 and every letter or digit after a non-alphanumeric one
    (blank, hyphen, apostrophe)."""
    return [i for i, ch in enumerate(folded)
            if ch.isalnum() and (i == 0 or not folded[i - 1].isalnum())]


def prefix_matches(query_folded: str, value: str) -> bool:
    """FHIR ``string`` match as Safehold does it: the folded value (or its German variant)
    starts with the folded query at its start or at a word start."""
    for v in filter(None, (fold(value), german_variant(value))):
        if any(v.startswith(query_folded, i) for i in word_starts(v)):
            return True
    return False


def string_prefix_term(field: str, query_folded: str) -> str:
    """The term a prefix query is looked up by: its first :data:`MAX_PREFIX` characters."""
    return f"{field}^{query_folded[:MAX_PREFIX]}"


def _prefixes(folded: str) -> Iterator[str]:
    for i in word_starts(folded):
        tail = folded[i:]
        for n in range(MIN_PREFIX, min(len(tail), MAX_PREFIX) + 1):
            p = tail[:n]
            if not p[-1].isspace():
                yield p


def string_tokens(field: str, value: str, *, whole: bool = True,
                  prefixes: bool = True) -> tuple[list[str], list[str]]:
    """``(whole-value terms, prefix terms)`` of one string value (module docstring)."""
    out_whole: list[str] = []
    out_prefix: list[str] = []
    for v in dict.fromkeys(filter(None, (fold(value), german_variant(value)))):
        if whole:
            out_whole.append(f"{field}={v}")
        if prefixes:
            out_prefix.extend(f"{field}^{p}" for p in dict.fromkeys(_prefixes(v)))
    return out_whole, out_prefix


# --- dates ---------------------------------------------------------------------------------------


class DateRange(tuple[int, int]):
    """An inclusive range of proleptic Gregorian day ordinals (:meth:`datetime.date.toordinal`)."""

    __slots__ = ()

    @property
    def lo(self) -> int:
        """First day."""
        return self[0]

    @property
    def hi(self) -> int:
        """Last day."""
        return self[1]


def _digits(value: str) -> str | None:
    """``YYYY``, ``YYYYMM`` or ``YYYYMMDD`` of a valid FHIR ``date`` (R4 §2.24.0.1), else None."""
    m = _ISO_DATE.fullmatch(value) if isinstance(value, str) else None
    if not m:
        return None
    y, mo, d = m.groups()
    if int(y) < 1:
        return None
    if mo is not None and not 1 <= int(mo) <= 12:
        return None
    if d is not None and not 1 <= int(d) <= calendar.monthrange(int(y), int(mo))[1]:
        return None
    return y + (mo or "") + (d or "")


def _node_range(digits: str) -> DateRange:
    """The days a date-tree node covers (a prefix of ``YYYYMMDD`` of length 1..4, 6 or 8)."""
    if len(digits) <= 4:
        pad = 4 - len(digits)
        y0 = max(1, int(digits) * 10**pad)
        y1 = int(digits) * 10**pad + 10**pad - 1
        return DateRange((date(y0, 1, 1).toordinal(), date(y1, 12, 31).toordinal()))
    y, m = int(digits[:4]), int(digits[4:6])
    if len(digits) == 6:
        return DateRange((date(y, m, 1).toordinal(), date(y, m, calendar.monthrange(y, m)[1]).toordinal()))
    d = date(y, m, int(digits[6:8])).toordinal()
    return DateRange((d, d))


def date_range(value: str) -> DateRange | None:
    """The days a FHIR ``date`` value covers (``1974`` → the whole year), None if not a date."""
    d = _digits(value)
    return _node_range(d) if d is not None else None


def date_tokens(field: str, value: str) -> list[str]:
    """Membership terms for every level down to the value's precision, plus its precision term;
    ``[]`` for a value that is not a FHIR ``date``."""
    d = _digits(value)
    if d is None:
        return []
    return [f"{field}<{d[:n]}" for n in _DATE_LEVELS if n <= len(d)] + [f"{field}@{d}"]


def _children(digits: str) -> list[str]:
    if len(digits) < 4:
        return [c for c in (digits + str(i) for i in range(10)) if c != "0000"]  # no year 0
    if len(digits) == 4:
        return [f"{digits}{m:02d}" for m in range(1, 13)]
    y, m = int(digits[:4]), int(digits[4:6])
    return [f"{digits}{d:02d}" for d in range(1, calendar.monthrange(y, m)[1] + 1)]


def date_cover(field: str, lo: int, hi: int) -> list[str]:
    """Terms whose postings hold every record with a date overlapping days ``[lo, hi]``.

    The minimal set of date-tree nodes inside the range (membership terms) plus the precision
    terms of the year and month nodes the range only partly covers (a year-only date overlaps a
    range that starts in June). At most about 160 terms for any range (open ends are clamped to
    0001-01-01 and 9999-12-31).
    """
    lo = max(lo, date(1, 1, 1).toordinal())
    hi = min(hi, date(9999, 12, 31).toordinal())
    out: list[str] = []

    def walk(node: str) -> None:
        if node:
            r = _node_range(node)
            if r.hi < lo or r.lo > hi:
                return
            if lo <= r.lo and r.hi <= hi:
                out.append(f"{field}<{node}")
                return
            if len(node) in (4, 6):
                out.append(f"{field}@{node}")
        if len(node) < 8:
            for child in _children(node):
                walk(child)

    if lo <= hi:
        walk("")
    return out


# --- records -------------------------------------------------------------------------------------


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []


def _text(v: object) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


def reference_id(ref: object) -> tuple[str | None, str] | None:
    """``(type or None, id)`` of a FHIR ``Reference.reference`` (``Patient/123``, an absolute
    URL ending in ``Patient/123``, ``Patient/123/_history/2``, ``urn:uuid:…``); None otherwise."""
    if not isinstance(ref, str) or not ref.strip():
        return None
    r = ref.strip()
    if r.startswith("urn:uuid:"):
        return None, r[len("urn:uuid:"):]
    parts = [p for p in r.split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    if len(parts) == 1:
        return None, parts[0]
    return None


def _fields(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """Raw searchable values by field, for the three record shapes of
    :func:`safehold.records.model.search_terms` and for other FHIR resources."""
    f: dict[str, list[str]] = {k: [] for k in ("family", "given", "name", "birthDate", "identifier")}
    refs: list[str] = []
    rt = record.get("resourceType")
    if rt == "Patient":
        for n in _list(record.get("name")):
            if not isinstance(n, dict):
                continue
            fam, giv = _text(n.get("family")), [g for g in map(_text, _list(n.get("given"))) if g]
            if fam:
                f["family"].append(fam)
            f["given"] += giv
            if not fam and not giv and _text(n.get("text")):
                f["name"].append(n["text"])
        if _text(record.get("birthDate")):
            f["birthDate"].append(record["birthDate"])
        for ident in _list(record.get("identifier")):
            if isinstance(ident, dict) and _text(ident.get("value")):
                f["identifier"].append(ident["value"])
    elif isinstance(rt, str):
        for el in ("subject", "patient"):
            ref = record.get(el)
            target = reference_id(ref.get("reference")) if isinstance(ref, dict) else None
            if target is not None:
                refs.append(target[1])
    elif "Id" in record and ("LAST" in record or "FIRST" in record):
        for k, col in (("family", "LAST"), ("given", "FIRST"), ("birthDate", "BIRTHDATE")):
            if _text(record.get(col)):
                f[k].append(record[col])
        f["identifier"] += [record[c] for c in ("Id", "SSN", "DRIVERS", "PASSPORT") if _text(record.get(c))]
    else:
        for k, col in (("family", "lname"), ("given", "fname"), ("birthDate", "dob"), ("identifier", "ssn")):
            if _text(record.get(col)):
                f[k].append(record[col])
    f["ref"] = refs
    return f


def record_tokens(record: Mapping[str, Any], *, budget: int = TOKEN_BUDGET) -> frozenset[str]:
    """The terms a record is posted under (module docstring), at most ``budget``."""
    f = _fields(record)
    ident = [f"identifier={fold(v)}" for v in f["identifier"]]
    whole: list[str] = []
    prefix: list[str] = []
    for field in ("family", "given"):
        for v in f[field]:
            w, p = string_tokens(field, v)
            whole += w
            prefix += p
    for v in f["name"]:
        prefix += string_tokens("name", v, whole=False)[1]
    dates: list[str] = []
    for v in f["birthDate"]:
        dates += date_tokens("birthdate", v) or [f"birthDate={fold(v)}"]
    rt = record.get("resourceType")
    refs = [f"ref:{rt}={i}" for i in f["ref"]]
    ordered = list(dict.fromkeys([*ident, *whole, *dates, *refs, *prefix]))
    if len(ordered) > budget:
        log.warning("search: a record has %d search terms, over the budget of %d; the last %d "
                    "(prefix terms) are not indexed", len(ordered), budget, len(ordered) - budget)
        ordered = ordered[:budget]
    return frozenset(ordered)


def count_tokens(records: Iterable[Mapping[str, Any]]) -> list[int]:
    """Number of terms of each record (for the benchmark and the budget docs)."""
    return [len(record_tokens(r, budget=10**9)) for r in records]


def native_term(field: str, value: str) -> str | None:
    """The term the native API's exact search (``GET /v1/patients?family=…``) looks ``value``
    up by, or None for a field that only filters (``gender``). A superset: the repository
    re-checks the exact rule (:func:`safehold.records.model.search_terms`)."""
    if field in ("family", "given"):
        return f"{field}={fold(value)}"
    if field == "identifier":
        return f"identifier={fold(value.rsplit('|', 1)[-1])}"
    if field == "birthDate":
        d = _digits(unicodedata.normalize("NFKC", value))
        return f"birthdate@{d}" if d is not None else f"birthDate={fold(value)}"
    return None
