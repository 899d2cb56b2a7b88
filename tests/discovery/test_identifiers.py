"""Identifier kinds: E.164 via libphonenumber, KVNR with its check digit, plug-in kinds."""

from __future__ import annotations

import pytest

from safehold.discovery import identifiers as ids
from safehold.discovery.errors import InvalidIdentifierError
from tests.support.discovery import patient_phone_numbers


@pytest.mark.parametrize("text,region,want", [
    ("+31 20 1234567", None, "+31201234567"),
    ("0031-20-1234567", "DE", "+31201234567"),
    ("020 1234567", "NL", "+31201234567"),
    ("(030) 901820", "DE", "+4930901820"),
    ("+49 151 12345678", "nl", "+4915112345678"),
])
def test_e164_normalises(text, region, want):
    assert ids.normalise("e164", text, region) == want


@pytest.mark.parametrize("text,region,msg", [
    ("", None, "empty"), ("not a number", None, "not a phone number"),
    ("020 1234567", None, "no default region"), ("+49 30 1", None, "not a valid number"),
    ("+999 12345678", None, "not a"),
])
def test_e164_refuses(text, region, msg):
    with pytest.raises(InvalidIdentifierError, match=msg) as e:
        ids.normalise("e164", text, region)
    assert text.strip() == "" or text not in str(e.value)  # never echoes the input


def test_patient_data_numbers_are_canonical():
    nums = patient_phone_numbers()
    assert len(nums) >= 3
    for n in nums:
        assert ids.normalise("e164", n) == n


@pytest.mark.parametrize("kvnr", ["X110411675", "A000000002", "A000000014", "Z999999997"])
def test_kvnr_valid(kvnr):
    first9 = kvnr[:9]
    assert ids.kvnr_check_digit(first9) == int(kvnr[9])
    assert ids.normalise("kvnr", kvnr) == kvnr


def test_kvnr_check_digit_by_hand():
    # X = 24 → 2 4 1 1 0 4 1 1 6 7, weights 1 2 1 2 …: 2 8 1 2 0 8 1 2 6 (14 → 1+4 = 5) → 35 → 5
    assert ids.kvnr_check_digit("X11041167") == 5
    assert ids.normalise("kvnr", " x110 411 675 ") == "X110411675"


@pytest.mark.parametrize("bad,msg", [
    ("X110411676", "check digit"), ("X11041167", "10 characters"), ("1110411675", "10 characters"),
    ("XX10411675", "10 characters"), ("X1104116750", "10 characters"), ("Ä110411675", "10 characters"),
])
def test_kvnr_refuses(bad, msg):
    with pytest.raises(InvalidIdentifierError, match=msg):
        ids.normalise("kvnr", bad)


def test_every_single_digit_error_is_caught():
    good = "X110411675"
    for pos in range(1, 10):
        for d in "0123456789":
            if d != good[pos]:
                with pytest.raises(InvalidIdentifierError):
                    ids.normalise("kvnr", good[:pos] + d + good[pos + 1:])


def test_oprf_input_separates_kinds_and_requires_canonical_form():
    a = ids.oprf_input("e164", "+31201234567")
    assert a.startswith(b"safehold-discovery/v1\x00e164\x00")
    assert ids.oprf_input("kvnr", "X110411675") != a
    with pytest.raises(InvalidIdentifierError, match="canonical"):
        ids.oprf_input("e164", "+31 20 1234567")
    with pytest.raises(InvalidIdentifierError, match="unknown identifier kind"):
        ids.oprf_input("email", "a@b")


def test_plug_in_kind():
    class Email:
        name = "email-test"

        def normalise(self, text, region=None):
            text = text.strip().lower()
            if "@" not in text:
                raise InvalidIdentifierError("email-test: no @")
            return text

    kind = Email()
    ids.register_kind(kind)
    ids.register_kind(kind)  # idempotent for the same object
    assert "email-test" in ids.kinds()
    assert ids.normalise("email-test", " A@B.example ") == "a@b.example"
    with pytest.raises(ValueError, match="already registered"):
        ids.register_kind(Email())
    with pytest.raises(ValueError, match="must match"):
        bad = Email()
        bad.name = "Bad Name"
        ids.register_kind(bad)
