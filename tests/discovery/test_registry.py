"""Registry over real stores: register / unregister / query, reload, tamper, and no identifier
(or plain hash of one) in the database bytes."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import psycopg
import pytest

from safehold.crypto import oprf
from safehold.discovery.core import DiscoveryService
from safehold.discovery.errors import InvalidIdentifierError, InvalidUserIdError, RegistryTamperedError
from safehold.discovery.identifiers import normalise, oprf_input
from safehold.discovery.protocol import decode_results
from safehold.discovery.registry import NAMESPACE
from safehold.store import open_store
from tests.support.discovery import client_outputs, kvnrs, patient_phone_numbers, synthetic_numbers


def ask(service, client, idents):
    outs = client_outputs(service, client, idents)
    ans = service.query(client, None, [], outs)
    return decode_results(b"".join(ans.results), len(idents))


def test_register_query_unregister(service):
    phones = patient_phone_numbers()
    ks = kvnrs(3)
    service.register([("e164", p, f"patient-{i}") for i, p in enumerate(phones)]
                     + [("kvnr", k, f"insured-{i}") for i, k in enumerate(ks)])
    idents = [("e164", p) for p in phones] + [("kvnr", k) for k in ks] + [("e164", "+4930901820")]
    assert ask(service, "c1", idents) == [f"patient-{i}" for i in range(len(phones))] + \
        [f"insured-{i}" for i in range(3)] + [None]
    assert service.unregister([("e164", phones[0]), ("kvnr", ks[1]), ("kvnr", kvnrs(5)[4])]) == 2
    got = ask(service, "c2", idents)
    assert got[0] is None and got[len(phones) + 1] is None and got[1] == "patient-1"
    service.register([("e164", phones[0], "someone-else")])
    assert ask(service, "c3", [("e164", phones[0])]) == ["someone-else"]


def test_registrations_survive_a_restart(store, keys, sqlite_url):
    a = DiscoveryService(store, keys)
    nums = synthetic_numbers(50)
    a.register([("e164", n, f"u{i}") for i, n in enumerate(nums)])
    a.unregister([("e164", nums[0])])
    with open_store(sqlite_url) as s2:
        b = DiscoveryService(s2, keys)
        assert b.load() == 49
        assert ask(b, "c", [("e164", nums[0]), ("e164", nums[1])]) == [None, "u1"]


def test_other_secret_finds_nothing_and_fails_closed(store, keys, sqlite_url):
    from safehold.discovery.keys import DiscoveryKeys

    DiscoveryService(store, keys).register([("e164", "+31201234567", "alice")])
    with open_store(sqlite_url) as s2:
        with pytest.raises(RegistryTamperedError, match="failed authentication"):
            DiscoveryService(s2, DiscoveryKeys.from_secret(b"\x01" * 32)).load()


def test_moved_or_edited_rows_are_refused(store, keys, sqlite_url):
    svc = DiscoveryService(store, keys)
    svc.register([("e164", "+31201234567", "alice"), ("e164", "+31648352638", "bob")])
    rows = list(store.scan_all(NAMESPACE))
    # swap the two values: each is bound to its row key
    with store.transaction() as tx:
        tx.put(NAMESPACE, rows[0].key, rows[1].value, expected_version=rows[0].version)
        tx.put(NAMESPACE, rows[1].key, rows[0].value, expected_version=rows[1].version)
    with open_store(sqlite_url) as s2:
        with pytest.raises(RegistryTamperedError, match=rows[0].key.hex()[:16]):
            DiscoveryService(s2, keys).load()


def test_bad_registrations_name_the_entry(service):
    with pytest.raises(InvalidIdentifierError, match="entry 1: kvnr: wrong check digit"):
        service.register([("kvnr", "X110411675", "a"), ("kvnr", "X110411676", "b")])
    with pytest.raises(InvalidUserIdError, match="entry 0"):
        service.register([("kvnr", "X110411675", "x" * 47)])
    with pytest.raises(InvalidUserIdError, match="entry 0"):
        service.register([("kvnr", "X110411675", "")])
    assert len(service.registry) == 0  # nothing half-written


def test_evaluate_refuses_bad_elements_before_charging(service):
    good = oprf.blind([oprf_input("e164", "+31201234567")]).elements[0]
    with pytest.raises(oprf.IdentityElementError, match="blinded element 1"):
        service.evaluate("c", [good, bytes(32)])
    with pytest.raises(oprf.InvalidElementError):
        service.evaluate("c", [b"\xff" * 32])
    assert service.limiter.max_evaluations == 400


# --- no plaintext and no plain hash in the database ----------------------------------------------


def encodings(e164: str) -> list[bytes]:
    digits = e164.lstrip("+")
    national = normalise("e164", e164)[3:]
    return [e164.encode(), digits.encode(), national.encode(), e164.encode("utf-16-le"),
            struct.pack(">Q", int(digits)), struct.pack("<Q", int(digits)),
            oprf_input("e164", e164)]


def needles(numbers: list[str], kvnr_list: list[str], user_ids: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for n in numbers:
        for i, enc in enumerate(encodings(n)):
            out[f"{n} enc{i}"] = enc
            for alg in ("sha256", "sha512", "sha1"):
                d = hashlib.new(alg, enc).digest()
                out[f"{alg}({n} enc{i})"] = d[:16]
                out[f"{alg}hex({n} enc{i})"] = d.hex()[:32].encode()
    for k in kvnr_list:
        for enc in (k.encode(), k[:9].encode(), oprf_input("kvnr", k)):
            out[f"{k}:{enc!r}"] = enc
            out[f"sha256({k})"] = hashlib.sha256(enc).digest()[:16]
            out[f"sha256hex({k})"] = hashlib.sha256(enc).hexdigest()[:32].encode()
    for u in user_ids:
        out[f"user {u}"] = u.encode()
    return out


def assert_absent(blob: bytes, table: dict[str, bytes], where: str) -> None:
    found = [name for name, needle in table.items() if needle in blob]
    assert not found, f"{where} holds {found[:5]}"


def test_sqlite_file_holds_no_identifier_or_hash(tmp_path, keys):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    numbers = patient_phone_numbers() + synthetic_numbers(20)
    ks = kvnrs(10, "Q")
    users = [f"user-{i:04d}-zq" for i in range(len(numbers) + len(ks))]
    with open_store(url) as s:
        svc = DiscoveryService(s, keys, limit=1000)
        svc.register([("e164", n, users[i]) for i, n in enumerate(numbers)]
                     + [("kvnr", k, users[len(numbers) + i]) for i, k in enumerate(ks)])
        ask(svc, "client-x", [("e164", n) for n in numbers[:5]])  # rate-limit rows too
        raw = b"".join(p.read_bytes() for p in Path(tmp_path).glob("reg.db*"))
        assert len(raw) > 4096
        table = needles(numbers, ks, users)
        # positive control: the search finds a number written in clear
        assert_absent(raw, table, "the SQLite files")
        with pytest.raises(AssertionError):
            assert_absent(raw + numbers[0].encode(), table, "control")


@pytest.mark.postgres
def test_postgres_table_holds_no_identifier_or_hash(pg_url, pg_schema, postgres_dsn, keys):
    numbers = patient_phone_numbers() + synthetic_numbers(10)
    ks = kvnrs(5, "R")
    users = [f"pg-user-{i:03d}" for i in range(len(numbers) + len(ks))]
    with open_store(pg_url) as s:
        svc = DiscoveryService(s, keys)
        svc.register([("e164", n, users[i]) for i, n in enumerate(numbers)]
                     + [("kvnr", k, users[len(numbers) + i]) for i, k in enumerate(ks)])
        assert ask(svc, "pg-client", [("e164", numbers[0])]) == [users[0]]
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(f'SELECT n.name, r.key, r.value FROM "{pg_schema}".safehold_rows r '
                            f'JOIN "{pg_schema}".safehold_namespaces n ON n.id = r.ns').fetchall()
    assert len(rows) == len(numbers) + len(ks) + 1
    raw = b"".join(ns.encode() + bytes(k) + bytes(v) for ns, k, v in rows)
    assert_absent(raw, needles(numbers, ks, users), "the PostgreSQL table")
