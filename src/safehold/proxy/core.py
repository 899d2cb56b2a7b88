"""Record-level protect / reveal for the encryption proxy.

:class:`Protector` applies a :class:`~safehold.proxy.schema.Schema` to dict / JSON records:
``protect(record) -> record`` before a record leaves for the untrusted cloud service,
``reveal(record) -> record`` on the way back.

Key-id tagging (rotation): every output of ``fpe``, ``token`` and ``date-shift`` in one record
is made with the keyset's primary key, and its id is stored once per record in the field
``schema.key_id_field`` (default ``_safehold_kid``; an ``int`` in JSON, decimal text in CSV).
That keeps those fields exactly format-preserving (no prefix inside the value) at the price of
one extra field the upstream must store; ``deterministic`` and ``randomized`` outputs carry
their key id inside the ciphertext and need no tag. Where the upstream cannot store the extra
field (fixed-schema APIs), ``untagged = "primary"`` reveals untagged records with the current
primary key — correct only until the next rotation (docs/proxy.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from safehold.crypto.keyset import Keyset
from safehold.errors import TransformError
from safehold.proxy.schema import FieldSpec, Schema
from safehold.proxy.transforms import FieldTransform

__all__ = ["Protector"]

_MISSING = object()


def _get(record: Any, path: tuple[str, ...]) -> Any:
    cur = record
    for part in path:
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _set(record: dict, path: tuple[str, ...], value: Any) -> None:
    """Set ``value`` at ``path`` in ``record`` (a shallow copy), copying each nested object on
    the way so the caller's input is never modified (cheaper than a deep copy per record)."""
    cur = record
    for part in path[:-1]:
        nxt = dict(cur[part])
        cur[part] = nxt
        cur = nxt
    cur[path[-1]] = value


class Protector:
    """Protect and reveal records with a schema and a keyset.

    Args:
        schema: the field -> transform configuration.
        keyset: the :class:`~safehold.crypto.keyset.Keyset` (primary key for protect, any
            live key for reveal).

    Not thread-safe for concurrent use of one instance from several threads (cipher caches);
    the HTTP proxy runs it on the event-loop thread.
    """

    def __init__(self, schema: Schema, keyset: Keyset):
        self.schema = schema
        self.keyset = keyset
        self._t = {name: FieldTransform(spec) for name, spec in schema.fields.items()}
        specs = list(schema.fields.values())
        # (spec, path, transform) in processing order: context-free fields first
        self._order = [(s, s.path, self._t[s.name]) for s in specs if not s.contextual] + [
            (s, s.path, self._t[s.name]) for s in specs if s.contextual
        ]
        self._tagged = {"fpe", "token", "date-shift"}

    # ---- helpers ---------------------------------------------------------------------------

    def _context(self, spec: FieldSpec, record: Any, extra: Mapping[str, str] | None) -> str | None:
        if spec.context is None:
            return None
        v = _get(record, tuple(spec.context.split(".")))
        if (v is _MISSING or v is None or v == "") and extra:
            v = extra.get(spec.context, _MISSING)
        if v is _MISSING or v is None or v == "":
            raise TransformError(f"field {spec.name!r}: context field {spec.context!r} is missing")
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise TransformError(
                f"field {spec.name!r}: context field {spec.context!r} must be text or integer"
            )
        return str(v)

    # ---- public ----------------------------------------------------------------------------

    def protect(self, record: Mapping[str, Any], *, key_id_as_text: bool = False,
                context: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Return a protected copy of ``record``; the input is not modified.

        Args:
            record: a JSON object (dict); nested objects are reached by dotted field names.
            key_id_as_text: write the key-id tag as decimal text (CSV) instead of an int.
            context: plaintext values for context fields the record itself lacks (the HTTP
                proxy passes path-template variables, e.g. the id in ``/patient/{id}``).

        Raises:
            TransformError: ``record`` is not a dict, already carries the key-id tag, or a
                configured field cannot be transformed (message names the field, not the value).
        """
        if not isinstance(record, Mapping):
            raise TransformError(f"a record must be a JSON object, got {type(record).__name__}")
        kf = self.schema.key_id_field
        if kf in record and record[kf] not in (None, ""):
            raise TransformError(f"record already carries key-id field {kf!r}: refusing to protect it twice")
        kid, key = self.keyset.primary_key()
        out = dict(record)
        tagged = False
        for spec, path, tr in self._order:
            v = _get(record, path)
            if v is _MISSING:
                continue
            ctx = self._context(spec, record, context) if spec.contextual and v not in (None, "") else None
            new = tr.protect(v, kid, key, ctx)
            _set(out, path, new)
            if spec.transform in self._tagged and v not in (None, ""):
                tagged = True
        if tagged:
            out[kf] = str(kid) if key_id_as_text else kid
        elif kf in out:
            del out[kf]
        return out

    def reveal(
        self, record: Mapping[str, Any], *, context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Inverse of :meth:`protect` (``mask`` stays masked); drops the key-id tag.

        ``context`` as in :meth:`protect`.

        Raises:
            TransformError: not a dict, a tagged field without a tag (``untagged = "error"``),
                an unknown key id, a malformed or tampered ciphertext.
        """
        if not isinstance(record, Mapping):
            raise TransformError(f"a record must be a JSON object, got {type(record).__name__}")
        out = dict(record)
        kf = self.schema.key_id_field
        raw_kid = out.pop(kf, None)
        kid: int | None
        if raw_kid in (None, ""):
            kid = self.keyset.primary_id if self.schema.untagged == "primary" else None
        else:
            try:
                kid = int(raw_kid)
                if isinstance(raw_kid, bool) or not 0 < kid < 2**32:
                    raise ValueError
            except (TypeError, ValueError):
                raise TransformError(f"record key-id field {kf!r} is not a key id") from None
        for spec, path, tr in self._order:
            v = _get(out, path)
            if v is _MISSING:
                continue
            ctx = self._context(spec, out, context) if spec.contextual and v not in (None, "") else None
            _set(out, path, tr.reveal(v, kid, self.keyset, ctx))
        return out

    def protect_query(self, param: str, value: str) -> str:
        """Protect one query-parameter (or path-segment) value for exact search upstream.

        ``param`` is mapped to a field by ``[proxy.query]`` or, failing that, by equal name.
        Returns ``value`` unchanged for a parameter that names no field.

        Raises:
            TransformError: the field's transform is not deterministic (randomized, contextual
                fpe/token, date-shift), so a protected value would never match.
        """
        fname = self.schema.query.get(param, param)
        spec = self.schema.fields.get(fname)
        if spec is None:
            return value
        if not spec.searchable:
            raise TransformError(
                f"query parameter {param!r}: field {fname!r} uses transform {spec.transform!r}, "
                "which is not deterministic and cannot be searched"
            )
        kid, key = self.keyset.primary_key()
        return str(self._t[fname].protect(value, kid, key, None))

    def is_protected_field(self, name: str) -> bool:
        """True when ``name`` (a query parameter or field name) maps to a non-``keep`` field."""
        spec = self.schema.fields.get(self.schema.query.get(name, name))
        return spec is not None and spec.transform != "keep"
