"""What the data owner pinned for a local stack's data directory, and the clients' appraisal
policies checked against it.

The data directory of ``safehold up`` is the operator's (docs/threat-model.md): whoever can
write there could widen a client policy (``D/policy.toml``: a measurement of its own, debug or
simulated Evidence) and point ``up.json`` at its own server. So ``safehold up`` pins, in the
owner directory (:func:`~safehold.client.connection.owner_dir`, never given to a server), the
SHA-256 of every client policy it writes and of the simulated root CA they name
(``<owner dir>/pins.json``: ``{abs data dir: {"workload_ca_sha256", "client_policies_sha256":
{service: hex}, "simulated_root_sha256"}}``), and the owner's tools load a policy from the data
directory only through :func:`pinned_policy`: read once, compared with the pin, parsed from
those same bytes (the simulated root too), so that nothing is re-read from the data directory
later.

Why a digest and not an owner-side copy of the policy: the pin file already holds the workload
CA's digest under the same key, one small file stays the single record of what the owner
accepted, and a changed policy is *reported* (the owner learns that someone edited the data
directory) instead of silently shadowed by a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safehold.client.connection import owner_dir
from safehold.errors import ConfigError

if TYPE_CHECKING:
    from safehold.attestation.verifier import Verifier

__all__ = ["CLIENT_POLICIES", "OWNER_PINS_FILE", "check_owner_private", "pinned_policy", "read_owner_pins"]

#: In the owner directory: what the owner's tools accept for each data directory.
OWNER_PINS_FILE = "pins.json"

#: The clients' policies ``safehold up`` writes into the data directory, by service (the
#: service names of ``up.json``). A policy is always taken from this name, never from a path
#: ``up.json`` names.
CLIENT_POLICIES = {"records": "policy.toml", "svr": "svr-policy.toml",
                   "discovery": "discovery-policy.toml", "erezept": "vau-policy.toml",
                   # the SVR group's anchor members, appraised by `up`'s checkpoint keeper
                   "svr-anchor": "svr-anchor-policy.toml"}

_WHAT_TO_DO = ("restart `safehold up` (it writes the policies and pins them), or give --url and "
               "--policy with a policy you keep on your own side")


def check_owner_private(p: Path, st: os.stat_result | None = None) -> None:
    """Refuse an owner directory (or a file in it) that is not the data owner's alone: owned by
    another user, or writable by group or others. Whoever owns or can write it chooses what the
    owner's tools trust (``pins.json``) and reads the owner's key and tokens — e.g. the default
    ``<data dir>.owner`` of a data directory that is a symlink into the operator's storage lies
    on the operator's side.

    Args:
        st: ``p``'s stat result when the caller already has it (an ``fstat`` of the open file).

    Raises:
        ConfigError: as above (names the path, its owner or mode, and ``--owner-dir``).
    """
    if st is None:
        try:
            st = p.stat()
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"{p}: {e.strerror or e}") from None
    me = os.geteuid()
    if st.st_uid != me:
        raise ConfigError(f"{p} is owned by uid {st.st_uid}, not by you (uid {me}): the owner directory "
                          "must be the data owner's alone (whoever owns it chooses what the CLIs trust "
                          "and reads the owner's key); refusing it — choose one with --owner-dir / "
                          "SAFEHOLD_OWNER_DIR")
    if st.st_mode & 0o022:
        raise ConfigError(f"{p} is writable by group or others (mode {st.st_mode & 0o777:o}): the owner "
                          "directory must be the data owner's alone; refusing it — chmod go-w, or "
                          "choose another with --owner-dir / SAFEHOLD_OWNER_DIR")


def read_owner_pins(p: Path) -> dict[str, dict[str, Any]]:
    """``pins.json`` ({} if absent), only from an owner directory that is the caller's alone
    (:func:`check_owner_private`, the directory and the file as opened).

    Raises:
        ConfigError: unreadable or malformed, or the directory or file is another user's or
            writable by group or others.
    """
    check_owner_private(p.parent)
    try:
        with p.open("rb") as fh:
            check_owner_private(p, os.fstat(fh.fileno()))
            raw = fh.read().decode("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        pins = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{p} is not JSON") from None
    if not isinstance(pins, dict) or not all(isinstance(v, dict) for v in pins.values()):
        raise ConfigError(f"{p}: expected {{data dir: {{workload_ca_sha256, client_policies_sha256}}}}")
    return pins


def pinned_policy(data_dir: str | os.PathLike[str], service: str,
                  owner: str | os.PathLike[str] | None = None) -> Verifier:
    """The appraisal policy of ``service`` (:data:`CLIENT_POLICIES`) in ``data_dir``, as a
    :class:`~safehold.attestation.verifier.Verifier`, if and only if it is the one the owner
    pinned (``<owner dir>/pins.json``, written by ``safehold up``).

    The file is read once; its SHA-256 must equal the pin; the policy is parsed from those
    bytes. A ``simulated_root`` it names is read once too, must equal the pinned
    ``simulated_root_sha256`` and goes to the Verifier as bytes (the path is not re-read).

    Args:
        owner: the owner directory (``--owner-dir``); default
            :func:`~safehold.client.connection.owner_dir` of ``data_dir``.

    Raises:
        ConfigError: nothing pinned for the data directory (or for this service); the policy
            file or its simulated root differs from the pin, is missing or unreadable; or
            ``pins.json`` is malformed. The message names the file and what to do.
    """
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier

    d = Path(data_dir)
    f = d / CLIENT_POLICIES[service]
    pins_path = owner_dir(d, owner) / OWNER_PINS_FILE
    entry = read_owner_pins(pins_path).get(str(d.resolve()), {})
    policies = entry.get("client_policies_sha256")
    want = policies.get(service) if isinstance(policies, dict) else None
    if not isinstance(want, str) or not want:
        raise ConfigError(f"{f}: {pins_path} pins no {service} client policy for {d.resolve()}, and the "
                          f"data directory's files are not trusted alone: {_WHAT_TO_DO}")
    data = _read(f, "appraisal policy")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise ConfigError(f"{f} is not the appraisal policy the owner pinned ({pins_path}: {want[:16]}…, "
                          f"found {got[:16]}…): it was changed after `safehold up` wrote it, refusing to "
                          f"send anything under it; {_WHAT_TO_DO}")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:  # pinned, so written so by `up`
        raise ConfigError(f"{f}: not a TOML policy ({e})") from None
    root = table.pop("simulated_root", None)
    options: dict[str, dict[str, Any]] = {}
    if root is not None:
        if not isinstance(root, str):
            raise ConfigError(f"{f}: simulated_root: expected a path")
        root_path = Path(root) if Path(root).is_absolute() else f.parent / root
        want_root = entry.get("simulated_root_sha256")
        root_pem = _read(root_path, "simulated root CA")
        got_root = hashlib.sha256(root_pem).hexdigest()
        if not isinstance(want_root, str) or got_root != want_root:
            raise ConfigError(f"{root_path} (the simulated root CA {f.name} names) is not the one the "
                              f"owner pinned ({pins_path}): refusing to trust Evidence under it; "
                              f"{_WHAT_TO_DO}")
        options["simulated"] = {"trusted_roots": [root_pem]}
    policy = AppraisalPolicy.from_dict(table, base_dir=f.parent)
    return Verifier(policy, verifier_options=options)


def _read(p: Path, what: str) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {p}: {e.strerror or e}; {_WHAT_TO_DO}") from None
