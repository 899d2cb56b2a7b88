"""``safehold epa handshake|list|get``: patient records through the ePA 3 VAU (gemSpec_Krypt
chapter 7) that ``safehold up`` runs in front of the records service (docs/vau.md).

The VAU workload is appraised over RA-TLS first (its policy from ``up.json`` in ``--data-dir``, or
``--url`` + ``--policy``); its AUT-VAU certificate is fetched over that attested connection and
pinned (:class:`~safehold.client.vau.AttestedVauKeyTrust`); then the M1..M4 handshake (ECDH P-256
+ Kyber768 round 3, key confirmation both ways) and the records API request as ePA user data
(AES-256-GCM). The VAU forwards it to the records service over RA-TLS with the caller's bearer
token; the records service decides what the caller may read.

Bearer token: ``SAFEHOLD_TOKEN``, else the ``--role`` token (``admin`` by default) from the owner
directory's ``tokens.json`` (``--owner-dir`` / ``SAFEHOLD_OWNER_DIR``, default
``<data-dir>.owner``); never from argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import click

from safehold.cli.stackinfo import DATA_DIR_OPTION, stack_policy, stack_service, stack_token
from safehold.client.errors import EpaResponseError
from safehold.errors import ConfigError

if TYPE_CHECKING:
    from safehold.attestation.verifier import Verifier

__all__ = ["register"]


class _Ctx:
    """Connection settings shared by the subcommands."""

    def __init__(self, data_dir: str, url: str | None, policy: str | None, owner: str | None,
                 role: str) -> None:
        self.data_dir, self.url, self.owner, self.role = data_dir, url, owner, role
        self.policy: str | Verifier | None = policy  # a path given, or the owner-pinned policy
        if url is None:
            entry = stack_service(data_dir, "erezept")  # the VAU workload serves both channels
            if entry is None:
                raise ConfigError(f"no running `safehold up` in {data_dir} (no up.json): pass --data-dir, "
                                  "or --url and --policy")
            if not entry.get("epa"):
                raise ConfigError(f"the VAU of the stack in {data_dir} runs no ePA VAU (it needs the "
                                  "records service and records_policy in vau.toml)")
            self.url, self.policy = str(entry["url"]), policy or stack_policy(data_dir, "erezept", owner)
        if not self.policy:
            raise ConfigError("--policy is needed with --url: the VAU workload is attested before use")

    def token(self) -> list[tuple[str, str]]:
        tok = os.environ.get("SAFEHOLD_TOKEN") or stack_token(self.data_dir, self.role, self.owner)
        if not tok:
            raise ConfigError("no bearer token: set SAFEHOLD_TOKEN, or run against a `safehold up` "
                              "whose owner directory holds tokens.json")
        return [("Authorization", "Bearer " + tok)]

    @contextlib.contextmanager
    def channel(self) -> Iterator[Any]:
        """An :class:`EpaVauHttpClient` over an attested connection; closed after."""
        import httpx

        from safehold.client.records import attesting_transport
        from safehold.client.vau import AttestedVauKeyTrust, EpaVauHttpClient

        assert self.url is not None and self.policy is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the simulated-TEE notice; `safehold status` shows it
            http = httpx.Client(transport=attesting_transport(self.policy), timeout=30.0)
        try:
            yield EpaVauHttpClient(self.url, trust=AttestedVauKeyTrust(http, self.url), http=http)
        finally:
            http.close()

    def get(self, target: str) -> Any:
        """GET ``target`` of the records API through a fresh channel; the parsed JSON body.

        Raises:
            EpaResponseError: the records service answered other than 200.
        """
        with self.channel() as c:
            r = c.request("GET", target, headers=[("Accept", "application/json"), *self.token()])
        if r.status != 200:
            raise EpaResponseError(r.status, r.body.decode("utf-8", "replace"))
        return json.loads(r.body)


def register(group: click.Group) -> None:
    """Add ``safehold epa``."""

    @group.group("epa")
    @DATA_DIR_OPTION
    @click.option("--url", default=None, help="VAU URL (default: from up.json in --data-dir).")
    @click.option("--policy", default=None, type=click.Path(dir_okay=False),
                  help="Appraisal policy TOML of the VAU workload (default: from up.json).")
    @click.option("--owner-dir", default=None, envvar="SAFEHOLD_OWNER_DIR",
                  help="Owner directory of `safehold up` (its tokens.json gives the bearer token when "
                       "SAFEHOLD_TOKEN is not set). Default: <data-dir>.owner.")
    @click.option("--role", default="admin", show_default=True,
                  type=click.Choice(["admin", "writer", "reader"]),
                  help="Which development token of tokens.json to use.")
    @click.pass_context
    def epa(ctx: click.Context, data_dir: str, url: str | None, policy: str | None, owner_dir: str | None,
            role: str) -> None:
        """Patient records through the ePA 3 VAU (hybrid post-quantum handshake, then AES-256-GCM)."""
        ctx.obj = (data_dir, url, policy, owner_dir, role)

    def conn(ctx: click.Context) -> _Ctx:
        return _Ctx(*ctx.obj)

    @epa.command("handshake")
    @click.pass_context
    def handshake_cmd(ctx: click.Context) -> None:
        """Attest the VAU, run M1..M4 and print the channel (JSON): its VAU-CID, KeyID, the
        pinned AUT-VAU certificate and the validity of the VAU's signed KEM keys."""
        c = conn(ctx)
        with c.channel() as ch:
            t0 = time.perf_counter()
            ch.handshake()
            ms = (time.perf_counter() - t0) * 1e3
            assert ch.channel is not None
            keys = ch.channel.vau_keys
            out = {"url": c.url, "cid": ch.cid, "key_id": ch.channel.key_id.hex(),
                   "aut_vau_certificate_sha256": ch.trust.certificate_hashes(),
                   "vau_keys": {"iat": keys.iat, "exp": keys.exp, "comment": keys.comment},
                   "kem": "ECDH P-256 + Kyber768 (round 3)", "handshake_ms": round(ms, 1)}
        click.echo(json.dumps(out, indent=2))

    @epa.command("list")
    @click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000),
                  help="At most this many ids (one page of the records API).")
    @click.pass_context
    def list_cmd(ctx: click.Context, limit: int) -> None:
        """Print record ids, one per line, read through the ePA VAU."""
        for rid in conn(ctx).get(f"/v1/patients?limit={limit}")["ids"]:
            click.echo(rid)

    @epa.command("get")
    @click.argument("record_id")
    @click.pass_context
    def get_cmd(ctx: click.Context, record_id: str) -> None:
        """Print one record as JSON, read through the ePA VAU."""
        rec = conn(ctx).get("/v1/patients/" + quote(record_id, safe=""))
        click.echo(json.dumps(rec, indent=2, ensure_ascii=False))
