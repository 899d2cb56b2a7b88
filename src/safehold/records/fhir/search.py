"""FHIR R4 search parameters → blind-index terms and the rule each decrypted candidate must pass.

Framework-free. :func:`plan_search` reads the query of ``GET /fhir/<Type>?…`` (FHIR R4 §3.1.1)
and returns a :class:`SearchPlan`: the term groups the repository looks up (AND over
parameters, OR over the comma-separated values of one parameter), the match rule applied to
every candidate after decryption (the terms only narrow; the rule decides), and the result
parameters. Anything the blind index cannot answer is refused with :class:`SearchRefusedError`
naming the parameter and why — never silently ignored (unless the client sends
``Prefer: handling=lenient``, which ignores *unknown* parameters only, as R4 §3.1.1.3.4 allows).

Supported (see docs/fhir.md for the semantics):

========================  ==================================================================
Patient ``family``,       string: case- and accent-insensitive prefix match at the start of
``given``, ``name``       the value or of any word in it; ``:exact`` = exact, case- and
                          accent-sensitive. A value shorter than 2 characters after folding has
                          no prefix term: it is checked on every Patient (a scan)
Patient ``birthdate``     date; prefixes ``eq ne lt gt le ge sa eb`` (``ap`` refused);
                          precision year, month or day
Patient ``identifier``    token ``[system]|value``, ``|value`` or ``value`` (``system|`` scans)
Patient ``gender``        token; filters the other parameters' candidates (no term of its own:
                          alone it scans every Patient, up to the candidate bound)
other types ``patient``,  reference ``[Type/]id`` or an absolute URL ending in it
``subject``
all ``_count``            page size 0..1000 (default 20; 0 = only ``total``)
all ``_total``            ``none`` | ``estimate`` | ``accurate`` (default: accurate)
all ``_summary=count``    only ``total``
all ``_format``,          handled by the HTTP layer
``_pretty``
========================  ==================================================================
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safehold.records.errors import SearchRefusedError
from safehold.records.tokens import (
    MIN_PREFIX,
    date_cover,
    date_range,
    fold,
    prefix_matches,
    reference_id,
    string_prefix_term,
)

__all__ = ["DEFAULT_COUNT", "MAX_COUNT", "MAX_VALUE", "PATIENT_PARAMS", "REFERENCE_PARAMS", "RESULT_PARAMS",
           "SearchPlan", "SearchRefusedError", "plan_search", "split_values"]

DEFAULT_COUNT = 20
#: Longest value of one search parameter (characters).
MAX_VALUE = 256
MAX_COUNT = 1000
PATIENT_PARAMS = ("family", "given", "name", "birthdate", "identifier", "gender")
REFERENCE_PARAMS = ("patient", "subject")
#: Result parameters (and the HTTP layer's ``_format``/``_pretty``; ``_cursor`` is Safehold's
#: paging position, only ever taken from a ``next`` link).
RESULT_PARAMS = ("_count", "_total", "_summary", "_format", "_pretty", "_cursor")
#: Safehold's paging position: the last id of the previous page (from a ``next`` link).
_DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
_FAR = 10**7  # beyond any day ordinal

Rule = Callable[[str, dict[str, Any]], bool]

@dataclass
class SearchPlan:
    """What :func:`plan_search` made of a query.

    Attributes:
        groups: term groups for :meth:`~safehold.records.repository.PatientRepository.find`,
            or None to scan every record of the type.
        rules: match rules, all must hold.
        count: page size; 0 = only ``total``.
        total: count every match (``_total`` not ``none``).
        cursor: the ``_cursor`` value, if any.
        used: the parameters that shaped the result, as ``(name, value)`` (for ``self`` links).
        digest: identifies the search (not its page), so a cursor cannot move to another one.
    """

    groups: list[frozenset[str]] | None
    rules: list[Rule] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    total: bool = True
    cursor: str | None = None
    used: list[tuple[str, str]] = field(default_factory=list)
    digest: str = ""

    def matches(self, rid: str, record: dict[str, Any]) -> bool:
        """True if ``record`` passes every rule."""
        return all(rule(rid, record) for rule in self.rules)


def split_values(raw: str) -> list[str]:
    """A parameter value split on unescaped commas, ``\\,`` ``\\|`` ``\\$`` ``\\\\`` unescaped
    (R4 §3.1.1.4.6 escaping)."""
    out, cur, esc = [], [], False
    for ch in raw:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur) + ("\\" if esc else ""))
    return out


def _split_token(value: str) -> tuple[str | None, str]:
    """``system|value`` → (system, value); ``|value`` → ("", value); ``value`` → (None, value)."""
    i = value.find("|")
    return (None, value) if i < 0 else (value[:i], value[i + 1:])


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []


# --- Patient field values (what each parameter matches) -----------------------------------------


def _names(rec: Mapping[str, Any], which: str) -> list[str]:
    out: list[str] = []
    for n in _list(rec.get("name")):
        if not isinstance(n, dict):
            continue
        fam = n.get("family") if isinstance(n.get("family"), str) else None
        giv = [g for g in _list(n.get("given")) if isinstance(g, str)]
        if which in ("family", "name") and fam:
            out.append(fam)
        if which in ("given", "name"):
            out += giv
        if which == "name" and not fam and not giv and isinstance(n.get("text"), str):
            out.append(n["text"])
    return out


def _string_param(name: str, modifier: str | None, values: list[str]) -> tuple[frozenset[str], Rule]:
    if modifier not in (None, "exact"):
        raise SearchRefusedError(f"parameter {name!r}: modifier :{modifier} is not supported "
                                 "(supported: :exact)", "not-supported")
    fields = ("family", "given", "name") if name == "name" else (name,)
    terms: set[str] = set()
    short = False
    for v in values:
        q = fold(v)
        if modifier == "exact":
            terms |= {f"{f}={q}" for f in fields}
            continue
        if len(q) < MIN_PREFIX:
            short = True  # no prefix term this short: the rule alone decides (a scan)
            continue
        terms |= {string_prefix_term(f, q) for f in fields}
    if modifier == "exact":
        # whole-value terms exist for family and given only; a text-only name is matched by
        # prefix terms, so :exact on name looks those up as well
        if name == "name":
            terms |= {string_prefix_term("name", fold(v)) for v in values if len(fold(v)) >= MIN_PREFIX}
        want = set(values)
        return frozenset(terms), lambda _rid, rec: any(x in want for x in _names(rec, name))
    folded = [fold(v) for v in values]
    if short:  # one value has no term: looking up only the others would miss its matches
        terms = set()
    return frozenset(terms), lambda _rid, rec: any(prefix_matches(q, x) for x in _names(rec, name)
                                                   for q in folded)


def _date_param(values: list[str], modifier: str | None) -> tuple[list[tuple[int, int]], Rule]:
    """The day ranges a match must overlap (their union) and the R4 rule."""
    if modifier is not None:
        raise SearchRefusedError(f"parameter 'birthdate': modifier :{modifier} is not supported",
                                 "not-supported")
    all_spans: list[tuple[int, int]] = []
    tests: list[Callable[[tuple[int, int]], bool]] = []
    for v in values:
        prefix, when = (v[:2], v[2:]) if v[:2] in _DATE_PREFIXES else ("eq", v)
        if prefix == "ap":
            raise SearchRefusedError("parameter 'birthdate': prefix 'ap' (approximately) is not "
                                     "supported: use ge and le", "not-supported")
        r = date_range(when)
        if r is None:
            raise SearchRefusedError("parameter 'birthdate': expected [eq|ne|lt|gt|le|ge|sa|eb] "
                                     "followed by YYYY, YYYY-MM or YYYY-MM-DD (a date, no time)")
        x0, x1 = r
        spans = {"eq": [(x0, x1)], "ne": [(-_FAR, x0 - 1), (x1 + 1, _FAR)], "gt": [(x1 + 1, _FAR)],
                 "sa": [(x1 + 1, _FAR)], "lt": [(-_FAR, x0 - 1)], "eb": [(-_FAR, x0 - 1)],
                 "ge": [(x0, _FAR)], "le": [(-_FAR, x1)]}[prefix]
        all_spans += spans
        tests.append(_date_test(prefix, x0, x1))

    def rule(_rid: str, rec: dict[str, Any]) -> bool:
        bd = rec.get("birthDate")
        t = date_range(bd) if isinstance(bd, str) else None
        return t is not None and any(test(t) for test in tests)

    return all_spans, rule


def _date_groups(params: list[list[tuple[int, int]]]) -> list[frozenset[str]]:
    """Term groups for the ``birthdate`` parameters (ANDed; each a union of day ranges).

    Parameters with one range each are looked up as the *intersection* of their ranges when it
    is not empty: a date range that overlaps every one of several ranges that share a point
    also overlaps their common part (Helly's theorem on the line), so ``ge1970-03&lt1971``
    looks up ten months instead of everything after 1970 and everything before 1971.
    """
    single = [p[0] for p in params if len(p) == 1]
    groups = [frozenset(t for lo, hi in p for t in date_cover("birthdate", lo, hi))
              for p in params if len(p) != 1]
    if single:
        lo, hi = max(r[0] for r in single), min(r[1] for r in single)
        if lo <= hi:
            groups.append(frozenset(date_cover("birthdate", lo, hi)))
        else:  # no common day: each on its own (a coarse date may still overlap them all)
            groups += [frozenset(date_cover("birthdate", a, b)) for a, b in single]
    return groups


def _date_test(prefix: str, x0: int, x1: int) -> Callable[[tuple[int, int]], bool]:
    """FHIR R4 §3.1.1.4.4 date prefix semantics on the target's range ``t = (t0, t1)``."""
    eq: Callable[[tuple[int, int]], bool] = lambda t: x0 <= t[0] and t[1] <= x1  # noqa: E731
    return {
        "eq": eq,
        "ne": lambda t: not eq(t),
        "gt": lambda t: t[1] > x1,
        "lt": lambda t: t[0] < x0,
        "ge": lambda t: t[1] > x1 or eq(t),
        "le": lambda t: t[0] < x0 or eq(t),
        "sa": lambda t: t[0] > x1,
        "eb": lambda t: t[1] < x0,
    }[prefix]


def _identifier_param(values: list[str], modifier: str | None) -> tuple[frozenset[str], Rule]:
    if modifier is not None:
        raise SearchRefusedError(f"parameter 'identifier': modifier :{modifier} is not supported",
                                 "not-supported")
    wanted = [_split_token(v) for v in values]
    # a value has a term; ``system|`` (any value in a system) has none: the rule alone decides
    terms = frozenset() if any(not val for _, val in wanted) else \
        frozenset(f"identifier={fold(val)}" for _, val in wanted)

    def rule(_rid: str, rec: dict[str, Any]) -> bool:
        for ident in _list(rec.get("identifier")):
            if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
                continue
            for system, val in wanted:
                if val and ident["value"] != val:
                    continue
                if system is None or ident.get("system") == (system or None):
                    return True
        return False

    return terms, rule


def _gender_param(values: list[str], modifier: str | None) -> Rule:
    if modifier is not None:
        raise SearchRefusedError(f"parameter 'gender': modifier :{modifier} is not supported",
                                 "not-supported")
    codes = {_split_token(v)[1] for v in values}
    return lambda _rid, rec: rec.get("gender") in codes


def _reference_param(rtype: str, name: str, values: list[str],
                     modifier: str | None) -> tuple[frozenset[str], Rule]:
    if modifier not in (None, "Patient") or (modifier == "Patient" and name != "subject"):
        raise SearchRefusedError(f"parameter {name!r}: modifier :{modifier} is not supported",
                                 "not-supported")
    targets: list[tuple[str | None, str]] = []
    for v in values:
        typ, rid = _reference_value(v)
        if not rid:
            raise SearchRefusedError(f"parameter {name!r}: expected [Type/]id or an absolute "
                                     "reference URL (not ending in /)")
        typ = modifier or typ or ("Patient" if name == "patient" else None)
        targets.append((typ, rid))  # patient=Observation/1 simply matches nothing
    terms = frozenset(f"ref:{rtype}={i}" for _, i in targets)
    elements = ("subject", "patient") if name == "patient" else ("subject",)

    if name == "patient":
        targets = [t for t in targets if t[0] == "Patient"]

    def rule(_rid: str, rec: dict[str, Any]) -> bool:
        for el in elements:
            ref = rec.get(el)
            got = reference_id(ref.get("reference")) if isinstance(ref, dict) else None
            if got is None:
                continue
            for typ, i in targets:
                if got[1] == i and (typ is None or got[0] in (None, typ)):
                    return True
        return False

    return terms, rule


def _reference_value(v: str) -> tuple[str | None, str]:
    """``(type or None, id)`` of a reference search value: ``urn:uuid:<id>``, ``[Type/]id``, or
    a URL ending in ``Type/id`` (``/_history/n`` dropped); the id is the last path segment."""
    if v.startswith("urn:uuid:") and len(v) > len("urn:uuid:"):
        return None, v[len("urn:uuid:"):]
    parts = v.split("/")
    if len(parts) >= 4 and parts[-2] == "_history" and parts[-3]:
        parts = parts[:-2]
    return (parts[-2] or None if len(parts) >= 2 else None), parts[-1]


# --- the plan ------------------------------------------------------------------------------------


def plan_search(rtype: str, params: Iterable[tuple[str, str]], *, lenient: bool = False) -> SearchPlan:
    """Turn a FHIR search query into a :class:`SearchPlan` (module docstring).

    Args:
        rtype: the resource type searched (an R4 type).
        params: the query parameters in order (repeats are ANDed).
        lenient: ignore unknown parameters (``Prefer: handling=lenient``) instead of refusing.

    Raises:
        SearchRefusedError: an unknown or unsupported parameter, modifier or prefix, or a
            malformed value.
    """
    plan = SearchPlan(groups=[])
    groups: list[frozenset[str]] = []
    result_seen: set[str] = set()
    date_params: list[list[tuple[int, int]]] = []
    key_parts: list[tuple[str, str]] = []
    for raw_name, raw_value in params:
        if len(raw_value) > MAX_VALUE:
            raise SearchRefusedError(f"parameter {raw_name[:40]!r}: value over {MAX_VALUE} characters")
        name, _, modifier = raw_name.partition(":")
        mod = modifier or None
        if name in RESULT_PARAMS:
            if name in result_seen:
                raise SearchRefusedError(f"parameter {name!r} is given more than once")
            result_seen.add(name)
            _result_param(plan, name, raw_value, mod)
            continue
        if name.startswith("_"):
            if lenient:
                continue
            raise SearchRefusedError(f"parameter {name!r} is not supported (supported: "
                                     f"{', '.join(_supported(rtype))})", "not-supported")
        values = split_values(raw_value)
        if rtype == "Patient" and name in PATIENT_PARAMS:
            if name in ("family", "given", "name"):
                terms, rule = _string_param(name, mod, values)
            elif name == "birthdate":
                spans, rule = _date_param(values, mod)
                date_params.append(spans)
                terms = frozenset()
            elif name == "identifier":
                terms, rule = _identifier_param(values, mod)
            else:
                terms, rule = frozenset(), _gender_param(values, mod)
        elif rtype != "Patient" and name in REFERENCE_PARAMS:
            terms, rule = _reference_param(rtype, name, values, mod)
        else:
            if lenient:
                continue
            raise SearchRefusedError(f"parameter {name!r} is not supported for {rtype} (supported: "
                                     f"{', '.join(_supported(rtype))})", "not-supported")
        if terms:
            groups.append(terms)
        plan.rules.append(rule)
        plan.used.append((raw_name, raw_value))
        key_parts.append((raw_name, raw_value))
    groups += _date_groups(date_params) if date_params else []
    plan.groups = groups or None
    if rtype == "Patient":
        plan.rules.insert(0, lambda _rid, rec: rec.get("resourceType") == "Patient")
    else:
        plan.rules.insert(0, lambda rid, rec: rid.startswith(f"{rtype}:")
                          and rec.get("resourceType") == rtype)
    canon = json.dumps([rtype, sorted(key_parts), plan.count, plan.total], separators=(",", ":"))
    plan.digest = hashlib.sha256(canon.encode("utf-8")).hexdigest()[:32]
    return plan


def _result_param(plan: SearchPlan, name: str, value: str, modifier: str | None) -> None:
    if modifier is not None:
        raise SearchRefusedError(f"parameter {name!r} takes no modifier")
    if name == "_count":
        if not value.isdigit() or int(value) > MAX_COUNT:
            raise SearchRefusedError(f"parameter '_count' must be an integer 0..{MAX_COUNT}")
        plan.count = int(value)
        plan.used.append((name, value))
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise SearchRefusedError("parameter '_total' must be none, estimate or accurate")
        plan.total = value != "none"
        plan.used.append((name, value))
    elif name == "_summary":
        if value != "count":
            raise SearchRefusedError("parameter '_summary': only 'count' is supported", "not-supported")
        plan.count = 0
        plan.used.append((name, value))
    elif name == "_cursor":
        plan.cursor = value  # the last id of the previous page


def _supported(rtype: str) -> tuple[str, ...]:
    return (PATIENT_PARAMS if rtype == "Patient" else REFERENCE_PARAMS) + ("_count", "_total",
                                                                           "_summary=count")

