"""``closure.derive``: another launch / other config files over the same code files gives
exactly what a fresh :func:`closure` gives (the simulated TEE measures code once per process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safehold.attestation.closure import closure, derive
from safehold.errors import ConfigError


def test_derive_equals_a_fresh_closure(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pkg" / "__init__.py").write_text("x = 1\n")
    a, b = tmp_path / "a.toml", tmp_path / "sub" / "b.toml"
    b.parent.mkdir()
    a.write_text("k = 1\n")
    b.write_text("k = 2\n")
    base = closure([str(app)], launch="L1")
    for launch, cfgs in (("L2", [a]), ("L1", [a, b]), (None, []), ("L1", [])):
        fresh = closure([str(app)], launch=launch, config_files=cfgs)
        d = derive(base, launch=launch, config_files=cfgs)
        assert d.digest == fresh.digest and d.entries == fresh.entries
    with_cfg = closure([str(app)], launch="L1", config_files=[a])
    # the config of a derived base is replaced, not kept
    assert derive(with_cfg, launch="L1", config_files=[b]).digest == closure(
        [str(app)], launch="L1", config_files=[b]).digest
    a.write_text("k = 3\n")  # a changed config changes the value
    assert derive(base, launch="L1", config_files=[a]).digest != with_cfg.digest
    with pytest.raises(ConfigError, match="not found"):
        derive(base, launch="L1", config_files=[tmp_path / "missing.toml"])
