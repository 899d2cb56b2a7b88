"""safehold.fsutil.write_atomic: whole-file replacement, permissions, nothing left on failure."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from safehold.errors import ConfigError
from safehold.fsutil import read_toml, write_atomic


def test_replaces_whole_file_with_mode(tmp_path):
    p = tmp_path / "ca.pem"
    p.write_text("old")
    write_atomic(p, "new contents")
    assert p.read_text() == "new contents"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    write_atomic(p, b"\x00bytes", mode=0o644)
    assert p.read_bytes() == b"\x00bytes" and stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ca.pem"]


def test_missing_directory_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        write_atomic(tmp_path / "nope" / "f", "x")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_never_expose_a_partial_file(tmp_path):
    p = tmp_path / "state.json"
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    write_atomic(p, blobs[0])
    torn: list[int] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = p.read_bytes()
            if len(data) != 200_000 or data != data[:1] * 200_000:
                torn.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    writers = [threading.Thread(target=write_atomic, args=(p, b)) for b in blobs]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    t.join()
    assert torn == []
    assert p.read_bytes() in blobs
    assert sorted(x.name for x in tmp_path.iterdir()) == ["state.json"]


def test_read_toml_refuses_unknown_keys_and_bad_files(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('a = 1\n[b]\nx = "y"\n')
    assert read_toml(f, known={"a", "b", "c"}, error=ConfigError, what="x config") == {
        "a": 1,
        "b": {"x": "y"},
    }
    with pytest.raises(ConfigError, match=r"^x config: unknown keys \['a', 'b'\]$"):
        read_toml(f, known=(), error=ConfigError, what="x config")
    f.write_text("a = \n")
    with pytest.raises(ConfigError, match="^x config .*c.toml: "):
        read_toml(f, known={"a"}, error=ConfigError, what="x config")
    f.write_bytes(b"a = '\xff'\n")
    with pytest.raises(ConfigError):
        read_toml(f, known={"a"}, error=ConfigError, what="x config")
    with pytest.raises(ConfigError, match="missing.toml"):
        read_toml(tmp_path / "missing.toml", known={"a"}, error=ConfigError, what="x config")
