"""The OpenAPI documents tell the truth: schemathesis (every default check, bounded examples)
over ``/openapi.json`` (native API) and ``/fhir/openapi.json`` (FHIR R4), against the real app
in-process (ASGI) on a real SQLite file.

Configuration, and why:

* ``positive_data_acceptance`` also accepts 412: a well-formed ``If-Match`` naming another
  version is answered 412 Precondition Failed by design (RFC 9110 §13.1.1), like the 404/409
  schemathesis accepts by default.
* ``cross_field`` copies the URL's id and type into the body of positive ``PUT`` /
  ``POST`` cases: FHIR R4 §3.1.0.4 requires them equal (400 otherwise), a cross-field rule
  OpenAPI cannot state (the spec says so in its description).
* ``headers`` mends the ``If-Match`` / ``If-None-Exist`` headers of *positive* cases:
  schemathesis generates header values from ``[A-Za-z0-9]`` only, so it cannot satisfy
  ``"3"`` or ``identifier=…`` and sends a pattern-violating value as "valid" data (the server
  rightly answers 400). A bare number is quoted, anything else dropped; negative cases keep
  theirs. Conditional create is driven by the FHIR client tests.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from safehold.records.fhir.core import IF_NONE_EXIST_RE
from safehold.records.fhir.openapi import fhir_openapi
from safehold.records.http import ETAG_RE
from safehold.records.openapi import native_openapi
from tests.support.fhir_app import records_app

EXAMPLES = 25


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({"checks": {"positive_data_acceptance": {
        "expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "412", "429", "5xx"]}}})


# one app for the module, built at collection (schemathesis parametrizes from the schema);
# the directory and the store are removed / closed by the ``cleanup`` fixture
_DIR = Path(tempfile.mkdtemp(prefix="safehold-contract-"))
APP = records_app(_DIR)
native = schemathesis.openapi.from_asgi("/openapi.json", APP.app, config=_config())
fhir = schemathesis.openapi.from_asgi("/fhir/openapi.json", APP.app, config=_config())


def cross_field(case):
    """The rules OpenAPI cannot state (module docstring), applied to positive cases right
    before they are sent."""
    if case.meta is not None and not case.meta.generation.mode.is_positive:
        return
    params = case.path_parameters or {}
    if isinstance(case.body, dict) and case.method in ("PUT", "POST"):
        if "type" in params:
            case.body["resourceType"] = params["type"]
        if case.method == "PUT":
            case.body["id"] = params.get("id")
    headers(case)


def headers(case):
    """Positive cases only: schemathesis builds header values from ``[A-Za-z0-9]`` alone, so
    it cannot produce an entity tag (``"3"``) or ``identifier=…`` and sends a value that breaks
    the documented pattern as valid data. Quote a bare version; drop anything else."""
    if case.meta is not None and not case.meta.generation.mode.is_positive or not case.headers:
        return
    im = case.headers.get("If-Match")
    if im is not None and not ETAG_RE.fullmatch(im):
        if im.isdigit() and len(im) <= 18:
            case.headers["If-Match"] = f'"{im}"'
        else:
            del case.headers["If-Match"]
    ine = case.headers.get("If-None-Exist")
    if ine is not None and not IF_NONE_EXIST_RE.fullmatch(ine):
        del case.headers["If-None-Exist"]


@pytest.fixture(scope="module", autouse=True)
def cleanup():
    yield
    APP.store.close()
    shutil.rmtree(_DIR, ignore_errors=True)


@pytest.fixture
def app():
    return APP


_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@native.parametrize()
@_SETTINGS
def test_native_api_matches_its_openapi(case, app):
    headers(case)
    case.call_and_validate(headers=app.headers())


@fhir.parametrize()
@_SETTINGS
def test_fhir_api_matches_its_openapi(case, app):
    cross_field(case)
    case.call_and_validate(headers=app.headers())


def _routes(app) -> set[tuple[str, str]]:
    out = set()
    for r in app.routes:
        sub = getattr(r, "original_router", None)
        for route in (sub.routes if sub is not None else [r]):
            if getattr(route, "include_in_schema", False) and getattr(route, "methods", None):
                out |= {(route.path, m.lower()) for m in route.methods}
    return out


def test_documents_list_exactly_the_routes_served(app):
    served = _routes(app.app)
    documented = {(p, m) for p, ops in native_openapi()["paths"].items() for m in ops}
    assert documented == {(p, m) for p, m in served if not p.startswith("/openapi")}
    fhir_app = next(r.app for r in app.app.routes if getattr(r, "path", "") == "/fhir")
    fhir_served = {(p.replace("{rtype:fhirtype}", "{type}").replace("{rid}", "{id}"), m)
                   for p, m in _routes(fhir_app) if not p.startswith("/openapi")}
    fhir_doc = {(p.replace("/Patient", "/{type}"), m) for p, ops in fhir_openapi()["paths"].items()
                for m in ops}
    assert fhir_doc == fhir_served
