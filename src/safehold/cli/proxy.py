"""``safehold tokenize`` / ``detokenize`` / ``proxy`` / ``proxy-keyset``: the encryption proxy CLI.

Keys: a keyset file written by ``safehold proxy-keyset new`` (a Keyset wrapped under a 32-byte
KEK, :meth:`Keyset.wrap`), with the KEK as 64 hex characters in ``SAFEHOLD_PROXY_KEK``. In a
deployment the keyset comes from the key broker after attestation; the file form is for the
batch tools and development.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable
from pathlib import Path

import click

from safehold.crypto.keyset import Keyset
from safehold.errors import ConfigError
from safehold.fsutil import write_atomic

KEK_ENV = "SAFEHOLD_PROXY_KEK"


def _kek() -> bytes:
    raw = os.environ.get(KEK_ENV, "")
    try:
        kek = bytes.fromhex(raw)
    except (ValueError, binascii.Error):
        kek = b""
    if len(kek) != 32:
        raise ConfigError(f"{KEK_ENV} must hold the 32-byte key-encryption key as 64 hex characters")
    return kek


def load_keyset(path: Path) -> Keyset:
    """Unwrap the keyset file at ``path`` with the KEK from ``SAFEHOLD_PROXY_KEK``."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read keyset file {path}: {e.strerror}") from None
    return Keyset.unwrap(blob, _kek())


def _protector(schema: Path, keyset: Path):
    from safehold.proxy.core import Protector
    from safehold.proxy.schema import Schema

    return Protector(Schema.load(schema), load_keyset(keyset))


_schema_opt = click.option("--schema", "schema", type=click.Path(path_type=Path, dir_okay=False),
                           required=True, help="TOML schema: field -> transform (docs/proxy.md).")
_keyset_opt = click.option("--keyset", "keyset", type=click.Path(path_type=Path, dir_okay=False),
                           envvar="SAFEHOLD_PROXY_KEYSET", required=True,
                           help=f"Wrapped keyset file; KEK in ${KEK_ENV} (hex).")



def _batch_opts(f: Callable[..., None]) -> Callable[..., None]:
    """The options and arguments that tokenize and detokenize share, in this order in --help."""
    for deco in reversed((
        _schema_opt,
        _keyset_opt,
        click.option("--format", "fmt", type=click.Choice(["csv", "ndjson"]), default=None,
                     help="Input/output format (default: from the file suffix)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
        click.argument("src", type=click.Path(path_type=Path, dir_okay=False)),
        click.argument("dst", type=click.Path(path_type=Path, dir_okay=False)),
    )):
        f = deco(f)
    return f


def _batch(
    schema: Path, keyset: Path, src: Path, dst: Path, fmt: str | None, reveal: bool, quiet: bool
) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from safehold.proxy.batch import detect_format, run_batch

    p = _protector(schema, keyset)
    kind = detect_format(src, fmt)
    verb = "detokenize" if reveal else "tokenize"
    if not src.is_file():
        raise ConfigError(f"input file not found: {src}")
    with Progress(TextColumn(f"{verb} {src.name}"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                  disable=quiet, transient=False) as bar:
        task = bar.add_task(verb, total=src.stat().st_size or 1)
        n = run_batch(p, src, dst, reveal=reveal, fmt=kind,
                      progress=lambda done, total: bar.update(task, completed=done, total=total or 1))
    click.echo(f"{verb}d {n} records -> {dst}", err=True)


def register(group: click.Group) -> None:
    """Add the proxy commands to the ``safehold`` group."""

    @group.command("tokenize")
    @_batch_opts
    def tokenize(schema: Path, keyset: Path, fmt: str | None, quiet: bool, src: Path, dst: Path) -> None:
        """Protect every record of SRC (CSV or NDJSON) into DST as the schema says."""
        _batch(schema, keyset, src, dst, fmt, reveal=False, quiet=quiet)

    @group.command("detokenize")
    @_batch_opts
    def detokenize(schema: Path, keyset: Path, fmt: str | None, quiet: bool, src: Path, dst: Path) -> None:
        """Reveal every record of SRC (written by tokenize) into DST."""
        _batch(schema, keyset, src, dst, fmt, reveal=True, quiet=quiet)

    @group.command("proxy")
    @_schema_opt
    @_keyset_opt
    @click.option("--upstream", required=True, help="Base URL of the untrusted service.")
    @click.option("--listen", default="127.0.0.1:8443", show_default=True, help="HOST:PORT to listen on.")
    def proxy(schema: Path, keyset: Path, upstream: str, listen: str) -> None:
        """Run the HTTP encryption proxy in front of UPSTREAM."""
        from safehold.proxy.server import serve

        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--listen must be HOST:PORT, got {listen!r}")
        if not upstream.startswith(("http://", "https://")):
            raise ConfigError(f"--upstream must be an http(s) URL, got {upstream!r}")
        p = _protector(schema, keyset)
        click.echo(f"safehold proxy listening on {host}:{port} -> {upstream}", err=True)
        serve(p, upstream, host.strip("[]"), int(port))

    @group.group("proxy-keyset")
    def proxy_keyset() -> None:
        """Create or rotate the proxy's wrapped keyset file (KEK in $SAFEHOLD_PROXY_KEK)."""

    @proxy_keyset.command("new")
    @click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
    def keyset_new(path: Path) -> None:
        """Write a fresh keyset to PATH (refuses to overwrite)."""
        if path.exists():
            raise ConfigError(f"{path} exists; refusing to overwrite a keyset")
        ks = Keyset.generate()
        write_atomic(path, ks.wrap(_kek()))
        click.echo(f"new keyset, primary key id {ks.primary_id} -> {path}", err=True)

    @proxy_keyset.command("rotate")
    @click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
    def keyset_rotate(path: Path) -> None:
        """Add a new primary key to the keyset at PATH; old keys stay for reveal."""
        ks = load_keyset(path)
        kid = ks.add(primary=True)
        write_atomic(path, ks.wrap(_kek()))
        click.echo(f"rotated: new primary key id {kid}", err=True)
