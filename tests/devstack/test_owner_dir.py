"""The data owner's directory apart from the server's data (issue 11, finding 5): where it is,
what is refused, and that nothing of it reaches a server process."""

from __future__ import annotations

import json
import os

import pytest

from safehold.client.connection import load_connection, owner_dir
from safehold.devstack.datadir import check_old_layout, make_owner_dir, owner_key, tokens
from safehold.devstack.stack import Stack, base_env
from safehold.errors import ConfigError


def test_owner_dir_defaults_beside_the_data_dir_and_options_win(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    assert owner_dir(tmp_path / "data") == tmp_path / "data.owner"
    monkeypatch.setenv("SAFEHOLD_OWNER_DIR", str(tmp_path / "env-owner"))
    assert owner_dir(tmp_path / "data") == tmp_path / "env-owner"
    assert owner_dir(tmp_path / "data", tmp_path / "opt") == tmp_path / "opt"


def test_tokens_and_owner_key_are_written_to_the_owner_dir_only(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    tok = tokens(data)
    owner_key(data)
    od = tmp_path / "data.owner"
    assert json.loads((od / "tokens.json").read_text()) == tok
    assert {p.name for p in od.iterdir()} == {"tokens.json", "owner.key", "owner.pub"}
    assert os.stat(od).st_mode & 0o777 == 0o700 and os.stat(od / "owner.key").st_mode & 0o777 == 0o600
    assert list(data.iterdir()) == []
    # the client reads the admin token from there; up.json holds none (an explicit policy: the
    # data directory's would need the owner's pin, tests/cli/test_policy_pin.py)
    (data / "up.json").write_text(json.dumps({"records_url": "https://127.0.0.1:1", "policy": "p.toml"}))
    assert load_connection(data, policy="p.toml").token == tok["admin"]


def test_an_owner_dir_inside_the_data_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="inside the data directory"):
        make_owner_dir(tmp_path, tmp_path / "owner")
    with pytest.raises(ConfigError, match="inside the data directory"):
        make_owner_dir(tmp_path, tmp_path)


def test_a_data_dir_of_the_old_layout_is_refused_naming_the_move(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "owner.key").write_text("SECRET-KEY-BYTES")
    (data / "tokens.json").write_text("{}")
    with pytest.raises(ConfigError) as e:
        check_old_layout(data)
    msg = str(e.value)
    assert f"mv {data / 'owner.key'} {data / 'tokens.json'} {tmp_path / 'data.owner'}/" in msg
    assert "SECRET-KEY-BYTES" not in msg  # names the files, never their content


def test_prepare_refuses_the_old_layout_before_writing_anything(tmp_path, monkeypatch):
    from safehold.devstack.datadir import prepare

    monkeypatch.delenv("SAFEHOLD_OWNER_DIR", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text('{"admin": "a", "writer": "w", "reader": "r"}')
    with pytest.raises(ConfigError, match="tokens.json"):
        prepare(data, broker_port=1, records_port=2, scone_port=None)
    assert sorted(p.name for p in data.iterdir()) == ["tokens.json", "up.lock"]
    assert not (tmp_path / "data.owner").exists()


def test_a_client_token_in_the_users_environment_never_reaches_a_server(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEHOLD_TOKEN", "client-secret")
    monkeypatch.setenv("SAFEHOLD_OWNER_DIR", str(tmp_path / "o"))
    env = base_env(Stack(tmp_path, 1, 2, None))
    assert "SAFEHOLD_TOKEN" not in env and "SAFEHOLD_OWNER_DIR" not in env
    assert "client-secret" not in "".join(env.values())
