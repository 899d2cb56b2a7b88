"""``safehold demo`` as a library: the main job in one call.

Starts the stack (as ``safehold up``), imports real synthetic patients — the Synthea CSV, the
Synthea FHIR bundles and the HL7 examples from ``../shared/data`` when present, else the small
sample shipped in ``safehold/data/sample`` — through the attesting client, reads one back,
searches by family name, then checks the database file byte by byte for every imported name,
SSN and record id (none may appear) and stops cleanly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safehold.client.connection import load_connection, open_client, owner_dir
from safehold.client.importer import STATE_FILE, count_patients, import_files
from safehold.devstack.datadir import prepare
from safehold.devstack.errors import PlaintextFoundError
from safehold.devstack.processes import start, stop
from safehold.devstack.stack import Stack
from safehold.jsontypes import JSONObject
from safehold.records.importers import ImportItem, iter_file
from safehold.records.model import display_name

__all__ = ["demo_files", "run_demo", "scan_files", "sensitive_strings", "shared_data_dir"]


def shared_data_dir() -> Path | None:
    """``$SAFEHOLD_SHARED_DIR/data``, else ``../shared/data`` from the working directory or from
    the repository root; None if absent."""
    cands = []
    if os.environ.get("SAFEHOLD_SHARED_DIR"):
        cands.append(Path(os.environ["SAFEHOLD_SHARED_DIR"]) / "data")
    cands.append(Path.cwd().parent / "shared" / "data")
    cands.append(Path(__file__).resolve().parents[3].parent / "shared" / "data")
    for c in cands:
        if (c / "INDEX.md").exists():
            return c
    return None


def demo_files() -> tuple[list[Path], str]:
    """The input files and a description of where they come from."""
    d = shared_data_dir()
    if d is not None:
        files = sorted((d / "synthea-csv-27-ohdsi-dbt-synthea").glob("patients.csv"))
        files += sorted((d / "synthea-fhir-r4-bundles-google-fhir-data-pipes").glob("*.json"))
        files += sorted((d / "hl7-fhir-r4-patient-examples").glob("Patient-*.json"))
        if files:
            return files, f"shared data in {d}"
    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    return [sample / "patients.csv", sample / "bundle.json"], f"the packaged sample in {sample}"


def sensitive_strings(files: Iterable[Path]) -> set[bytes]:
    """Names (family, given, Synthea FIRST/LAST/MAIDEN), SSNs and record ids of the records in
    ``files``, UTF-8, at least 4 bytes long (shorter ones would match ciphertext by chance)."""
    out: set[str] = set()
    for f in files:
        for it in iter_file(f):
            if not isinstance(it, ImportItem):
                continue
            r = it.record
            out.add(it.id)
            if r.get("resourceType") == "Patient":
                for n in r.get("name") or []:
                    if isinstance(n, dict):
                        out.add(str(n.get("family") or ""))
                        out.update(str(g) for g in n.get("given") or [])
                for ident in r.get("identifier") or []:
                    if isinstance(ident, dict) and "ssn" in str(ident.get("system", "")):
                        out.add(str(ident.get("value", "")))
            else:
                keys = ("FIRST", "LAST", "MAIDEN", "SSN", "fname", "lname", "ssn")
                out.update(str(r.get(k, "")) for k in keys)
    return {s.encode("utf-8") for s in out if len(s.encode("utf-8")) >= 4}


def scan_files(paths: Iterable[Path], needles: set[bytes]) -> dict[str, int]:
    """How often the needles occur in each file's raw bytes.

    Every needle is searched as a JSON string (``"Doe"``, exact case) and as a CSV cell
    (``,Doe,``); needles of 6 bytes and more also bare and case-insensitively, except short
    hex-looking ones (``f001``), which random blind indexes and ciphertext would match by chance.
    """
    pats: set[bytes] = set()
    for n in needles:
        pats.add(b'"' + n + b'"')
        pats.add(b"," + n + b",")
        hexlike = len(n) < 12 and all(c in b"0123456789abcdefABCDEF-" for c in n)
        if len(n) >= 6 and not hexlike:
            pats.add(n.lower())
    res: dict[str, int] = {}
    for p in paths:
        if not p.exists():
            continue
        raw = p.read_bytes()
        low = raw.lower()
        res[str(p)] = sum((low if pat == pat.lower() and not pat.startswith((b'"', b",")) else raw).count(pat)
                          for pat in pats)
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _family(data: JSONObject) -> str | None:
    """The family name of a flat (``LAST``) or FHIR Patient record, or None."""
    last = data.get("LAST")
    if isinstance(last, str) and last:
        return last
    names = data.get("name")
    for n in names if isinstance(names, list) else []:
        fam = n.get("family") if isinstance(n, dict) else None
        if isinstance(fam, str) and fam:
            return fam
    return None


def run_demo(data_dir: str, *, echo: Callable[[str], None] = print,
             on_started: Callable[[Stack], None] | None = None,
             show: Callable[[str], None] | None = None,
             package_root: str | None = None) -> dict[str, Any]:
    """Run the demo; return its figures (import counts, ``records``, ``plaintext_hits``).

    Args:
        echo: prints one line of the demo's narration.
        on_started: called with the running stack (``safehold demo`` prints its summary).
        show: displays the one-line simulated-TEE warning (default: stderr).
        package_root: run the processes from this copy of the package (tests).

    Raises:
        PlaintextFoundError: a name, SSN or id was found in clear in the database file.
        StackError, DataDirBusyError, ConfigError: the stack did not start.
    """
    files, origin = demo_files()
    patients, total = count_patients(files, resources=False), count_patients(files)
    echo(f"Safehold demo: importing {patients} patients and {total - patients} other FHIR resources "
         f"from {origin}")
    s = prepare(data_dir, broker_port=_free_port(), records_port=_free_port(), scone_port=_free_port(),
                package_root=package_root)
    result: dict[str, Any] = {}
    try:
        start(s)
        if on_started is not None:
            on_started(s)
        conn = load_connection(data_dir)
        with open_client(conn) if show is None else open_client(conn, show=show) as c:
            state = owner_dir(data_dir) / STATE_FILE
            counts = import_files(c, files, state, target=conn.target)
            echo(f"imported {counts.imported}, skipped {counts.skipped}, failed {counts.failed}; "
                 f"other FHIR resources (Observation, Condition, …): imported "
                 f"{counts.resources_imported}, skipped {counts.resources_skipped}")
            a = c.appraisal
            if a is not None:
                echo(f"records service attested: TEE {a.claims.tee_type}, measurement "
                     f"{a.claims.measurement.hex()[:24]}… (policy {a.policy_name})")
            ids = list(c.list_ids())
            first = sorted(ids)[0]
            rec = c.get(first)
            name = display_name(rec.data)
            echo(f"read back {first}: {name or '(no name)'} (version {rec.version})")
            fam = _family(rec.data)
            if fam:
                hits = c.search(family=fam)
                echo(f"search family={fam!r}: {len(hits)} match(es) via blind index")
            result.update(counts.as_dict(), records=len(ids))
    finally:
        codes = stop(s)
        echo(f"stopped broker and records service ({codes})")
    db = Path(s.store_url.removeprefix("sqlite:///")) if s.store_url.startswith("sqlite:") else None
    if db is not None:
        needles = sensitive_strings(files)
        paths = [db, db.with_name(db.name + "-wal")]
        found = scan_files(paths, needles)
        total = sum(found.values())
        size = sum(p.stat().st_size for p in paths if p.exists())
        echo(f"searched {db} ({size} bytes) for {len(needles)} names, SSNs and ids: {total} found")
        if total:
            raise PlaintextFoundError(f"patient data found in clear in {db}")
        echo(f"see for yourself:  grep -c -a -i '{_example_name(files)}' {db}   (prints 0)")
        result["plaintext_hits"] = total
    return result


def _example_name(files: list[Path]) -> str:
    for s in sorted(sensitive_strings(files[:1])):
        t = s.decode("utf-8", "replace")
        if t.isalnum() and not t.isdigit():
            return t
    return "Smith"
