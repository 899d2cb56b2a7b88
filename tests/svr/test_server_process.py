"""Three SVR server processes over three anchor member processes on loopback: RA-TLS on the
simulated TEE, each server its own attested workload, store and ledger; driven by the SDK, the
CLI and raw attested HTTP. Covers what only processes show: attestation before any byte is
sent, a server killed after charging a guess, a restore of an older database copy while the
server is stopped or running, parallel guesses over the network."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from contextlib import closing

import httpx
import pytest
from click.testing import CliRunner

from safehold.cli.main import cli
from safehold.client.records import attesting_transport
from safehold.client.svr import Svr2Client, Svr3Client
from safehold.errors import AttestationError, SafeholdError
from safehold.svr.errors import BackupMissingError, PinMismatchError, SvrClientError
from safehold.svr.pin import make_salt, normalise_pin, stretch
from safehold.svr.protocol import backup_id
from tests.support.freshness import restore_file, sqlite_copy
from tests.support.svr import GROUP_ID, TEST_ARGON2, USER_TOKEN, SvrProcesses

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::safehold.attestation.errors.SimulatedTEEWarning")]
SECRET = b"device key of dr. example \x00\xff"


@pytest.fixture
def stack(tmp_path, package):
    s = SvrProcesses(tmp_path, package)
    s.start_all()
    assert s.initialise() == ["initialise"] * 3
    yield s
    s.stop_all()


def _access_key(pin: str) -> str:
    salt = make_salt(backup_id("patient-1", "default"), GROUP_ID)
    return base64.b64encode(stretch(normalise_pin(pin), salt, TEST_ARGON2).access_key).decode()


def _raw(stack, i=0, token=USER_TOKEN) -> httpx.Client:
    """Attested raw HTTP to server ``i`` (what an attacker's script with the user's token uses)."""
    return httpx.Client(base_url=stack.urls[i], transport=attesting_transport(stack.policy()),
                        headers={"Authorization": f"Bearer {token}"}, timeout=30)


def test_three_attested_servers_back_up_and_restore(stack):
    assert len(set(stack.measurements)) == 3  # each server its own Reference Value (its name)
    with stack.client(Svr3Client) as c:  # production Argon2id
        infos = c.info()
        assert [i["name"] for i in infos] == ["svr-0", "svr-1", "svr-2"]
        c.backup("482916", SECRET, max_tries=5)
        with pytest.raises(PinMismatchError) as e:
            c.restore("482917")
        assert e.value.tries == 4
        assert c.restore("482916") == SECRET
        assert {(s.status, s.tries) for s in c.query()} == {("OK", 5)}
    with stack.client(Svr2Client) as c2:
        c2.backup("4711", b"svr2 secret", max_tries=3)
        assert c2.restore("4711") == b"svr2 secret"


def test_the_client_attests_every_server_before_sending(stack):
    # a policy that accepts svr-0 and svr-1 only: svr-2's Evidence fails in the TLS handshake,
    # before the request (with the bearer token) is written
    partial = stack.policy(measurements=stack.measurements[:2])
    with Svr3Client(stack.urls, token=USER_TOKEN, policy=partial) as c:
        with pytest.raises(AttestationError) as e:
            c.backup("1234", SECRET)
        assert "measurement" in str(e.value).lower() or "reference" in str(e.value).lower()
        for s in c.servers[:2]:
            assert s.http.get("/healthz").status_code == 200  # the accepted two are reachable
    with pytest.raises(ValueError, match="policy"):
        Svr3Client(stack.urls, token=USER_TOKEN)  # no policy, no transport: refused
    with stack.client(Svr3Client, argon2=TEST_ARGON2) as c:
        assert {s.status for s in c.query()} == {"MISSING"}  # nothing was created anywhere


def test_a_guess_charged_before_a_crash_stays_charged(stack):
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c:
        c.backup("1234", SECRET, max_tries=5)
    db = stack.root / "svr-0.db"

    def journal_rows() -> int:
        with closing(sqlite3.connect(db)) as con:
            sql = ("SELECT count(*) FROM safehold_rows WHERE "
                   "ns = (SELECT id FROM safehold_namespaces WHERE name = '_fresh.journal')")
            return con.execute(sql).fetchone()[0]

    before = journal_rows()
    members = [p for p in stack.anchor.procs if p is not None]
    for p in members:  # the anchor stops answering: the commit reaches the database, not the anchor
        p.send_signal(signal.SIGSTOP)
    answer: dict = {}

    def guess() -> None:
        try:
            with _raw(stack) as h:
                r = h.post("/v1/svr2/restore", json={"pin": _access_key("9999")})
                answer["status"], answer["body"] = r.status_code, r.json()
        except httpx.HTTPError as e:
            answer["error"] = type(e).__name__

    t = threading.Thread(target=guess)
    t.start()
    deadline = time.monotonic() + 20
    while journal_rows() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert journal_rows() == before + 1  # charged in the database
    stack.kill(0)  # SIGKILL before the anchor confirmed it
    for p in members:
        p.send_signal(signal.SIGCONT)
    t.join(30)
    assert answer.get("status") != 200  # the guess was never answered
    stack.start(0)  # the restarted server rolls the charged guess forward
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c:
        assert c.query().tries == 4
        assert c.restore("1234") == SECRET


def test_svr3_guesses_survive_a_kill_in_flight(stack):
    with stack.client(Svr3Client, argon2=TEST_ARGON2) as c:
        c.backup("1234", SECRET, max_tries=200)
    answered = []

    def attacker() -> None:
        with stack.client(Svr3Client, argon2=TEST_ARGON2) as c:
            for n in range(200):
                try:
                    c.restore(f"{5000 + n}")
                except PinMismatchError:
                    answered.append(n)
                except (SvrClientError, httpx.HTTPError, SafeholdError):
                    return

    t = threading.Thread(target=attacker)
    t.start()
    time.sleep(1.0)
    stack.kill(1)  # mid-run: the attacker's next guess meets a dead server
    t.join(60)
    assert 1 <= len(answered) < 150  # the kill landed while guessing
    stack.start(1)
    with stack.client(Svr3Client, argon2=TEST_ARGON2) as c:
        tries = [s.tries for s in c.query()]
        # every answered guess was charged everywhere (a guess in flight may be charged unanswered)
        assert all(t_ <= 200 - len(answered) for t_ in tries), (tries, len(answered))
        assert c.restore("1234") == SECRET  # the restarted server still holds its share


def test_older_database_copy_is_refused_stopped_and_running(stack):
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c:
        c.backup("1234", SECRET, max_tries=10)
    db = stack.root / "svr-0.db"
    old = stack.root / "old-copy.db"
    sqlite_copy(db, old)  # the operator's copy: 10 tries
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c:
        for _ in range(3):
            with pytest.raises(PinMismatchError):
                c.restore("0000")
    # running: the operator puts the old rows back under the live server
    with closing(sqlite3.connect(db, timeout=10)) as con:
        con.execute("ATTACH DATABASE ? AS bk", (str(old),))
        with con:
            con.execute("DELETE FROM main.safehold_rows")
            con.execute("INSERT INTO main.safehold_rows SELECT * FROM bk.safehold_rows")
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c:
        with pytest.raises(SvrClientError) as e:
            c.restore("1234")
        assert e.value.status == 409 and e.value.code == "stale-data"
    # stopped: the old file copied over the store, then the server started again
    stack.stop(0)
    restore_file(old, db)
    stack.start(0)
    with _raw(stack) as h:
        r = h.get("/healthz")
        assert r.status_code == 503 and "behind the anchor" in r.json()["detail"]
        r = h.post("/v1/svr2/restore", json={"pin": _access_key("1234")})
        assert r.status_code == 503 and r.json()["error"] == "not-fresh"
        assert h.post("/v1/svr2/query", json={}).status_code == 503  # tries are not even shown


def test_fifty_parallel_wrong_guesses_over_ratls(stack):
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c:
        c.backup("1234", SECRET, max_tries=10)
    with stack.client(Svr3Client, argon2=TEST_ARGON2) as c:
        c.backup("1234", SECRET, max_tries=10)
    from safehold.crypto import oprf
    from safehold.svr import db4

    start = threading.Barrier(50)
    results: list = []

    def one(i: int, path: str, body: dict) -> None:
        with _raw(stack) as h:
            h.get("/healthz")  # attest (TLS handshake) before the race
            start.wait()
            results.append((path, h.post(path, json=body).json()))

    salt = make_salt(backup_id("patient-1", "default"), GROUP_ID)
    for path, make in (
        ("/v1/svr2/restore", lambda i: {"pin": _access_key(f"{9000 + i}")}),
        ("/v1/svr3/restore1", lambda i: {"blinded": base64.b64encode(oprf.blind([db4.oprf_input(
            stretch(normalise_pin(f"{9000 + i}"), salt, TEST_ARGON2).raw)]).elements[0]).decode()}),
    ):
        results.clear()
        threads = [threading.Thread(target=one, args=(i, path, make(i))) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 50
        statuses = Counter(r["status"] for _, r in results)
        if path.endswith("restore"):
            assert statuses == {"PIN_MISMATCH": 9, "MISSING": 41}
            left = sorted(r["tries"] for _, r in results if r["status"] == "PIN_MISMATCH")
            assert left == list(range(1, 10))
        else:
            assert statuses == {"OK": 10, "MISSING": 40}
            assert sorted(r["tries"] for _, r in results if r["status"] == "OK") == list(range(10))
    with stack.client(Svr2Client, argon2=TEST_ARGON2) as c, pytest.raises(BackupMissingError):
        c.restore("1234")


def test_cli_backup_query_restore_delete(stack, tmp_path):
    secret_file, out = tmp_path / "key.bin", tmp_path / "restored.bin"
    secret_file.write_bytes(SECRET)
    policy = tmp_path / "svr-policy.toml"
    policy.write_text(stack.policy_toml())
    env = {"SAFEHOLD_SVR_TOKEN": USER_TOKEN, "SAFEHOLD_SVR_URLS": ",".join(stack.urls)}
    runner = CliRunner()

    def svr(*args: str, pin: str | None = None):
        return runner.invoke(cli, ["svr", args[0], "--policy", str(policy), *args[1:]], env=env,
                             input=pin)

    r = svr("backup", "--secret-file", str(secret_file), "--tries", "4", pin="246810\n246810\n")
    assert r.exit_code == 0, r.output
    assert "246810" not in r.output  # the PIN is never echoed
    r = svr("query")
    assert r.exit_code == 0 and r.output.count("tries=4/4") == 3, r.output
    r = svr("restore", "--out", str(out), pin="111111\n")
    assert r.exit_code == 1 and "3 tries left" in r.output and not out.exists()
    r = svr("restore", "--out", str(out), pin="246810\n")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == SECRET and (os.stat(out).st_mode & 0o777) == 0o600
    r = svr("restore", "--pin", "246810", "--out", str(out))
    assert r.exit_code == 2 and "No such option" in r.output  # no PIN in argv
    r = svr("backup", "--secret-file", str(secret_file), pin="246810\n246811\n")
    assert r.exit_code != 0  # the repeated PIN differs: nothing backed up
    r = svr("delete", "--yes")
    assert r.exit_code == 0
    r = svr("restore", "--out", str(out), pin="246810\n")
    assert r.exit_code == 1 and "no SVR3 backup" in r.output
