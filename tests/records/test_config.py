"""The records service's configuration (:class:`safehold.records.config.ServiceConfig`): which
settings only the measured file may set, which the run-time environment may, and the checks."""

from __future__ import annotations

import pytest


def test_freshness_config_rules(tmp_path):
    """freshness is on by default and needs the anchor members and their policy in the measured
    file; the environment cannot set or unset any of it; the policy is checked at load."""
    from safehold.errors import ConfigError
    from safehold.records.config import ServiceConfig

    pin = "ab" * 32
    f = tmp_path / "c.toml"
    good = (f'broker_ca_sha256 = "{pin}"\nanchor_members = ["https://127.0.0.1:7001"]\n'
            '[anchor_policy]\nallow_simulated = true\nsimulated_root = "/x/root.pem"\n'
            '[anchor_policy.reference_values]\nmeasurements = ["' + "cd" * 48 + '"]\n')
    f.write_text(good)
    cfg = ServiceConfig.load(f, env={})
    assert cfg.freshness and cfg.anchor_members == ["https://127.0.0.1:7001"]
    assert cfg.anchor_appraisal().name == "anchor"
    b = f'broker_ca_sha256 = "{pin}"\n'
    for text, msg in [(b, "needs anchor_members"),
                      (b + 'anchor_members = ["http://127.0.0.1:1"]', "needs anchor_members"),
                      (b + 'anchor_members = ["https://127.0.0.1:1"]', "needs anchor_policy"),
                      (b + 'freshness = "no"', "TOML boolean"),
                      (good.replace("[anchor_policy]", "freshness_wait = 0\n[anchor_policy]"), "positive"),
                      (good.replace("allow_simulated", "allow_simulation"), "anchor_policy")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            ServiceConfig.load(f, env={})
    f.write_text(good)
    for var in ("SAFEHOLD_RECORDS_FRESHNESS", "SAFEHOLD_RECORDS_ANCHOR_MEMBERS",
                "SAFEHOLD_RECORDS_ANCHOR_POLICY"):
        with pytest.raises(ConfigError, match="measured setting"):
            ServiceConfig.load(f, env={var: "false"})


OFF = "freshness = false\n"


def test_config_load_rules(tmp_path):
    """ServiceConfig.load in-process: which names the environment may set, and the checks."""
    from dataclasses import fields

    from safehold.errors import ConfigError
    from safehold.records.config import MEASURED_SETTINGS, RUNTIME_SETTINGS, ServiceConfig

    assert {f.name for f in fields(ServiceConfig)} == MEASURED_SETTINGS | RUNTIME_SETTINGS
    assert not MEASURED_SETTINGS & RUNTIME_SETTINGS
    pin = "ab" * 32
    f = tmp_path / "c.toml"
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\n')
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
                      (OFF + f'broker_ca_sha256 = "{pin}"\nencryption = "false"', "TOML boolean"),
                      (OFF + f'broker_ca_sha256 = "{pin}"\nhost = "10.0.0.5"\nscone_auth = "none"',
                       "only on a loopback host")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            ServiceConfig.load(f, env={})
    # the SCONE port authenticates by default (issue 11, finding 5): a public host needs nothing more
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\nhost = "10.0.0.5"')
    assert ServiceConfig.load(f, env={}).scone_auth == "token"
    # a public host is fine with token auth on the SCONE port, or with the SCONE port off
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\nhost = "0.0.0.0"\nscone_auth = "token"')
    assert ServiceConfig.load(f, env={}).host == "0.0.0.0"
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\nhost = "0.0.0.0"')
    assert ServiceConfig.load(f, env={"SAFEHOLD_RECORDS_SCONE_PORT": "none"}).scone_port is None
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\nhost = "::1"')
    assert ServiceConfig.load(f, env={}).host == "::1"


def test_workers_setting(tmp_path):
    """``workers`` (records worker processes) is measured, 1 by default, an integer 1..64."""
    from safehold.errors import ConfigError
    from safehold.records.config import MAX_WORKERS, ServiceConfig

    pin = "ab" * 32
    f = tmp_path / "c.toml"
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\n')
    assert ServiceConfig.load(f, env={}).workers == 1
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\nworkers = 4\n')
    assert ServiceConfig.load(f, env={}).workers == 4
    with pytest.raises(ConfigError, match="'workers' is a measured setting"):
        ServiceConfig.load(f, env={"SAFEHOLD_RECORDS_WORKERS": "8"})
    for bad in ("0", "true", '"2"', str(MAX_WORKERS + 1), "1.5"):
        f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\nworkers = {bad}\n')
        with pytest.raises(ConfigError, match="workers must be an integer from 1 to 64"):
            ServiceConfig.load(f, env={})


def test_compress_setting(tmp_path):
    """``compress`` (compress-then-encrypt record frames) is measured, on by default, a TOML
    boolean; the environment cannot turn it off."""
    from safehold.errors import ConfigError
    from safehold.records.config import MEASURED_SETTINGS, ServiceConfig

    assert "compress" in MEASURED_SETTINGS
    pin = "ab" * 32
    f = tmp_path / "c.toml"
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\n')
    assert ServiceConfig.load(f, env={}).compress is True
    f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\ncompress = false\n')
    assert ServiceConfig.load(f, env={}).compress is False
    for var, val in (("SAFEHOLD_RECORDS_COMPRESS", "false"), ("SAFEHOLD_RECORDS_COMPRESS", "true")):
        with pytest.raises(ConfigError, match="'compress' is a measured setting"):
            ServiceConfig.load(f, env={var: val})
    for bad in ('"false"', "0", '"off"'):
        f.write_text(OFF + f'broker_ca_sha256 = "{pin}"\ncompress = {bad}\n')
        with pytest.raises(ConfigError, match="compress must be a TOML boolean"):
            ServiceConfig.load(f, env={})
