"""``safehold erezept create|sample-bundle|activate|accept|close|abort|list``: the E-Rezept flow
by hand, through the E-Rezept VAU of ``safehold up`` (docs/erezept.md, docs/vau.md).

Every request is encrypted to the VAU key (gemSpec_Krypt A_20161-01) inside an RA-TLS connection
to the attested VAU workload: the VAU certificate is fetched over that attested connection and
pinned for the session. URL and policy come from ``up.json`` in ``--data-dir`` (or ``--url`` +
``--policy``).

Access tokens: minted per command by the stack's **development identity provider**
(``erezept-idp.key`` in the owner directory — never a key path ``up.json`` names — standing in
for the gematik IdP) for the role the command
needs — prescriber (``--prescriber`` Telematik-ID), pharmacy (``--pharmacy``), insured
(``--kvnr``) — or taken from ``SAFEHOLD_EREZEPT_TOKEN`` (a real IdP's token). The AccessCode and
the pharmacy's Secret are capabilities: they are read from ``SAFEHOLD_EREZEPT_ACCESS_CODE`` /
``SAFEHOLD_EREZEPT_SECRET`` or from the terminal (not echoed), never from argv; ``create`` and
``accept`` print them once, as JSON on standard output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from safehold.cli.stackinfo import DATA_DIR_OPTION, stack_policy, stack_service
from safehold.errors import ConfigError

if TYPE_CHECKING:
    from safehold.attestation.verifier import Verifier

#: gemSpec_OID professionOIDs of the three roles.
ROLE_OIDS = {"prescriber": "1.2.276.0.76.4.30", "pharmacy": "1.2.276.0.76.4.54",
             "insured": "1.2.276.0.76.4.49"}
DEFAULT_PRESCRIBER = "1-838382202"
DEFAULT_PHARMACY = "3-SMC-B-Testkarte-883110000116873"


def mint_token(key_path: Path, issuer: str, role: str, id_number: str, lifetime: int = 300) -> str:
    """An ES256 access token of the development IdP (claims as gemSpec_IDP_Dienst:
    ``professionOID``, ``idNummer``; ``exp`` after ``lifetime`` seconds).

    Raises:
        ConfigError: the key file is missing or not an EC key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from joserfc import jwt
    from joserfc.jwk import ECKey

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"development IdP key {key_path}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"development IdP key {key_path} is not an EC key")
    t = int(time.time())
    claims = {"iss": issuer, "sub": f"dev-{role}-{id_number}", "iat": t, "nbf": t, "exp": t + lifetime,
              "professionOID": ROLE_OIDS[role], "idNummer": id_number, "acr": "gematik-ehealth-loa-high",
              "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "ES256", "typ": "at+JWT"}, claims, ECKey.import_key(key), algorithms=["ES256"])


class _Ctx:
    """Connection settings shared by the subcommands."""

    def __init__(self, data_dir: str, url: str | None, policy: str | None) -> None:
        self.data_dir, self.url = data_dir, url
        self.policy: str | Verifier | None = policy  # a path given, or the owner-pinned policy
        self.entry: dict[str, Any] | None = None
        if url is None:
            self.entry = stack_service(data_dir, "erezept")
            if self.entry is None:
                raise ConfigError(f"no running `safehold up` in {data_dir} (no up.json): pass --data-dir, "
                                  "or --url and --policy")
            self.url, self.policy = str(self.entry["url"]), policy or stack_policy(data_dir, "erezept")
        if not self.policy:
            raise ConfigError("--policy is needed with --url: the VAU workload is attested before use")

    def token(self, role: str, id_number: str) -> str:
        tok = os.environ.get("SAFEHOLD_EREZEPT_TOKEN")
        if tok:
            return tok
        if self.entry is None:
            raise ConfigError("no access token: set SAFEHOLD_EREZEPT_TOKEN (or use the stack's dev IdP "
                              "through --data-dir)")
        # the dev IdP's key and issuer as `up` made them: never a path the operator's up.json names
        from safehold.client.connection import owner_dir
        from safehold.devstack.services import IDP_ISSUER

        return mint_token(owner_dir(self.data_dir) / "erezept-idp.key", IDP_ISSUER, role, id_number)

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """An ``ErezeptClient`` over the attested VAU; its HTTP connection is closed after."""
        cl = self._client()
        try:
            yield cl
        finally:
            cl.vau.close()  # ErezeptClient.close is the $close operation, not a disconnect

    def _client(self) -> Any:
        import httpx

        from safehold.client.records import attesting_transport
        from safehold.client.vau import ErezeptClient, ErpVauClient

        assert self.url is not None and self.policy is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            http = httpx.Client(transport=attesting_transport(self.policy), timeout=30.0)
        # the certificate comes from the attested workload over RA-TLS: pin exactly that one
        r = http.get(self.url.rstrip("/") + "/VAUCertificate")
        if r.status_code != 200:
            raise ConfigError(f"the VAU at {self.url} served no certificate (HTTP {r.status_code})")
        pin = hashlib.sha256(r.content).hexdigest()
        return ErezeptClient(ErpVauClient(self.url, pinned_certificates=[pin], http=http))


def _capability(env: str, prompt: str) -> str:
    v = os.environ.get(env)
    if v:
        return v
    return str(click.prompt(prompt, hide_input=True))


def _out(obj: Any) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, indent=2))


def _ident(task: dict[str, Any], system_suffix: str) -> str:
    for i in task.get("identifier", []):
        if str(i.get("system", "")).endswith(system_suffix):
            return str(i.get("value", ""))
    return ""


def register(group: click.Group) -> None:
    """Add ``safehold erezept``."""

    @group.group("erezept")
    @DATA_DIR_OPTION
    @click.option("--url", default=None, help="E-Rezept VAU URL (default: from up.json in --data-dir).")
    @click.option("--policy", default=None, type=click.Path(dir_okay=False),
                  help="Appraisal policy TOML of the VAU workload (default: from up.json).")
    @click.pass_context
    def erezept(ctx: click.Context, data_dir: str, url: str | None, policy: str | None) -> None:
        """E-Rezept prescriptions through the VAU: create, activate, accept, close (dispense)."""
        ctx.obj = (data_dir, url, policy)

    def conn(ctx: click.Context) -> _Ctx:
        return _Ctx(*ctx.obj)

    @erezept.command("create")
    @click.option("--prescriber", default=DEFAULT_PRESCRIBER, show_default=True, help="Telematik-ID.")
    @click.option("--flow-type", default="160", show_default=True,
                  type=click.Choice(["160", "169", "200", "209"]))
    @click.pass_context
    def create_cmd(ctx: click.Context, prescriber: str, flow_type: str) -> None:
        """Create a draft Task; prints its id and AccessCode (JSON)."""
        c = conn(ctx)
        with c.client() as cl:
            t = cl.create(c.token("prescriber", prescriber), flow_type)
        _out({"id": t["id"], "status": t.get("status"), "access_code": _ident(t, "AccessCode")})

    @erezept.command("sample-bundle")
    @click.argument("task_id")
    @click.option("--kvnr", required=True, help="The insured person's KVNR (10 characters).")
    @click.option("--family", required=True, help="Family name (UTF-8, e.g. 'von Bülow').")
    @click.option("--given", required=True, help="Given name(s), space-separated.")
    @click.option("--birth-date", required=True, help="FHIR date: YYYY, YYYY-MM or YYYY-MM-DD.")
    @click.option("--drug", default="Ibuprofen AL 600 mg Filmtabletten", show_default=True)
    @click.option("--pzn", default="04020784", show_default=True)
    def sample_cmd(task_id: str, kvnr: str, family: str, given: str, birth_date: str, drug: str,
                   pzn: str) -> None:
        """Print a KBV_PR_ERP_Bundle (FHIR JSON) for TASK_ID, to edit and activate."""
        from safehold.erezept.sample import Drug, Person, build_bundle

        b = build_bundle(task_id, Person(given.split(), family, birth_date, kvnr), Drug(drug, pzn),
                         authored_on=dt.date.today().isoformat())
        _out(b)

    @erezept.command("activate")
    @click.argument("task_id")
    @click.option("--bundle", "bundle_file", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="CMS-signed bundle (DER, .p7s), or FHIR JSON with --dev-sign.")
    @click.option("--dev-sign", is_flag=True,
                  help="Sign a JSON bundle with a throw-away TEST-ONLY certificate (format only, no QES).")
    @click.option("--prescriber", default=DEFAULT_PRESCRIBER, show_default=True, help="Telematik-ID.")
    @click.pass_context
    def activate_cmd(ctx: click.Context, task_id: str, bundle_file: str, dev_sign: bool,
                     prescriber: str) -> None:
        """Activate TASK_ID with the signed prescription (AccessCode from SAFEHOLD_EREZEPT_ACCESS_CODE
        or the terminal)."""
        data = Path(bundle_file).read_bytes()
        if dev_sign:
            from safehold.erezept.sample import dev_sign as sign

            click.secho("WARNING: signing with a TEST-ONLY self-issued certificate: not a qualified "
                        "signature (the VAU checks the CMS format only; docs/erezept.md)",
                        fg="yellow", err=True)
            data = sign(data)
        ac = _capability("SAFEHOLD_EREZEPT_ACCESS_CODE", "AccessCode")
        c = conn(ctx)
        with c.client() as cl:
            t = cl.activate(c.token("prescriber", prescriber), task_id, ac, data)
        _out({"id": t["id"], "status": t.get("status")})

    @erezept.command("accept")
    @click.argument("task_id")
    @click.option("--pharmacy", default=DEFAULT_PHARMACY, show_default=True, help="Telematik-ID.")
    @click.pass_context
    def accept_cmd(ctx: click.Context, task_id: str, pharmacy: str) -> None:
        """Accept TASK_ID as a pharmacy (AccessCode from SAFEHOLD_EREZEPT_ACCESS_CODE or the
        terminal); prints the Secret and the insured person's KVNR (JSON)."""
        ac = _capability("SAFEHOLD_EREZEPT_ACCESS_CODE", "AccessCode")
        c = conn(ctx)
        with c.client() as cl:
            b = cl.accept(c.token("pharmacy", pharmacy), task_id, ac)
        task = b["entry"][0]["resource"]
        kvnr = (task.get("for") or {}).get("identifier", {}).get("value", "")
        _out({"id": task["id"], "status": task.get("status"), "secret": _ident(task, "Secret"), "kvnr": kvnr})

    @erezept.command("close")
    @click.argument("task_id")
    @click.option("--kvnr", required=True, help="The insured person's KVNR (from accept).")
    @click.option("--pharmacy", default=DEFAULT_PHARMACY, show_default=True, help="Telematik-ID.")
    @click.pass_context
    def close_cmd(ctx: click.Context, task_id: str, kvnr: str, pharmacy: str) -> None:
        """Dispense TASK_ID (Secret from SAFEHOLD_EREZEPT_SECRET or the terminal); prints the receipt."""
        from safehold.erezept.sample import dispense

        secret = _capability("SAFEHOLD_EREZEPT_SECRET", "Secret")
        c = conn(ctx)
        with c.client() as cl:
            r = cl.close(c.token("pharmacy", pharmacy), task_id, secret,
                         dispense(task_id, kvnr, pharmacy, dt.date.today().isoformat()))
        comp = r["entry"][0]["resource"]
        digest = next((e.get("valueString") for e in comp.get("extension", [])
                       if str(e.get("url", "")).endswith("PrescriptionDigest")), None)
        _out({"id": task_id, "status": "completed", "title": comp.get("title"),
              "receipt": {"prescription_id": r.get("identifier", {}).get("value"),
                          "timestamp": r.get("timestamp"), "prescription_digest": digest}})

    @erezept.command("abort")
    @click.argument("task_id")
    @click.option("--as", "role", type=click.Choice(["prescriber", "insured", "pharmacy"]), required=True)
    @click.option("--id", "id_number", default=None,
                  help="Telematik-ID (prescriber / pharmacy) or KVNR (insured).")
    @click.pass_context
    def abort_cmd(ctx: click.Context, task_id: str, role: str, id_number: str | None) -> None:
        """Cancel TASK_ID (prescriber: AccessCode; pharmacy: Secret; insured: own Task)."""
        c = conn(ctx)
        ac = _capability("SAFEHOLD_EREZEPT_ACCESS_CODE", "AccessCode") if role == "prescriber" else None
        sec = _capability("SAFEHOLD_EREZEPT_SECRET", "Secret") if role == "pharmacy" else None
        if role == "insured" and not id_number:
            raise click.UsageError("--id KVNR is needed to abort as the insured person")
        idn = id_number or (DEFAULT_PRESCRIBER if role == "prescriber" else DEFAULT_PHARMACY)
        with c.client() as cl:
            cl.abort(c.token(role, idn), task_id, access_code=ac, secret=sec)
        _out({"id": task_id, "status": "cancelled"})

    @erezept.command("list")
    @click.option("--kvnr", required=True, help="The insured person's KVNR.")
    @click.pass_context
    def list_cmd(ctx: click.Context, kvnr: str) -> None:
        """The insured person's Tasks (id and status, JSON lines)."""
        c = conn(ctx)
        with c.client() as cl:
            b = cl.tasks(c.token("insured", kvnr))
        for e in b.get("entry", []):
            r = e["resource"]
            click.echo(json.dumps({"id": r["id"], "status": r.get("status")}))
        if not b.get("entry"):
            click.echo("no prescriptions", err=True)
        sys.stdout.flush()
