"""``safehold broker …`` client commands find a running ``safehold up``'s broker: the URL from
``up.json`` (TLS against the CA the owner pinned) unless ``--url`` / ``$SAFEHOLD_BROKER_URL`` /
``--cacert`` say otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safehold.cli.broker import DEFAULT_URL, broker_target
from safehold.errors import ConfigError


@pytest.fixture
def stack_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "up.json").write_text(json.dumps({"broker_url": "https://127.0.0.1:4711", "ca": str(d / "ca.pem")}))
    monkeypatch.setenv("SAFEHOLD_DATA_DIR", str(d))
    return d


def test_up_json_gives_url_and_ca(stack_dir: Path) -> None:
    # with no --cacert, the owner's pinned CA (tests/cli/test_broker_target_pin.py); here none is pinned
    with pytest.raises(ConfigError, match="pins no workload CA"):
        broker_target(None, None)
    assert broker_target(None, "/my/ca.pem") == ("https://127.0.0.1:4711", "/my/ca.pem")  # explicit wins


def test_an_explicit_url_never_takes_up_json_ca(stack_dir: Path) -> None:
    assert broker_target("https://broker.example", None) == ("https://broker.example", None)


def test_no_stack_is_the_default_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEHOLD_DATA_DIR", str(tmp_path / "none"))
    assert broker_target(None, None) == (DEFAULT_URL, None)


def test_an_unreadable_up_json_is_a_config_error_naming_it(stack_dir: Path) -> None:
    (stack_dir / "up.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"up\.json: unreadable.*--url"):
        broker_target(None, None)


def test_an_unreachable_broker_is_one_line_naming_its_url(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """It was ``broker unreachable: ConnectError: [Errno 111] Connection refused``: no URL, while
    the records CLI says ``cannot reach the records service at URL: connection refused``."""
    import socket

    from safehold.cli.broker import _call, _http
    from safehold.errors import BrokerError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SAFEHOLD_DATA_DIR", str(tmp_path / "none"))
    with _http(f"https://127.0.0.1:{port}", None) as c, pytest.raises(BrokerError) as ei:
        _call(c, "GET", "/kbs/v0/status")
    want = f"cannot reach the broker at https://127.0.0.1:{port}: connection refused"
    assert str(ei.value).startswith(want)


def test_a_broker_whose_ca_is_unknown_here_points_at_the_data_dir(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`safehold broker status` run outside the directory holding safehold-data falls back to
    the default URL and the system CAs: the running broker's certificate fails to verify, and
    the hint said only "is `safehold up` running? else give --url" (it was running). The hint
    is the same for every transport error, so a refused port shows it here."""
    import socket

    from safehold.cli.broker import _call, _http
    from safehold.errors import BrokerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SAFEHOLD_DATA_DIR", str(tmp_path / "none"))
    with _http(f"https://127.0.0.1:{port}", None) as c, pytest.raises(BrokerError) as ei:
        _call(c, "GET", "/kbs/v0/status")
    assert "give `safehold broker --data-dir DIR …`" in str(ei.value)
    assert "--url and --cacert" in str(ei.value)
