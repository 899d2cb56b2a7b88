"""Operator-attack review (8 Dec 2026): who controls the owner directory whose ``pins.json``
decides which client policy and workload CA the owner's tools trust?

The default owner directory is ``<data dir>.owner`` next to the data directory *as resolved*:
a data directory that is a symlink into the operator's storage (``./safehold-data`` →
``/srv/op/data``, a volume the operator manages) puts the default owner directory on the
operator's side (``/srv/op/data.owner``). The operator plants ``pins.json`` there (pinning its
own widened ``policy.toml`` and CA) and the CLIs trusted it. An owner directory (or its
``pins.json``) that another user owns or that group / others may write is now refused before
anything is read from it, on every path that reads pins (records CLI, service CLIs, broker
CLI, ``safehold status``) and by ``safehold up`` before it writes the owner's key there.
Real files; the operator is another uid (``nobody``), so the test needs root to chown.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import tomli_w

from safehold.attestation.attesters.simulated import SimulatedAttester
from safehold.cli.broker import broker_target
from safehold.client.connection import load_connection
from safehold.client.owner_pins import CLIENT_POLICIES, pinned_policy
from safehold.devstack.datadir import make_owner_dir, pin_client_policies
from safehold.errors import ConfigError

OPERATOR_UID = 65534  # nobody
M_OPERATOR = "cd" * 32

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def symlinked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``<user>/safehold-data`` → ``<op volume>/data``; the operator (uid nobody) owns the
    volume and plants ``data.owner/pins.json`` pinning its own policy, root and CA."""
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    monkeypatch.delenv("SAFEHOLD_TOKEN", raising=False)
    vol = tmp_path / "op-volume"
    d = vol / "data"
    d.mkdir(parents=True)
    user = tmp_path / "user"
    user.mkdir()
    link = user / "safehold-data"
    link.symlink_to(d)
    root = SimulatedAttester(d / "tee").root_ca_path
    text = tomli_w.dumps({"name": "op", "allow_simulated": True, "simulated_root": str(root),
                          "report_data": "required", "reference_values": {"measurements": [M_OPERATOR]}})
    for fname in CLIENT_POLICIES.values():
        (d / fname).write_text(text, "utf-8")
    (d / "up.json").write_text(json.dumps({"records_url": "https://127.0.0.1:9", "policy": "x",
                                           "broker_url": "https://127.0.0.1:9"}))
    # the operator's pins: written as `up` writes them, then handed to the operator's uid
    pin_client_policies(d, None, dict.fromkeys(CLIENT_POLICIES, text), root)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    ca = SimulatedAttester(vol / "op-ca").root_ca_pem()
    (d / "ca.pem").write_bytes(ca)
    pins = vol / "data.owner" / "pins.json"
    doc = json.loads(pins.read_text())
    doc[str(d.resolve())]["workload_ca_sha256"] = hashlib.sha256(
        x509.load_pem_x509_certificate(ca).public_bytes(Encoding.DER)).hexdigest()
    pins.write_text(json.dumps(doc))
    for p in (vol, vol / "data.owner", pins):
        os.chown(p, OPERATOR_UID, OPERATOR_UID)
    return link


def test_pins_in_an_owner_dir_another_user_owns_are_refused(symlinked: Path) -> None:
    od = symlinked.resolve().parent / "data.owner"
    with pytest.raises(ConfigError, match=rf"{od}.*owned by uid {OPERATOR_UID}"):
        load_connection(symlinked)
    for service in CLIENT_POLICIES:
        with pytest.raises(ConfigError, match="owned by uid"):
            pinned_policy(symlinked, service)
    with pytest.raises(ConfigError, match="owned by uid"):
        broker_target(None, None, str(symlinked))


def test_an_owner_dir_others_may_write_is_refused(symlinked: Path) -> None:
    od = symlinked.resolve().parent / "data.owner"
    for p in (od, od / "pins.json"):
        os.chown(p, 0, 0)
    od.chmod(0o777)
    with pytest.raises(ConfigError, match=rf"{od}.*writable by group or others"):
        pinned_policy(symlinked, "records")
    od.chmod(0o700)
    (od / "pins.json").chmod(0o666)
    with pytest.raises(ConfigError, match=r"pins\.json.*writable by group or others"):
        pinned_policy(symlinked, "records")
    (od / "pins.json").chmod(0o600)
    assert pinned_policy(symlinked, "records").policy.name == "op"  # the user's own dir: trusted


def test_up_refuses_to_put_the_owner_key_in_an_owner_dir_another_user_owns(symlinked: Path) -> None:
    with pytest.raises(ConfigError, match="owned by uid"):
        make_owner_dir(symlinked)


def test_import_with_an_explicit_policy_writes_no_checkpoint_into_someone_elses_owner_dir(
        symlinked: Path, tmp_path: Path) -> None:
    """With ``--url`` / ``--policy`` no pin is read, but the import checkpoint (record ids, how
    far each file got) would still go into the default owner directory: refused there too,
    before anything is sent."""
    from click.testing import CliRunner

    from safehold.cli.main import cli

    od = symlinked.resolve().parent / "data.owner"
    csv = tmp_path / "patients.csv"
    csv.write_text("Id,BIRTHDATE,FIRST,LAST,GENDER\np1,1970-01-01,Ann,Lee,F\n")
    r = CliRunner().invoke(cli, ["patients", "import", str(csv), "--data-dir", str(symlinked),
                                 "--url", "https://127.0.0.1:9", "--policy", str(tmp_path / "mine.toml"),
                                 "--token", "t"])
    assert r.exit_code != 0 and "owned by uid" in r.output, r.output
    assert not (od / "import-state.json").exists()
