"""The records service's configuration (:class:`safehold.records.config.ServiceConfig`): which
settings only the measured file may set, which the run-time environment may, and the checks."""

from __future__ import annotations

import pytest


def test_config_load_rules(tmp_path):
    """ServiceConfig.load in-process: which names the environment may set, and the checks."""
    from dataclasses import fields

    from safehold.errors import ConfigError
    from safehold.records.config import MEASURED_SETTINGS, RUNTIME_SETTINGS, ServiceConfig

    assert {f.name for f in fields(ServiceConfig)} == MEASURED_SETTINGS | RUNTIME_SETTINGS
    assert not MEASURED_SETTINGS & RUNTIME_SETTINGS
    pin = "ab" * 32
    f = tmp_path / "c.toml"
    f.write_text(f'broker_ca_sha256 = "{pin}"\n')
    cfg = ServiceConfig.load(f, env={"SAFEHOLD_RECORDS_PORT": "9001", "SAFEHOLD_RECORDS_SCONE_PORT": "none",
                                     "SAFEHOLD_RECORDS_STORE_URL": "sqlite:///x.db", "OTHER": "1"})
    assert (cfg.port, cfg.scone_port, cfg.store_url, cfg.host) == (9001, None, "sqlite:///x.db", "127.0.0.1")
    assert cfg.encryption and cfg.audit
    for env, msg in [({"SAFEHOLD_RECORDS_ACCESS_RESOURCE": "x"}, "'access_resource' is a measured setting"),
                     ({"SAFEHOLD_RECORDS_WORKLOAD": "x"}, "'workload' is a measured setting"),
                     ({"SAFEHOLD_RECORDS_ENCRYPTON": "0"}, "unknown setting"),
                     ({"SAFEHOLD_RECORDS_PORT": "eighty"}, "port must be a port number")]:
        with pytest.raises(ConfigError, match=msg):
            ServiceConfig.load(f, env=env)
    for text, msg in [("", "broker_ca_sha256 must pin"),
                      (f'broker_ca_sha256 = "{pin[:-2]}"', "broker_ca_sha256 must pin"),
                      (f'broker_ca_sha256 = "{pin}"\nencryption = "false"', "TOML boolean"),
                      (f'broker_ca_sha256 = "{pin}"\nhost = "10.0.0.5"\nscone_auth = "none"',
                       "only on a loopback host")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            ServiceConfig.load(f, env={})
    # the SCONE port authenticates by default (issue 11, finding 5): a public host needs nothing more
    f.write_text(f'broker_ca_sha256 = "{pin}"\nhost = "10.0.0.5"')
    assert ServiceConfig.load(f, env={}).scone_auth == "token"
    # a public host is fine with token auth on the SCONE port, or with the SCONE port off
    f.write_text(f'broker_ca_sha256 = "{pin}"\nhost = "0.0.0.0"\nscone_auth = "token"')
    assert ServiceConfig.load(f, env={}).host == "0.0.0.0"
    f.write_text(f'broker_ca_sha256 = "{pin}"\nhost = "0.0.0.0"')
    assert ServiceConfig.load(f, env={"SAFEHOLD_RECORDS_SCONE_PORT": "none"}).scone_port is None
    f.write_text(f'broker_ca_sha256 = "{pin}"\nhost = "::1"')
    assert ServiceConfig.load(f, env={}).host == "::1"
