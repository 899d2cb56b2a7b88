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

import functools
import json
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

from safehold.crypto.keyset import Keyset
from safehold.errors import ShapeError, TransformError
from safehold.proxy.schema import FieldSpec, Schema
from safehold.proxy.transforms import FieldTransform

__all__ = ["LONE_SURROGATE", "Protector", "apply_path", "fold_name", "has_lone_surrogate", "json_kind",
           "url_decode_fully"]

_MISSING = object()
#: How often a URL component is percent-decoded when looking for disguised names (double and
#: triple encoding: some upstreams decode more than once).
_MAX_DECODE = 4


def url_decode_fully(text: str) -> str:
    """Percent-decode ``text`` repeatedly (up to 4 times) until it stops changing.

    Used only to *compare* names the way a lenient upstream might read them, never to forward:
    invalid UTF-8 becomes U+FFFD, which is harmless for a comparison.
    """
    for _ in range(_MAX_DECODE):
        decoded = unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    return text


@functools.lru_cache(maxsize=4096)  # record keys repeat across the records of a batch
def fold_name(name: str) -> str:
    """Comparison form of a name: Unicode NFKC (fullwidth letters -> ASCII), case-folded
    (Unicode default caseless matching), surrounding whitespace stripped."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89abcdefABCDEF]")
#: The refusal text for JSON that decodes to a lone surrogate (never shows the value).
LONE_SURROGATE = ("holds a lone UTF-16 surrogate escape (such as \\ud800), which is not Unicode "
                  "text (RFC 8259 §8.2) and cannot be encoded as UTF-8")


def has_lone_surrogate(text: str | bytes, doc: Any) -> bool:
    """Does the decoded JSON ``doc`` (parsed from ``text``) hold a string with a lone surrogate?

    Only ``\\uD800``-``\\uDFFF`` escapes can produce one (UTF-8 text cannot encode
    surrogates), so ``text`` is searched for such an escape first and ``doc`` re-encoded only then.
    """
    rx = _SURROGATE_ESCAPE if isinstance(text, str) else _SURROGATE_ESCAPE_BYTES
    if not rx.search(text):  # type: ignore[arg-type]
        return False
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _squash(name: str) -> str:
    """``fold_name`` without separators: ``birth_date``, ``birthDate``, ``Birth-Date`` -> ``birthdate``."""
    return re.sub(r"[\W_]+", "", fold_name(name))


def _get(record: Any, path: tuple[str, ...]) -> Any:
    cur = record
    for part in path:
        if not isinstance(cur, Mapping) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def json_kind(value: object) -> str:
    """JSON type name of a decoded value, for messages that must not show the value itself."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _absent(value: Any) -> bool:
    # null and "" carry nothing (the transforms pass them through as well)
    return value is None or value == ""


def apply_path(node: Any, path: tuple[str, ...], fn: Callable[[Any], Any], *, strict: bool = False) -> Any:
    """Return ``node`` with ``fn`` applied to every value at ``path``.

    A path segment ``*`` matches every element of a JSON array (``name.*.given.*`` reaches each
    given name of each FHIR ``name``). Objects and arrays on the way are copied, never modified,
    so the caller's input stays intact (cheaper than a deep copy per record). A key that is
    absent, ``null`` or ``""`` on the way means "no value here" and leaves ``node`` as it is.

    With ``strict`` (protecting), JSON of another shape on the way raises :class:`ShapeError`:
    an array or scalar where the path names an object key, an object or scalar where it has a
    ``*`` — an upstream may well read ``{"address": [{"city": ...}]}`` as ``address.city``
    (FHIRPath flattens arrays), so passing it on unchanged would leak the value. Without
    ``strict`` (revealing) a mismatch is left as it is.

    Raises:
        ShapeError: ``strict`` and the path meets JSON of another shape (names the position).
    """
    if not path:
        return fn(node)
    head, rest = path[0], path[1:]
    if head == "*":
        if isinstance(node, list):
            if not strict:
                return [apply_path(x, rest, fn) for x in node]
            out = []
            for i, x in enumerate(node):
                try:
                    out.append(apply_path(x, rest, fn, strict=True))
                except ShapeError as e:
                    raise e.within(f"[{i}]") from None
            return out
        if strict and not _absent(node):
            raise ShapeError(json_kind(node), "an array")
        return node
    if isinstance(node, Mapping):
        if head not in node:
            return node
        new = dict(node)
        try:
            new[head] = apply_path(node[head], rest, fn, strict=strict)
        except ShapeError as e:
            raise e.within(head) from None
        return new
    if strict and not _absent(node):
        raise ShapeError(json_kind(node), "an object")
    return node


def _lookalike_at(node: Any, path: tuple[str, ...], folded: tuple[str, ...]) -> str | None:
    if not path:
        return None
    head, rest = path[0], path[1:]
    if head == "*":
        if isinstance(node, list):
            for x in node:
                hit = _lookalike_at(x, rest, folded[1:])
                if hit is not None:
                    return hit
        return None
    if not isinstance(node, Mapping):
        return None
    for key in node:
        if isinstance(key, str) and key != head and fold_name(key) == folded[0]:
            return key
    return _lookalike_at(node[head], rest, folded[1:]) if head in node else None


_Op = Callable[[Any, str | None], Any]


def _protect_op(tr: FieldTransform, kid: int, key: bytes) -> _Op:
    """``(value, context value) -> protected value`` for one field under key ``kid``."""
    return lambda v, c: tr.protect(v, kid, key, c)


def _reveal_op(tr: FieldTransform, kid: int | None, keyset: Keyset) -> _Op:
    """``(value, context value) -> revealed value`` for one field (key id from the record)."""
    return lambda v, c: tr.reveal(v, kid, keyset, c)


class Protector:
    """Protect and reveal records with a schema and a keyset.

    Args:
        schema: the field -> transform configuration.
        keyset: the :class:`~safehold.crypto.keyset.Keyset` (primary key for protect, any
            live key for reveal).

    Thread-safe: the transforms hold cipher caches (AES contexts, FF1 round constants) that
    must not be shared between threads, so each thread gets its own set, built on first use.
    The HTTP proxy runs protect/reveal in a thread pool, off the event loop.
    """

    def __init__(self, schema: Schema, keyset: Keyset):
        self.schema = schema
        self.keyset = keyset
        self._local = threading.local()
        specs = list(schema.fields.values())
        # specs in processing order: context-free fields first
        self._specs = [s for s in specs if not s.contextual] + [s for s in specs if s.contextual]
        self._tagged = {"fpe", "token", "date-shift"}
        protected = [s for s in specs if s.transform != "keep"]
        # names a client might use to reach a protected field in a query or form: every
        # component of a protected field's name and every [proxy.query] parameter, squashed
        self._components = {_squash(c) for s in protected for c in s.path if c != "*"} | {
            _squash(q) for q in schema.query
        }
        self._components.discard("")
        # per protected field: its path with each component folded (JSON key look-alikes)
        self._fold_paths = [(s.path, tuple(fold_name(c) for c in s.path)) for s in protected]
        self._fold_dotted = {fold_name(s.name): s.name for s in protected if len(s.path) > 1}

    # ---- helpers ---------------------------------------------------------------------------

    @property
    def _t(self) -> dict[str, FieldTransform]:
        """This thread's transforms, field name -> :class:`FieldTransform`."""
        t = getattr(self._local, "t", None)
        if t is None:
            t = self._local.t = {s.name: FieldTransform(s) for s in self._specs}
        return t

    def _order(self, record: Mapping[str, Any], flat: bool) -> list[tuple[FieldSpec, tuple[str, ...],
                                                                         FieldTransform]]:
        """``(spec, path, transform)`` per field. In a flat record (CSV row, form body) a dotted
        field without ``*`` is the key of that exact name when the record has one."""
        t = self._t
        return [(s, (s.name,) if flat and len(s.path) > 1 and s.name in record else s.path, t[s.name])
                for s in self._specs]

    def _context(self, spec: FieldSpec, record: Any, extra: Mapping[str, str] | None,
                 flat: bool = False) -> str | None:
        if spec.context is None:
            return None
        if flat and isinstance(record, Mapping) and spec.context in record:
            v = record[spec.context]
        else:
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

    def _field(self, out: dict[str, Any], spec: FieldSpec, path: tuple[str, ...], ctx_source: Any,
               context: Mapping[str, str] | None, op: _Op, *,
               strict: bool, flat: bool) -> tuple[Any, bool]:
        """Apply ``op(value, context_value)`` to every non-empty value of one field; returns the
        new record and whether any value was transformed. The context value is looked up
        (in ``ctx_source``, then ``context``) only when a value needs it.

        Raises:
            ShapeError: ``strict`` and the field's path meets JSON of another shape (names the field).
        """
        ctx: list[str | None] = []
        touched = False

        def one(v: Any) -> Any:
            nonlocal touched
            if v is None or v == "":
                return v
            if spec.contextual and not ctx:
                ctx.append(self._context(spec, ctx_source, context, flat))
            touched = True
            return op(v, ctx[0] if ctx else None)

        try:
            return apply_path(out, path, one, strict=strict), touched
        except ShapeError as e:
            raise e.for_field(spec.name) from None

    # ---- public ----------------------------------------------------------------------------

    def protect(self, record: Mapping[str, Any], *, key_id_as_text: bool = False,
                context: Mapping[str, str] | None = None, flat: bool = False) -> dict[str, Any]:
        """Return a protected copy of ``record``; the input is not modified.

        Args:
            record: a JSON object (dict); nested objects are reached by dotted field names.
            key_id_as_text: write the key-id tag as decimal text (CSV) instead of an int.
            context: plaintext values for context fields the record itself lacks (the HTTP
                proxy passes path-template variables, e.g. the id in ``/patient/{id}``).
            flat: the record is flat text (a CSV row, a form body): a key spelling a dotted
                field name (``address.city``) is that field.

        Raises:
            TransformError: ``record`` is not a dict, already carries the key-id tag, or a
                configured field cannot be transformed (message names the field, not the value).
            ShapeError: a protected field's path meets JSON of another shape (an array where an
                object is expected, ...): refused, never passed on unprotected.
        """
        if not isinstance(record, Mapping):
            raise TransformError(f"a record must be a JSON object, got {type(record).__name__}")
        kf = self.schema.key_id_field
        if kf in record and record[kf] not in (None, ""):
            raise TransformError(f"record already carries key-id field {kf!r}: refusing to protect it twice")
        kid, key = self.keyset.primary_key()
        out: dict[str, Any] = dict(record)
        tagged = False
        for spec, path, tr in self._order(record, flat):
            out, touched = self._field(out, spec, path, record, context,
                                       _protect_op(tr, kid, key),
                                       strict=spec.transform != "keep", flat=flat)
            tagged = tagged or (touched and spec.transform in self._tagged)
        if tagged:
            out[kf] = str(kid) if key_id_as_text else kid
        elif kf in out:
            del out[kf]
        return out

    def reveal(
        self, record: Mapping[str, Any], *, context: Mapping[str, str] | None = None, flat: bool = False
    ) -> dict[str, Any]:
        """Inverse of :meth:`protect` (``mask`` stays masked); drops the key-id tag.

        ``context`` and ``flat`` as in :meth:`protect`. A path that meets JSON of another shape
        is left as it is (revealing sends nothing to the untrusted side).

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
        for spec, path, tr in self._order(record, flat):
            # context fields are revealed before the fields that use them (self._order)
            out, _ = self._field(out, spec, path, out, context,
                                 _reveal_op(tr, kid, self.keyset),
                                 strict=False, flat=flat)
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

    def lookalike_param(self, name: str) -> str | None:
        """Is ``name`` (a decoded query-parameter or form-field name) a disguised protected name?

        Returns a short reason, or ``None`` when ``name`` is exactly a protected name (the caller
        protects it) or unrelated. ``name`` is percent-decoded again (up to 4 times), folded
        (:func:`fold_name`) and split at every non-alphanumeric character (``[]``, ``.``, ``:``,
        ``_``, ``-``, space); if any run of consecutive pieces, joined, equals a component of a
        protected field's name or a ``[proxy.query]`` parameter (joined the same way), the name is a
        look-alike: ``Patient``, ``patient[]``, ``filter[id]``, ``family:exact``, ``_id``,
        ``pat%2569ent``, ``birth_date`` for ``birthDate`` — an upstream may read any of them as the
        protected parameter. Names of ``keep`` fields are not protected and never match.
        """
        if self.is_protected_field(name):
            return None
        if self.schema.query.get(name, name) in self.schema.fields:
            return None  # exactly a keep field or a parameter mapped to one
        pieces = [p for p in re.split(r"[\W_]+", fold_name(url_decode_fully(name))) if p]
        for i in range(len(pieces)):
            for j in range(i + 1, len(pieces) + 1):
                if "".join(pieces[i:j]) in self._components:
                    return "its name resembles a protected field or query parameter"
        return None

    def encoded_record_key(self, text: str) -> str | None:
        """Does the string ``text`` carry a JSON object whose keys name a protected field?

        An upstream that decodes a string value as JSON (``{"payload": "{\\"name\\": ...}"}``,
        ``?filter={"id": ...}``) would find a record the proxy never saw. ``text`` is
        percent-decoded (:func:`url_decode_fully`); when it then starts with ``{``, ``[`` or ``"`` and
        parses as JSON (strings inside that decode as JSON again, up to 4 levels), every object
        key is checked: a protected name or a look-alike (:meth:`lookalike_param`) is returned.
        Returns ``None`` for anything else, including text that only looks like JSON.
        """
        todo: list[tuple[Any, int]] = [(text, 0)]
        seen = 0
        while todo and seen < 100_000:
            node, depth = todo.pop()
            seen += 1
            if isinstance(node, str):
                t = url_decode_fully(node).strip() if depth < _MAX_DECODE else ""
                if t[:1] in ("{", "[", '"'):  # object, array, or a JSON string holding one
                    try:
                        todo.append((json.loads(t), depth + 1))
                    except ValueError:
                        pass
            elif isinstance(node, dict):
                for k, v in node.items():
                    if self.is_protected_field(k) or self.lookalike_param(k) is not None:
                        return k
                    todo.append((v, depth))
            elif isinstance(node, list):
                todo.extend((v, depth) for v in node)
        return None

    def lookalike_key(self, record: Any) -> tuple[str, str] | None:
        """First JSON object key of ``record`` that differs from a protected field's name (or a
        component of its dotted path, at the same place) only by case, Unicode form or
        surrounding whitespace (``Name``, ``NAME``, ``name `` for ``name``; ``Address.city`` for
        ``address.city``), or a top-level key spelling a dotted field name (``address.city``).

        A case-insensitive upstream deserializer (ASP.NET, Jackson with case-insensitive
        properties) would read such a key as the field, which :meth:`protect` — exact by
        design — leaves in plaintext. Returns ``(key, field name)`` or ``None``.
        """
        if not isinstance(record, Mapping):
            return None
        for key in record:
            if isinstance(key, str) and fold_name(key) in self._fold_dotted:
                return key, self._fold_dotted[fold_name(key)]
        for path, folded in self._fold_paths:
            hit = _lookalike_at(record, path, folded)
            if hit is not None:
                return hit, ".".join(path)
        return None

    def is_protected_field(self, name: str) -> bool:
        """True when ``name`` (a query parameter or field name) maps to a non-``keep`` field."""
        spec = self.schema.fields.get(self.schema.query.get(name, name))
        return spec is not None and spec.transform != "keep"
