"""RA-TLS end to end: demo servers run as processes on loopback; the client transport attests
before sending, and a refused server never sees a request (asserted from the server's log)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from safehold.attestation.errors import ReferenceValueMismatchError, SimulatedEvidenceError
from safehold.attestation.measure import package_root
from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.attestation.workload import LaunchSpec, package_app_dir
from safehold.cli.main import cli
from safehold.errors import RATLSError
from safehold.ratls import MissingEvidenceError
from safehold.ratls.client import AsyncRATLSTransport, RATLSTransport, fetch_peer_certificate

pytestmark = pytest.mark.slow  # starts processes on loopback


class Server:
    def __init__(self, proc: subprocess.Popen, info: dict, log: Path) -> None:
        self.proc, self.info, self.log = proc, info, log
        self.url = f"https://127.0.0.1:{info['port']}/"

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def requests(self) -> int:
        return sum(line.startswith("request") for line in self.lines())

    def wait_for(self, word: str, count: int, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sum(line == word for line in self.lines()) >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"server log never showed {count}x {word!r}: {self.lines()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def demo_launch(app_dir: Path | None = None) -> LaunchSpec:
    """The demo server's workload launch (isolated; ``app_dir``: a package copy's parent)."""
    return LaunchSpec("safehold.ratls.demo", app_dir=str(app_dir) if app_dir else package_app_dir())


def start(workdir: Path, *args: str, pythonpath: Path | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    ready, log = workdir / "ready.json", workdir / "server.log"
    spec = demo_launch(pythonpath)
    proc = subprocess.Popen(
        spec.argv("--data-dir", str(workdir / "data"), "--port", "0", "--ready-file", str(ready),
                  "--log", str(log), *args),
        env=spec.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=workdir,
    )
    end = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"demo server exited: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("demo server did not become ready")
        time.sleep(0.05)
    return Server(proc, json.loads(ready.read_text()), log)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("ratls-server"))
    yield s
    s.stop()


def good_verifier(server: Server) -> Verifier:
    return Verifier(AppraisalPolicy.from_toml(Path(server.info["policy"])))


def test_accepted_sync_and_connection_reuse(server: Server) -> None:
    before = server.requests()
    t = RATLSTransport(good_verifier(server))
    with httpx.Client(transport=t) as c:
        r1, r2 = c.get(server.url), c.get(server.url + "again")
    assert r1.status_code == 200 and r1.json()["measurement"] == server.info["measurement"]
    assert r2.status_code == 200
    assert t.connections_verified == 1  # verified once per new connection, then pooled
    assert t.last_appraisal is not None and t.last_appraisal.ok
    assert server.requests() == before + 2


def test_accepted_async(server: Server) -> None:
    async def go() -> int:
        async with httpx.AsyncClient(transport=AsyncRATLSTransport(good_verifier(server))) as c:
            return (await c.get(server.url)).status_code

    assert asyncio.run(go()) == 200


def _assert_refused_without_request(server: Server, verifier: Verifier, err: type[Exception]) -> None:
    before_req = server.requests()
    before_eof = sum(line == "no-request" for line in server.lines())
    with httpx.Client(transport=RATLSTransport(verifier)) as c, pytest.raises(err):
        c.post(server.url, content=b"patient record that must not leak")
    # the server saw the TLS connection end without any request bytes
    server.wait_for("no-request", before_eof + 1)
    assert server.requests() == before_req


def test_refused_wrong_measurement_no_request_reaches_server(server: Server) -> None:
    pol = AppraisalPolicy(allow_simulated=True, simulated_root=Path(server.info["simulated_root"]),
                          measurements=(bytes(48),), report_data="key-binding")
    _assert_refused_without_request(server, Verifier(pol), ReferenceValueMismatchError)


def test_refused_simulated_under_default_policy(server: Server) -> None:
    # RTMR1 of the dcap-qvl TDX sample
    rtmr1 = bytes.fromhex("0084452c01668329d4bc06acdf58a7205c26743304509973"
                          "949e5619bf81a6a7aea8c323c173019b3093d54e579e9378")
    pol = AppraisalPolicy(allowed_tee_types=("sgx", "tdx", "sev-snp"), min_tcb={"snp": 8},
                          tdx_registers={"rtmr1": (rtmr1,)},
                          simulated_root=Path(server.info["simulated_root"]),
                          measurements=(bytes.fromhex(server.info["measurement"]),))
    _assert_refused_without_request(server, Verifier(pol), SimulatedEvidenceError)


def test_async_refusal_sends_nothing(server: Server) -> None:
    pol = AppraisalPolicy(allow_simulated=True, simulated_root=Path(server.info["simulated_root"]),
                          measurements=(bytes(48),))
    before_req = server.requests()
    before_eof = sum(line == "no-request" for line in server.lines())

    async def go() -> None:
        async with httpx.AsyncClient(transport=AsyncRATLSTransport(Verifier(pol))) as c:
            await c.get(server.url)

    with pytest.raises(ReferenceValueMismatchError):
        asyncio.run(go())
    server.wait_for("no-request", before_eof + 1)
    assert server.requests() == before_req


def test_plain_http_url_refused(server: Server) -> None:
    with httpx.Client(transport=RATLSTransport(good_verifier(server))) as c, \
            pytest.raises(RATLSError, match="https"):
        c.get(server.url.replace("https", "http"))


def test_changed_package_byte_refused(server: Server, tmp_path: Path) -> None:
    """The server runs from a copy of the package with one changed byte: its measurement
    changes, and the policy holding the original Reference Value refuses it."""
    copy = tmp_path / "pkg" / "safehold"
    shutil.copytree(package_root(), copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    original = demo_launch(copy.parent).closure()
    target = copy / "errors.py"
    target.write_bytes(target.read_bytes() + b"\n")
    changed = start(tmp_path / "srv", pythonpath=copy.parent)
    try:
        assert changed.info["measurement"] == demo_launch(copy.parent).closure().hex()
        assert changed.info["measurement"] != original.hex()
        pol = AppraisalPolicy(allow_simulated=True,
                              simulated_root=Path(changed.info["simulated_root"]),
                              measurements=(original.digest,))
        _assert_refused_without_request(changed, Verifier(pol), ReferenceValueMismatchError)
    finally:
        changed.stop()


PLAIN_TLS_SERVER = textwrap.dedent("""
    import datetime, socket, ssl, sys, tempfile, os
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    d = tempfile.mkdtemp()
    open(os.path.join(d, "c.pem"), "wb").write(cert.public_bytes(serialization.Encoding.PEM))
    open(os.path.join(d, "k.pem"), "wb").write(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(d, "c.pem"), os.path.join(d, "k.pem"))
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4)
    print(s.getsockname()[1], flush=True)
    with ctx.wrap_socket(s, server_side=True) as ls:
        conn, _ = ls.accept()
        try:
            data = conn.recv(65536)
        except ssl.SSLError:  # unclean EOF: the peer closed without sending anything
            data = b""
        print("received", len(data), flush=True)
""")


def test_plain_tls_server_refused_missing_evidence(server: Server) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PLAIN_TLS_SERVER], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        with httpx.Client(transport=RATLSTransport(good_verifier(server))) as c, \
                pytest.raises(MissingEvidenceError):
            c.get(f"https://127.0.0.1:{port}/")
        assert proc.stdout.readline().strip() == "received 0"  # EOF, no request bytes
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()


def test_dropped_connection(tmp_path: Path) -> None:
    s = start(tmp_path / "drop")
    url = s.url
    s.stop()
    with pytest.raises(RATLSError, match="failed"):
        fetch_peer_certificate(url, timeout=3)
    with pytest.raises(httpx.ConnectError):
        with httpx.Client(transport=RATLSTransport(good_verifier(s))) as c:
            c.get(url)


def test_cli_attest(server: Server, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["attest", server.url, "--policy", server.info["policy"]])
    assert res.exit_code == 0, res.output
    assert "measurement" in res.output and "attested" in res.output and "FAIL" not in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text(Path(server.info["policy"]).read_text().replace(
        server.info["measurement"], "00" * 48))
    res = runner.invoke(cli, ["attest", server.url, "--policy", str(bad)])
    assert res.exit_code == 1
    assert "FAIL" in res.output and "measurement: expected 0000" in res.output
