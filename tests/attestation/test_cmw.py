"""CMW (draft-ietf-rats-msg-wrap) encoding of Evidence: round trips and malformed input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.attestation.evidence import COLLECTION_TYPE, MEDIA_TYPES, Evidence
from safehold.errors import EvidenceFormatError, SafeholdError


def test_record_round_trip_is_json_array():
    ev = Evidence(MEDIA_TYPES["sgx"], b"\x03\x00quote-bytes")
    text = ev.to_cmw()
    obj = json.loads(text)
    assert obj[0] == MEDIA_TYPES["sgx"]
    assert "=" not in obj[1]  # base64url without padding
    assert Evidence.from_cmw(text) == ev
    assert Evidence.from_cmw(text.encode()).tee_type == "sgx"


def test_collection_carries_endorsements():
    ev = Evidence(MEDIA_TYPES["sev-snp"], b"r" * 1184, {"vcek": b"\x30\x82der", "ask_ark": b"pem"})
    obj = json.loads(ev.to_cmw())
    assert obj["__cmwc_t"] == COLLECTION_TYPE
    back = Evidence.from_cmw(ev.to_cmw())
    assert back.endorsements == {"vcek": b"\x30\x82der", "ask_ark": b"pem"}
    assert back.data == ev.data


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("not json", "not valid JSON"),
        ("42", "expected a JSON array"),
        ('["application/vnd.intel.sgx.quote"]', "expected [type, value"),
        ('["application/vnd.intel.sgx.quote", "a+b/"]', "not base64url"),
        ('["text/plain", "AAAA"]', "unsupported Evidence media type"),
        ('["no media type", "AAAA"]', "not a media type"),
        ('{"__cmwc_t": "other", "evidence": ["text/plain", ""]}', "collection type"),
        (json.dumps({"__cmwc_t": COLLECTION_TYPE}), "no 'evidence' member"),
        ('["application/vnd.intel.sgx.quote", "AAAA", -1]', "indicator"),
    ],
)
def test_malformed_cmw_names_the_problem(text, needle):
    with pytest.raises(EvidenceFormatError, match=None) as ei:
        Evidence.from_cmw(text)
    assert needle in str(ei.value)


def test_oversized_evidence_refused():
    big = Evidence(MEDIA_TYPES["tdx"], b"\0" * (300 * 1024)).to_cmw()
    with pytest.raises(EvidenceFormatError, match="limit"):
        Evidence.from_cmw(big)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_fuzz_only_safehold_errors(blob):
    try:
        Evidence.from_cmw(blob)
    except SafeholdError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(sorted(MEDIA_TYPES.values())))
def test_round_trip_any_bytes(data, mt):
    ev = Evidence(mt, data)
    assert Evidence.from_cmw(ev.to_cmw()) == ev
