"""A protected path that meets JSON of another shape is refused (422), never forwarded.

Attack (reproduced on the proxy before this fix): with ``address.city`` protected,
``{"address": [{"city": "Berlin"}]}`` — FHIR's own shape, ``address`` is an array — reached the
upstream in plaintext with 200; so did ``{"names": [{"given": "..."}]}`` for
``names.*.given.*`` and ``{"names": {"given": [...]}}``. An upstream that flattens arrays
(FHIRPath does) reads those values as the protected fields.

The proxy and a capturing upstream run as processes on loopback; a Hypothesis test generates
arbitrary JSON around the schema's paths and checks that no value placed where a lenient reader
would find a protected field ever arrives in plaintext.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.proxy_capture import capture_stack, captured, client

pytestmark = pytest.mark.slow
http = client()

SCHEMA = """
[proxy]
embedded = ["entry.*.resource"]

[fields."address.city"]
transform = "deterministic"

[fields."names.*.given.*"]
transform = "randomized"

[fields.ssn]
transform = "fpe"
alphabet = "digits"

[fields."contact.*.phone"]
transform = "token"
kind = "digits"
"""
# field path -> marker kind: "text" for the AES transforms (any JSON value), "digits" for FF1
FIELDS = {("address", "city"): "text", ("names", "*", "given", "*"): "text",
          ("ssn",): "digits", ("contact", "*", "phone"): "digits"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with capture_stack(tmp_path_factory.mktemp("proxy"), SCHEMA) as s:
        yield s


def send(stack, body: Any) -> tuple[httpx.Response, list[dict]]:
    """POST ``body`` as JSON through the proxy; return the response and what reached the upstream."""
    before, _ = captured(stack)
    r = http.post(stack.proxy + "/records", json=body)
    _, reqs = captured(stack, before)
    return r, reqs


# --- the reported attacks ----------------------------------------------------------------------


@pytest.mark.parametrize("body, where", [
    ({"address": [{"city": "Berlin"}]}, "address"),                      # FHIR: address is an array
    ({"names": [{"given": "Erika"}]}, "names[0].given"),                 # string where [*] expected
    ({"names": {"given": ["Erika"]}}, "names"),                          # object where [*] expected
    ({"names": [[{"given": ["Erika"]}]]}, "names[0]"),                   # array where object expected
    ({"address": "Berlin, Hauptstr. 1"}, "address"),                     # scalar where object expected
    ({"contact": {"phone": "0301234567"}}, "contact"),
    ({"entry": {"0": {"resource": {"ssn": "123456789"}}}}, "entry"),     # embedded path shapes too
    ({"entry": [{"resource": [{"ssn": "123456789"}]}]}, "entry[0].resource"),
    ([[{"ssn": "123456789"}]], "[0]"),                                   # records inside an inner array
])
def test_array_shaped_protected_path_is_refused_not_forwarded(stack, body, where):
    r, reqs = send(stack, body)
    assert r.status_code == 422, r.text
    assert reqs == [], "the refused request reached the upstream"
    err = r.json()["error"]
    assert repr(where) in err and "where the schema expects" in err
    for secret in ("Berlin", "Erika", "123456789", "0301234567"):
        assert secret not in err  # types and positions only, never a value


def test_matching_shapes_are_still_forwarded_protected(stack):
    body = {"address": {"city": "Berlin"}, "names": [{"given": ["Erika", "Maria"]}, None],
            "ssn": "123456789", "contact": [{"phone": "0301234567"}, {"fax": "x"}],
            "entry": [{"resource": {"address": {"city": "Potsdam"}}}], "note": None,
            "address2": [{"city": "not a protected path"}]}
    r, reqs = send(stack, body)
    assert r.status_code == 200, r.text
    (req,) = reqs
    for secret in ("Berlin", "Erika", "Maria", "123456789", "0301234567", "Potsdam"):
        assert secret not in req["body"]
    assert "not a protected path" in req["body"]
    # absent, null and "" on the way are "no value", not a shape mismatch
    for ok in ({"address": None}, {"address": {}}, {"names": []}, {"names": [{}]}, {"names": ""},
               {"contact": None}, {"entry": [{"resource": None}]}):
        r, reqs = send(stack, ok)
        assert r.status_code == 200, (ok, r.text)


def test_form_key_spelling_a_dotted_field_is_protected(stack):
    # a form field named "address.city" is that field (Spring and others bind it as nested)
    before, _ = captured(stack)
    r = http.post(stack.proxy + "/form", data={"address.city": "Berlin", "other": "x"})
    assert r.status_code == 200, r.text
    _, (req,) = captured(stack, before)
    assert "Berlin" not in req["body"] and "address.city=" in req["body"]


# --- Hypothesis: arbitrary JSON around the schema's paths -------------------------------------

NOISE_TEXT = st.text(alphabet="abcdefgh ", max_size=6)
NOISE = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | NOISE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NOISE_TEXT, inner, max_size=3),
    max_leaves=6,
)


def _marker(kind: str) -> str:
    # unique, and never produced by NOISE (no capitals, no digits in noise text)
    return uuid.uuid4().hex[:9].translate(str.maketrans("abcdef", "123456")) if kind == "digits" \
        else "ZQX" + uuid.uuid4().hex


@st.composite
def shaped(draw, path: tuple[str, ...], kind: str, markers: list[str]) -> Any:
    """A JSON value that a lenient reader (arrays flattened anywhere, ``*`` matching zero or
    more levels) would read at ``path``: the marker, wrapped in shapes that fit the path or not."""
    if not path:
        m = _marker(kind)
        markers.append(m)
        return draw(st.sampled_from([m, [m], {"value": m}])) if kind == "text" else m
    head, rest = path[0], path[1:]
    child = draw(shaped(rest, kind, markers))
    if head == "*":
        shape = draw(st.sampled_from(["array", "array", "skip", "object"]))
        if shape == "array":
            return [draw(NOISE), child] if draw(st.booleans()) else [child]
        if shape == "object":
            return {"x": child}
        return child  # the level is missing: an object or scalar where an array is expected
    obj = {**draw(st.dictionaries(NOISE_TEXT, NOISE, max_size=2)), head: child}
    shape = draw(st.sampled_from(["object", "object", "array", "nested-array"]))
    if shape == "array":
        return [obj]
    if shape == "nested-array":
        return [[obj]]
    return obj


@st.composite
def bodies(draw) -> tuple[Any, list[str]]:
    markers: list[str] = []
    record: dict[str, Any] = draw(st.dictionaries(NOISE_TEXT, NOISE, max_size=3))
    for path, kind in FIELDS.items():
        if draw(st.booleans()):
            record[path[0]] = draw(shaped(path[1:], kind, markers))
    form = draw(st.sampled_from(["record", "list", "embedded", "embedded-odd"]))
    if form == "list":
        return [record, draw(NOISE)], markers
    if form == "embedded":
        return {"entry": [{"resource": record}]}, markers
    if form == "embedded-odd":
        return {"entry": draw(st.sampled_from([{"0": {"resource": record}}, [{"resource": [record]}],
                                               [[{"resource": record}]]]))}, markers
    return record, markers


def test_hypothesis_no_protected_value_reaches_the_upstream_in_plaintext(stack):
    outcomes: list[int] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies())
    def check(case: tuple[Any, list[str]]) -> None:
        body, markers = case
        r, reqs = send(stack, body)
        outcomes.append(r.status_code)
        if r.status_code >= 400:
            assert reqs == [], f"refused ({r.status_code}) but the upstream received it"
            return
        assert r.status_code == 200, r.text
        (req,) = reqs
        leaked = [m for m in markers if m in req["body"]]
        assert leaked == [], f"plaintext reached the upstream: {body!r}"

    check()
    # both sides were exercised: shapes that fit were forwarded, others refused
    assert outcomes.count(200) >= 20 and sum(s == 422 for s in outcomes) >= 20, outcomes
