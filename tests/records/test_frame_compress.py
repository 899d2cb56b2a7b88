"""Compress-then-encrypt record frames (frame version 2, :mod:`safehold.records.frame`) on both
store engines: round trips of real Synthea patients, the 256-byte padding, rows a key holder
built wrongly (corrupt zlib stream, bomb, bad padding) refused as corrupted, version 1 rows still
read (and re-sealed by rotation), a database edit still refused, and the repository paths that
use the record's bytes after decryption seeing JSON."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest

from safehold.crypto import envelope
from safehold.crypto.keyset import Keyset
from safehold.errors import RecordTamperedError
from safehold.records.access_audit import AccessAuditLog
from safehold.records.commit import GroupCommit
from safehold.records.engine import RecordEngine
from safehold.records.errors import RecordCorruptedError
from safehold.records.frame import AAD_LABEL, FRAME_EXACT, FRAME_VERSION, MAX_INFLATED, PAD_BUCKET, RowFrame
from safehold.records.model import encode_record, parse_record
from safehold.records.reindex import ensure_search_index
from safehold.records.repository import PatientRepository
from safehold.store import open_store
from tests.support.engine_backends import Backend
from tests.support.shared import DATA, need_shared

NS = "patients"
SNS = "records:" + NS


@pytest.fixture
def engine(backend: Backend, keyset: Keyset) -> RecordEngine:
    return RecordEngine(backend.open(), keyset, compress=True)


def patients(n: int = 22) -> list[dict]:
    """Real Synthea FHIR R4 Patients from ../shared/data (as bench/records.py patient_record())."""
    folder = need_shared(DATA / "synthea-fhir-r4-bundles-google-fhir-data-pipes")
    out = []
    for f in sorted(folder.glob("*.json"))[:n]:
        b = json.loads(f.read_bytes())
        out.extend(e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "Patient")
    assert out, folder
    return out


def _raw(backend: Backend, key: bytes) -> tuple[int, bytes]:
    (row,) = backend.sql("SELECT version, value FROM {t} WHERE "
                         "ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?", (SNS, key))
    return row[0], row[1]


def _set_value(backend: Backend, key: bytes, value: bytes) -> None:
    backend.sql("UPDATE {t} SET value = ? WHERE ns = (SELECT id FROM {n} WHERE name = ?) AND key = ?",
                (value, SNS, key))


def _inner(engine: RecordEngine, value: bytes) -> tuple[int, bytes]:
    """(frame version, AEAD plaintext) of a stored value, opened with the keys (as the TEE)."""
    n = value[1]
    hl = 2 + n + 1 + value[2 + n] + 8
    return value[0], engine.codec.open(value[hl:], AAD_LABEL + value[:hl])


def _plant(backend: Backend, engine: RecordEngine, key: str, inner: bytes,
           frame: int = FRAME_VERSION) -> None:
    """Seal ``inner`` as the AEAD plaintext of ``key``'s row with the real keys and put it in
    place of the row's value: a row only a key holder (a buggy or compromised writer) can make."""
    row_key = engine.row_index(NS, key)
    version, _ = _raw(backend, row_key)
    header = RowFrame.header(SNS, row_key, version, frame)
    _set_value(backend, row_key, header + engine.codec.seal(inner, AAD_LABEL + header))


def _body(kb: bytes, fmt: int, payload: bytes, pad: int | None = None) -> bytes:
    head = struct.pack(">H", len(kb)) + kb + struct.pack(">BI", fmt, len(payload)) + payload
    return head + bytes(-len(head) % PAD_BUCKET if pad is None else pad)


# --- round trips ------------------------------------------------------------------------------


def test_real_patients_round_trip_compressed_and_padded(backend: Backend, engine: RecordEngine):
    """Every Synthea patient of ../shared round-trips; the database holds the zlib form padded to
    256 bytes, well under the JSON's length; the JSON's bytes appear nowhere in the database."""
    recs = {p["id"]: encode_record(p) for p in patients()}
    for rid, raw in recs.items():
        engine.put(NS, rid, raw)
    for rid, raw in recs.items():
        assert engine.get(NS, rid) == (raw, 1)
        _, stored = _raw(backend, engine.row_index(NS, rid))
        frame, inner = _inner(engine, stored)
        assert frame == FRAME_VERSION and len(inner) % PAD_BUCKET == 0
        k = 2 + len(rid)
        fmt, n = struct.unpack_from(">BI", inner, k)
        assert fmt == 1 and zlib.decompress(inner[k + 5: k + 5 + n]) == raw
        assert len(inner) - (k + 5 + n) < PAD_BUCKET and not any(inner[k + 5 + n:])
        assert len(stored) < 0.5 * len(raw), (len(stored), len(raw))
    assert sorted(k for k, _, _ in engine.items(NS)) == sorted(recs)
    every = repr(backend.sql("SELECT * FROM {t}")).encode()
    some = next(iter(recs.values()))
    assert some[:40] not in every and b"resourceType" not in every


def test_small_value_is_stored_not_compressed(backend: Backend, engine: RecordEngine):
    """A value zlib cannot shorten is stored as is (format 0x00), still padded to 256."""
    for value in (b"", b"x", b'{"id":"p1"}', os.urandom(300)):
        engine.put(NS, "k", value)
        assert engine.get(NS, "k")[0] == value
        frame, inner = _inner(engine, _raw(backend, engine.row_index(NS, "k"))[1])
        assert frame == FRAME_VERSION and inner[3] == 0 and inner[8: 8 + len(value)] == value
        assert len(inner) == PAD_BUCKET * -(-(8 + len(value)) // PAD_BUCKET)


@pytest.mark.parametrize("used", [255, 256, 257, 511, 512, 513])
def test_padding_boundaries(backend: Backend, engine: RecordEngine, used: int):
    """Plaintext of key "k" and an incompressible value: 2 + 1 + 5 + len(value) bytes before the
    padding, rounded up to the next multiple of 256 (an exact multiple gets no padding)."""
    value = os.urandom(used - 8)
    engine.put(NS, "k", value)
    assert engine.get(NS, "k")[0] == value
    _, inner = _inner(engine, _raw(backend, engine.row_index(NS, "k"))[1])
    assert len(inner) == {255: 256, 256: 256, 257: 512, 511: 512, 512: 512, 513: 768}[used]


def test_value_over_the_bound_is_stored_as_is(engine: RecordEngine, backend: Backend):
    """Over MAX_INFLATED the frame does not compress (so every stream it writes inflates within
    the bound it reads with); the value still round-trips."""
    big = b"a" * (MAX_INFLATED + 1)
    engine.put(NS, "big", big)
    assert engine.get(NS, "big")[0] == big
    _, inner = _inner(engine, _raw(backend, engine.row_index(NS, "big"))[1])
    assert inner[5] == 0
    exact = b"a" * MAX_INFLATED
    engine.put(NS, "big", exact)
    assert engine.get(NS, "big")[0] == exact
    assert _inner(engine, _raw(backend, engine.row_index(NS, "big"))[1])[1][5] == 1


# --- rows only a key holder can make: refused, fail closed -------------------------------------


def _corrupt_cases(raw: bytes) -> list[tuple[str, bytes, str]]:
    kb = b"p1"
    z = zlib.compress(raw, 3)
    flipped = bytearray(z)
    flipped[len(z) // 2] ^= 0xFF
    bad_check = z[:-1] + bytes([z[-1] ^ 1])
    return [
        ("garbage under the zlib tag", _body(kb, 1, os.urandom(600)), "malformed|does not end"),
        ("flipped byte inside the stream", _body(kb, 1, bytes(flipped)), "malformed|does not end"),
        ("adler-32 wrong", _body(kb, 1, bad_check), "malformed"),
        ("stream cut short", _body(kb, 1, z[:-10]), "does not end exactly"),
        ("bytes after the stream's end", _body(kb, 1, z + b"\x00\x01"), "does not end exactly"),
        ("empty stream", _body(kb, 1, b""), "does not end exactly"),
        ("raw deflate without the RFC 1950 wrapper", _body(kb, 1, zlib.compress(raw, 3, -15)),
         "malformed|does not end"),
        ("unknown format byte", _body(kb, 2, z), "unknown record value format 0x02"),
        ("length past the plaintext", _body(kb, 1, z)[:2 + 2] + b"\x01" + struct.pack(">I", 4096)
         + z + bytes(256), "does not hold"),
        ("padding not zero", _body(kb, 0, b"abc")[:-1] + b"\x01", "not all zero"),
        ("padding of a whole extra bucket", _body(kb, 0, b"abc") + bytes(256), "does not hold"),
        ("plaintext not a multiple of 256", _body(kb, 0, b"abc", pad=3), "does not hold"),
        ("value header cut", struct.pack(">H", 2) + kb + b"\x01\x00", "truncated"),
    ]


def test_corrupt_compressed_rows_under_a_valid_tag_are_refused(backend: Backend, engine: RecordEngine):
    """Rows sealed with the real keys (GCM authenticates them) whose version 2 body is wrong:
    every one is RecordCorruptedError naming the row's blind index and no content, never a
    zlib.error; the listing paths refuse them too; a good row then reads again."""
    raw = encode_record(patients(1)[0])
    engine.put(NS, "p1", raw)
    idx = engine.row_index(NS, "p1")
    _, good = _raw(backend, idx)
    for what, inner, msg in _corrupt_cases(raw):
        _plant(backend, engine, "p1", inner)
        with pytest.raises(RecordCorruptedError, match=msg) as ei:
            engine.get(NS, "p1")
        assert idx.hex() in str(ei.value), what
        assert raw[:20].decode() not in str(ei.value) and "p1" not in str(ei.value).replace(idx.hex(), "")
        with pytest.raises(RecordCorruptedError):
            engine.list(NS)
        page = engine.list_page(NS, skip_tampered=True)
        assert page.keys == [] and len(page.tampered) == 1, what
        got = engine.get_many_at([engine.address(NS, "p1")])
        assert isinstance(got[0], RecordCorruptedError), what
    _set_value(backend, idx, good)
    assert engine.get(NS, "p1") == (raw, 1)


def test_decompression_bomb_is_bounded(backend: Backend, engine: RecordEngine):
    """A 64 MiB zlib bomb (~64 KB) under a valid tag: refused after inflating at most
    MAX_INFLATED + 1 bytes (peak allocation far below 64 MiB); exactly MAX_INFLATED inflates."""
    co = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    bomb = b"".join(co.compress(chunk) for _ in range(64)) + co.flush()
    assert len(bomb) < 128 * 1024
    engine.put(NS, "p1", b"x")
    _plant(backend, engine, "p1", _body(b"p1", 1, bomb))
    tracemalloc.start()
    try:
        with pytest.raises(RecordCorruptedError, match=f"inflates past {MAX_INFLATED} bytes"):
            engine.get(NS, "p1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_INFLATED, peak
    _plant(backend, engine, "p1", _body(b"p1", 1, zlib.compress(bytes(MAX_INFLATED), 9)))
    assert engine.get(NS, "p1")[0] == bytes(MAX_INFLATED)
    _plant(backend, engine, "p1", _body(b"p1", 1, zlib.compress(bytes(MAX_INFLATED + 1), 9)))
    with pytest.raises(RecordCorruptedError, match="inflates past"):
        engine.get(NS, "p1")


# --- the database's edits: still refused by GCM -----------------------------------------------


def test_database_edits_of_a_compressed_row_are_refused(backend: Backend, engine: RecordEngine):
    """A DBA flipping any ciphertext byte, or turning frame version 2 into 1 (a downgrade to
    the exact-length reading), fails authentication: the frame version is in the AAD."""
    raw = encode_record(patients(1)[0])
    engine.put(NS, "p1", raw)
    idx = engine.row_index(NS, "p1")
    _, good = _raw(backend, idx)
    n = good[1]
    hl = 2 + n + 1 + good[2 + n] + 8
    for pos in (hl + 20, hl + 100, len(good) - 200, len(good) - 1):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        _set_value(backend, idx, bytes(bad))
        with pytest.raises(RecordCorruptedError, match="authentication failed"):
            engine.get(NS, "p1")
    _set_value(backend, idx, bytes([FRAME_EXACT]) + good[1:])
    with pytest.raises(RecordCorruptedError, match="authentication failed"):
        engine.get(NS, "p1")
    _set_value(backend, idx, bytes([3]) + good[1:])
    with pytest.raises(RecordCorruptedError, match="not a record frame"):
        engine.get(NS, "p1")
    _set_value(backend, idx, good[:-256])  # one padding bucket less
    with pytest.raises(RecordTamperedError):
        engine.get(NS, "p1")
    _set_value(backend, idx, good)
    assert engine.get(NS, "p1") == (raw, 1)


# --- version 1 rows ----------------------------------------------------------------------------


def _v1_row(keyset: Keyset, row_key: bytes, version: int, kb: bytes, value: bytes) -> bytes:
    """A frame version 1 row built by hand from the layout (as the code before compression
    wrote it): header || envelope(u16 len(key) || key || value)."""
    ns = SNS.encode()
    header = bytes((1, len(ns))) + ns + bytes((len(row_key),)) + row_key + struct.pack(">Q", version)
    plain = struct.pack(">H", len(kb)) + kb + value
    return header + envelope.seal(keyset, plain, b"safehold/record/v1" + header)


def test_version_1_rows_still_open_and_rotation_reseals_them(backend: Backend, keyset: Keyset):
    """Rows in the old exact-length frame (hand-built, and written with compress=False) open
    under a compressing engine; rekey re-seals them as version 2 (values unchanged); a
    non-compressing engine keeps writing version 1 and reads version 2."""
    recs = {p["id"]: encode_record(p) for p in patients(6)}
    plain = RecordEngine(backend.open(), keyset)  # compress=False: today's frame
    rids = sorted(recs)
    for rid in rids[:3]:
        plain.put(NS, rid, recs[rid])
    for rid in rids[3:]:
        plain.put(NS, rid, b"placeholder")  # registers the row; replaced by a hand-built one
        row_key = plain.row_index(NS, rid)
        _set_value(backend, row_key, _v1_row(keyset, row_key, 1, rid.encode(), recs[rid]))
    for rid in rids:
        stored = _raw(backend, plain.row_index(NS, rid))[1]
        assert stored[0] == FRAME_EXACT and len(stored) > len(recs[rid])
    comp = RecordEngine(backend.open(), keyset, compress=True)
    for rid in rids:
        assert comp.get(NS, rid) == (recs[rid], 1)
    assert sorted(comp.list(NS)) == rids
    old = keyset.primary_id
    keyset.add(primary=True)
    assert comp.rekey(batch_size=2).rekeyed == len(rids)
    keyset.retire(old)
    for rid in rids:
        assert comp.get(NS, rid) == (recs[rid], 2)
        stored = _raw(backend, comp.row_index(NS, rid))[1]
        assert stored[0] == FRAME_VERSION and len(stored) < 0.5 * len(recs[rid])
        assert plain.get(NS, rid) == (recs[rid], 2)  # the exact-length engine reads version 2
    plain.put(NS, rids[0], recs[rids[0]])
    assert _raw(backend, plain.row_index(NS, rids[0]))[1][0] == FRAME_EXACT
    assert comp.get(NS, rids[0]) == (recs[rids[0]], 3)


def test_rekey_with_compression_off_keeps_exact_length(backend: Backend, keyset: Keyset):
    """compress=False: rotation re-seals in frame version 1, the stored length follows the
    value's exact length (header + 33 envelope bytes + 2 + key + value)."""
    e = RecordEngine(backend.open(), keyset)
    raw = encode_record(patients(1)[0])
    e.put(NS, "p1", raw)
    keyset.add(primary=True)
    e.rekey()
    stored = _raw(backend, e.row_index(NS, "p1"))[1]
    assert stored[0] == FRAME_EXACT
    assert len(stored) == 2 + len(SNS) + 1 + 16 + 8 + envelope.OVERHEAD + 2 + 2 + len(raw)
    assert e.get(NS, "p1") == (raw, 2)


# --- the repository: every path sees JSON -----------------------------------------------------


def _repo(db: Path, ks: Keyset, *, compress: bool) -> PatientRepository:
    store = open_store(f"sqlite:///{db}")
    c = GroupCommit(store)
    return PatientRepository(store, ks, committer=c, audit=AccessAuditLog(store, c, mac_key=b"k" * 32),
                             compress=compress)


def test_repository_paths_see_json_over_mixed_frames(tmp_path: Path):
    """Half the patients written exact-length (compress=False), half compressed, on one SQLite
    file: GET, get_raw, search (decoded and raw answers, the terms memo), find(keep_raw=…),
    vread from the history, the index rebuild and batch's unchanged check all see the JSON."""
    ks = Keyset.generate()
    pats = patients()
    db = tmp_path / "r.db"
    old = _repo(db, ks, compress=False)
    half = len(pats) // 2
    for p in pats[:half]:
        old.put("w", parse_record(p["id"], p))
    old.engine.store.close()
    repo = _repo(db, ks, compress=True)
    for p in pats[half:]:
        repo.put("w", parse_record(p["id"], p))
    seen = {row.value[0] for row in repo.engine.store.scan_all(SNS)}
    assert seen == {FRAME_EXACT, FRAME_VERSION}
    for p in pats:
        raw = encode_record(p)
        assert repo.get_raw("r", p["id"]) == (raw, 1)
        assert repo.get("r", p["id"])[0] == p
        fam = p["name"][0]["family"]
        hits = repo.search_raw("r", {"family": fam})
        assert (p["id"], raw, 1) in hits
        assert any(rid == p["id"] for rid, _ in repo.search("r", {"family": fam}))
        assert repo.terms_of(raw, frozenset({"family"}))  # memo keyed by the JSON
        seen_raw: list[bytes] = []
        page = repo.find("r", None, lambda _r, _o: True, keep_raw=lambda _r, b: seen_raw.append(b) or True)
        assert raw in seen_raw and p["id"] in [h[0] for h in page.hits]
    # history keeps the replaced version's JSON
    p0 = dict(pats[0], gender="other")
    repo.put("w", parse_record(p0["id"], p0))
    assert repo.get_version("r", p0["id"], 1) == encode_record(pats[0])
    assert repo.get_version("r", p0["id"], 2) == encode_record(p0)
    # a batch of the same JSON is "unchanged" whichever frame holds it
    res = repo.batch("w", [parse_record(p["id"], p) for p in pats[1:]])
    assert {r["status"] for r in res} == {"unchanged"}
    # the index rebuild decodes JSON from both frames
    repo.engine.put(f"{repo.ns}.meta", "search-index-format", b"old")
    assert ensure_search_index(repo) == len(pats)
    assert (pats[1]["id"], encode_record(pats[1]), 1) in repo.search_raw(
        "r", {"family": pats[1]["name"][0]["family"]})
    repo.engine.store.close()


# --- the service, in process ------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_service_answers_json_with_compression_on_and_off(tmp_path: Path, compress: bool):
    """assemble_apps with the measured ``compress``: GET, search (stored JSON embedded in the
    answer), FHIR read and search answer the record's JSON; the rows of both repositories
    (Patients and other FHIR resources) are in the frame version the switch selects."""
    import sqlite3

    from safehold.records.server import assemble_apps
    from tests.support.records_service import Service, access_list

    db = tmp_path / "records.db"
    store = open_store(f"sqlite:///{db}")
    try:
        native, scone, repo = assemble_apps(store, Keyset.generate(), access_list(), scone_auth=None,
                                            compress=compress)
        api = Service(native, scone, repo, store, db).api("writer")
        p = patients(1)[0]
        rid, fam = p["id"], p["name"][0]["family"]
        assert api.put(f"/v1/patients/{rid}", json=p).status_code == 201
        r = api.get(f"/v1/patients/{rid}")
        assert r.status_code == 200 and r.content == encode_record(p)
        r = api.get("/v1/patients", params={"family": fam})
        assert r.status_code == 200 and r.json()["records"] == [{"id": rid, "record": p, "version": 1}]
        fj = {"Content-Type": "application/fhir+json"}
        obs = {"resourceType": "Observation", "id": "o1", "status": "final",
               "code": {"text": "x" * 400}, "subject": {"reference": f"Patient/{rid}"}}
        assert api.put("/fhir/Observation/o1", content=json.dumps(obs), headers=fj).status_code == 201
        assert api.get(f"/fhir/Patient/{rid}").json()["name"] == p["name"]
        assert api.get("/fhir/Observation/o1").json()["code"] == obs["code"]
        bundle = api.get(f"/fhir/Patient?family={fam}").json()
        assert [e["resource"]["id"] for e in bundle["entry"]] == [rid]
    finally:
        store.close()
    conn = sqlite3.connect(db)
    try:
        firsts = {ns: {v[0] for (v,) in conn.execute(
            "SELECT value FROM safehold_rows WHERE "
            "ns = (SELECT id FROM safehold_namespaces WHERE name = ?)", (ns,))}
            for ns in ("records:patients", "records:resources")}
    finally:
        conn.close()
    want = {FRAME_VERSION if compress else FRAME_EXACT}
    assert firsts == {"records:patients": want, "records:resources": want}
