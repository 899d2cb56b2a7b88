"""Proxy schema: which record fields get which transform, loaded from TOML.

Example (``docs/proxy.md`` has the full reference)::

    [proxy]
    key_id_field = "_safehold_kid"   # record-level key-id tag for fpe/token/date-shift
    untagged = "error"               # or "primary": reveal untagged records with the primary key

    [proxy.query]                    # query parameter -> field whose transform protects it
    patient = "id"

    [fields.id]
    transform = "deterministic"
    [fields.name]
    transform = "token"
    kind = "name"
    [fields.account]
    transform = "fpe"
    alphabet = "digits"
    [fields.birth_date]
    transform = "date-shift"
    context = "id"
    min_days = -365
    max_days = 365

Field names may be dotted paths into nested JSON objects (``address.city``); a ``*`` segment
matches every element of an array (``name.*.given.*`` — TOML: ``[fields."name.*.given.*"]``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safehold.errors import ConfigError

__all__ = ["FieldSpec", "Schema", "TRANSFORMS", "ALPHABETS", "TOKEN_KINDS", "DATE_FORMATS"]

TRANSFORMS = ("keep", "mask", "fpe", "token", "date-shift", "deterministic", "randomized")
#: Named FPE alphabets; each is a list of character classes kept per position.
ALPHABETS = ("digits", "letters", "alnum", "upper", "lower")
TOKEN_KINDS = ("digits", "name", "email", "alnum")
DATE_FORMATS = ("auto", "DD.MM.YYYY", "YYYY-MM-DD", "MM/DD/YYYY", "YYYY-MM", "YYYY")

_COMMON = {"transform", "path"}
_ALLOWED: dict[str, set[str]] = {
    "keep": set(),
    "mask": {"keep_last", "mask_char"},
    "fpe": {"alphabet", "consistent", "context"},
    "token": {"kind", "consistent", "context"},
    "date-shift": {"context", "min_days", "max_days", "format"},
    "deterministic": set(),
    "randomized": set(),
}


@dataclass(frozen=True)
class FieldSpec:
    """One field's transform and its options (validated)."""

    name: str
    transform: str
    alphabet: str = "digits"  # fpe: a name from ALPHABETS or a literal alphabet ("custom:ABC...")
    kind: str = "alnum"  # token
    consistent: bool = True  # fpe/token: False = tweak with the context field's value
    context: str | None = None  # date-shift (required), fpe/token when consistent = false
    min_days: int = -365
    max_days: int = 365
    date_format: str = "auto"
    keep_last: int = 4
    mask_char: str = "*"

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))

    @property
    def contextual(self) -> bool:
        """True when the transform reads another field (needs it revealed first)."""
        return self.context is not None and (self.transform == "date-shift" or not self.consistent)

    @property
    def searchable(self) -> bool:
        """Deterministic given the key alone, so a protected query value matches stored ones."""
        return self.transform in ("keep", "mask", "deterministic") or (
            self.transform in ("fpe", "token") and self.consistent
        )


@dataclass(frozen=True)
class Schema:
    """A parsed proxy schema.

    Attributes:
        fields: field name (dotted path) -> spec, in file order.
        key_id_field: record-level field holding the key id for fpe/token/date-shift outputs.
        untagged: ``"error"`` (refuse to reveal a record without the tag) or ``"primary"``.
        query: query parameter name -> field name whose (deterministic) transform protects it.
        paths: URL path templates (``/patient/{id}``) whose variables name deterministic fields.
        embedded: JSON paths (``records.*.record``) where HTTP bodies embed further records;
            the body itself (an object, or each object of an array) is always a record.
    """

    fields: dict[str, FieldSpec]
    key_id_field: str = "_safehold_kid"
    untagged: str = "error"
    query: dict[str, str] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    embedded: tuple[str, ...] = ()

    @property
    def needs_key_id(self) -> bool:
        return any(s.transform in ("fpe", "token", "date-shift") for s in self.fields.values())

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        """Read and validate a TOML schema file. Raises ConfigError naming the bad entry."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"schema file not found: {p}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"schema {p} is not valid TOML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schema:
        """Validate a schema given as the TOML document's dict. Raises ConfigError."""
        unknown_top = set(data) - {"proxy", "fields"}
        if unknown_top:
            raise ConfigError(f"schema: unknown top-level table(s) {sorted(unknown_top)}")
        proxy = data.get("proxy", {})
        if not isinstance(proxy, dict):
            raise ConfigError("schema: [proxy] must be a table")
        bad = set(proxy) - {"key_id_field", "untagged", "query", "paths", "embedded"}
        if bad:
            raise ConfigError(f"schema: unknown [proxy] option(s) {sorted(bad)}")
        raw_fields = data.get("fields")
        if not isinstance(raw_fields, dict) or not raw_fields:
            raise ConfigError("schema: needs a non-empty [fields] table")
        fields: dict[str, FieldSpec] = {}
        for name, opts in _flatten_fields(raw_fields):
            fields[name] = _parse_field(name, opts)
        kid_field = proxy.get("key_id_field", "_safehold_kid")
        if not isinstance(kid_field, str) or not kid_field or kid_field in fields:
            raise ConfigError("schema: [proxy] key_id_field must be a non-empty name that is not a field")
        untagged = proxy.get("untagged", "error")
        if untagged not in ("error", "primary"):
            raise ConfigError(f"schema: [proxy] untagged must be 'error' or 'primary', got {untagged!r}")
        query = proxy.get("query", {})
        if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
            raise ConfigError("schema: [proxy.query] maps parameter names to field names (strings)")
        for param, fname in query.items():
            if fname not in fields:
                raise ConfigError(f"schema: query parameter {param!r} names unknown field {fname!r}")
            if not fields[fname].searchable:
                raise ConfigError(
                    f"schema: query parameter {param!r} uses field {fname!r} whose transform "
                    f"{fields[fname].transform!r} is not deterministic, so it cannot be searched"
                )
        paths = proxy.get("paths", [])
        if not isinstance(paths, list) or not all(isinstance(x, str) for x in paths):
            raise ConfigError("schema: [proxy] paths must be a list of templates like '/patient/{id}'")
        for tpl in paths:
            for var in template_vars(tpl):
                if var not in fields or not fields[var].searchable:
                    raise ConfigError(
                        f"schema: path template {tpl!r} names {var!r}, not a deterministic field"
                    )
        embedded = proxy.get("embedded", [])
        if not isinstance(embedded, list) or not all(isinstance(x, str) and x for x in embedded):
            raise ConfigError("schema: [proxy] embedded must be a list of JSON paths like 'records.*.record'")
        for spec in fields.values():
            if spec.context is not None and "*" in spec.context.split("."):
                raise ConfigError(f"schema: field {spec.name!r}: context {spec.context!r} has a '*'")
            if spec.context is not None:
                ctx = fields.get(spec.context)
                if ctx is not None and ctx.contextual:
                    raise ConfigError(
                        f"schema: field {spec.name!r} uses context {spec.context!r}, which itself "
                        "depends on a context field"
                    )
                if spec.context == spec.name:
                    raise ConfigError(f"schema: field {spec.name!r} cannot be its own context")
        return cls(fields=fields, key_id_field=kid_field, untagged=untagged, query=dict(query),
                   paths=tuple(paths), embedded=tuple(embedded))


def template_vars(tpl: str) -> list[str]:
    """The variable names of a ``[proxy] paths`` template, in order (``/p/{id}`` → ``["id"]``)."""
    import re

    return re.findall(r"\{([^{}]+)\}", tpl)


def _flatten_fields(raw: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """``[fields.address.city]`` parses as nested tables; a table with ``transform`` is a field."""
    out: list[tuple[str, dict[str, Any]]] = []
    for k, v in raw.items():
        name = f"{prefix}{k}"
        if not isinstance(v, dict):
            raise ConfigError(f"schema: [fields.{name}] must be a table")
        if "transform" in v:
            out.append((name, v))
        else:
            out.extend(_flatten_fields(v, name + "."))
    return out


def _parse_field(name: str, opts: dict[str, Any]) -> FieldSpec:
    t = opts.get("transform")
    if t not in TRANSFORMS:
        raise ConfigError(f"schema: field {name!r}: transform must be one of {TRANSFORMS}, got {t!r}")
    extra = set(opts) - _COMMON - _ALLOWED[t]
    if extra:
        raise ConfigError(f"schema: field {name!r}: option(s) {sorted(extra)} not valid for {t!r}")
    kw: dict[str, Any] = {"name": name, "transform": t}

    def _get(key: str, typ: type, default: Any) -> Any:
        v = opts.get(key, default)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ConfigError(f"schema: field {name!r}: {key} must be {typ.__name__}")
        return v

    if t == "fpe":
        alpha = _get("alphabet", str, "digits")
        if alpha not in ALPHABETS and not alpha.startswith("custom:"):
            raise ConfigError(
                f"schema: field {name!r}: alphabet must be one of {ALPHABETS} or 'custom:<characters>'"
            )
        kw["alphabet"] = alpha
    if t == "token":
        kind = _get("kind", str, "alnum")
        if kind not in TOKEN_KINDS:
            raise ConfigError(f"schema: field {name!r}: kind must be one of {TOKEN_KINDS}, got {kind!r}")
        kw["kind"] = kind
    if t in ("fpe", "token"):
        kw["consistent"] = _get("consistent", bool, True)
        if not kw["consistent"]:
            kw["context"] = _get("context", str, "")
            if not kw["context"]:
                raise ConfigError(f"schema: field {name!r}: consistent = false needs a context field")
        elif "context" in opts:
            raise ConfigError(f"schema: field {name!r}: context is only used with consistent = false")
    if t == "date-shift":
        kw["context"] = _get("context", str, "")
        if not kw["context"]:
            raise ConfigError(f"schema: field {name!r}: date-shift needs a context field (e.g. patient id)")
        kw["min_days"] = _get("min_days", int, -365)
        kw["max_days"] = _get("max_days", int, 365)
        if kw["min_days"] > kw["max_days"] or (kw["min_days"] == kw["max_days"] == 0):
            raise ConfigError(f"schema: field {name!r}: need min_days <= max_days and a non-zero range")
        if max(abs(kw["min_days"]), abs(kw["max_days"])) > 36500:
            raise ConfigError(f"schema: field {name!r}: shift bounds must be within +-36500 days")
        fmt = _get("format", str, "auto")
        if fmt not in DATE_FORMATS:
            raise ConfigError(f"schema: field {name!r}: format must be one of {DATE_FORMATS}")
        kw["date_format"] = fmt
    if t == "mask":
        kw["keep_last"] = _get("keep_last", int, 4)
        kw["mask_char"] = _get("mask_char", str, "*")
        if kw["keep_last"] < 0 or len(kw["mask_char"]) != 1:
            raise ConfigError(f"schema: field {name!r}: keep_last >= 0 and a one-character mask_char")
    return FieldSpec(**kw)
