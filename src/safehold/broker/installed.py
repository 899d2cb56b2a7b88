"""The installed manifest: the version the authenticated state head names, with its workloads'
Verifiers, checked against the store before it is trusted.

The state head (``m/head``, :mod:`safehold.broker.state`) records the current manifest version
and digest. :class:`InstalledManifest` loads the manifest rows the head names and refuses
(:class:`~safehold.broker.errors.StateIntegrityError`, naming the row) when a row is missing,
edited, disagrees with the head, or a version beyond the head exists, so a manifest rolled back
or deleted in the store never looks like an older or absent one. Before a manifest operation it
re-reads the head (another replica may have installed a newer version; an older one means the
store was rolled back).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safehold.attestation.policy import AppraisalPolicy
from safehold.attestation.verifier import Verifier
from safehold.broker.errors import NotReadyError, StateIntegrityError
from safehold.broker.manifest import Manifest, manifest_from_dict
from safehold.broker.state import BrokerState
from safehold.errors import ConfigError, ManifestError


@dataclass(frozen=True)
class Active:
    """The installed manifest, its version and its workloads' Verifiers, swapped as one value so
    a request never sees a manifest with another version's policies."""

    manifest: Manifest
    version: int
    verifiers: dict[str, Verifier]


def build_verifiers(m: Manifest) -> dict[str, Verifier]:
    """One Verifier per workload policy (reads each ``simulated_root`` file).

    Raises:
        ManifestError: a policy does not load (``workloads.<name>.policy: …``), or its
            ``simulated_root`` is relative (the CLI makes it absolute against the manifest
            file's directory; a relative path reaching the broker would depend on its cwd).
    """
    verifiers = {}
    for name, w in m.workloads.items():
        root = w.policy.get("simulated_root")
        if isinstance(root, str) and not Path(root).is_absolute():
            raise ManifestError(
                f"workloads.{name}.policy.simulated_root: {root!r:.80} is relative; give an absolute "
                "path (the safehold CLI resolves it against the manifest file's directory)"
            )
        try:
            verifiers[name] = Verifier(AppraisalPolicy.from_dict({"name": name, **w.policy}))
        except ConfigError as e:
            raise ManifestError(f"workloads.{name}.policy: {e}") from None
    return verifiers


class InstalledManifest:
    """The current manifest and the state head it was read under.

    Attributes:
        active: the installed manifest, or None before the first is set.
        head / head_ver: the state head (as :meth:`BrokerState.read_head` returns it) and its row
            version, as last read or written by this broker.
        lock: held while a manifest is checked and installed (re-entrant).
    """

    def __init__(self, state: BrokerState):
        self._state = state
        self.active: Active | None = None
        self.head: dict[str, Any] = {}
        self.head_ver = 0
        self.lock = threading.RLock()

    @property
    def manifest(self) -> Manifest | None:
        """The current manifest, or None before the first is set."""
        act = self.active
        return act.manifest if act else None

    @property
    def version(self) -> int:
        """The current manifest version (0 before the first is set)."""
        act = self.active
        return act.version if act else 0

    def require(self) -> Active:
        """The installed manifest of a ready broker.

        Raises:
            NotReadyError: recovery mode, or no manifest is set yet.
        """
        if self._state.mode != "ready":
            raise NotReadyError(f"broker is in recovery mode: {self._state.reason}")
        act = self.active
        if act is None:
            raise NotReadyError("no manifest is set yet: `safehold broker manifest set`")
        return act

    def load(self, head: dict[str, Any], head_ver: int) -> None:
        """Install the manifest ``head`` names (at start-up and after a recovery).

        Raises:
            StateIntegrityError: as :meth:`from_head`.
            ManifestError: a stored manifest's policy no longer loads.
        """
        act = self.from_head(head)
        self.head, self.head_ver = head, head_ver
        self.active = act

    def swap(self, active: Active, head: dict[str, Any], head_ver: int) -> None:
        """Make ``active`` current together with the head just written for it."""
        self.head, self.head_ver = head, head_ver
        self.active = active

    def from_head(self, head: dict[str, Any]) -> Active | None:
        """The manifest the state head names, after checking its rows agree with the head.

        Raises:
            StateIntegrityError: ``manifest/current`` or ``manifest/<v>`` missing, edited, or
                disagreeing with the head (version or digest), or a version beyond the head exists.
        """
        st = self._state
        v = head["manifest_version"]
        cur = st.get_json("manifest", "current")
        if v == 0:
            if cur is not None:
                raise StateIntegrityError(
                    f"broker state row {st.row_name('manifest', 'current')} exists but the state head "
                    "(m/head) records no manifest ever set: m/head was rolled back in the store"
                )
            return None
        why = f"the state head records manifest version {v}"
        if cur is None:
            cur = st.require_json("manifest", "current", why)
        if cur.get("version") != v:
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', 'current')} says version "
                f"{cur.get('version')!r:.20}, {why}: rolled back or replaced in the store"
            )
        for older in range(1, v):  # every version stays readable (GET /admin/manifest?version=N)
            st.require_json("manifest", str(older), why)
        entry = st.require_json("manifest", str(v), why)
        try:
            m = manifest_from_dict(entry["manifest"])
        except (KeyError, ManifestError):
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', str(v))} is malformed") from None
        if m.digest != head.get("manifest_digest") or entry.get("digest") != m.digest:
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', str(v))} has digest {m.digest[:16]}…, the "
                f"state head records {str(head.get('manifest_digest'))[:16]}…: replaced in the store"
            )
        if st.get("manifest", str(v + 1)) is not None:
            raise StateIntegrityError(
                f"broker state row {st.row_name('manifest', str(v + 1))} exists beyond the state "
                f"head's manifest version {v}: m/head and manifest/current were rolled back in the store"
            )
        return Active(m, v, build_verifiers(m))

    def refresh(self) -> None:
        """Re-read the state head before a manifest operation: refuse if the store's manifest
        went backwards or was replaced; follow a newer version another replica installed.

        Raises:
            StateIntegrityError: as :meth:`from_head`, or the head's version is older than the
                one this broker holds.
        """
        head, ver = self._state.read_head()
        if ver == self.head_ver and head == self.head:
            return
        held = self.version
        if head["manifest_version"] < held:
            raise StateIntegrityError(
                f"broker state row m/head records manifest version {head['manifest_version']}, this "
                f"broker holds version {held}: rolled back in the store"
            )
        act = self.from_head(head)
        with self.lock:
            self.head, self.head_ver = head, ver
            self.active = act

    def check_secrets(self) -> None:
        """Every keyset secret of the manifest exists (they are made at install) and every
        stored secret authenticates.

        Raises:
            StateIntegrityError: naming the row.
        """
        act = self.active
        if act is None:
            return
        for spec in act.manifest.secrets.values():
            if spec.type == "keyset":
                self._state.require_json("secret", spec.name, "keyset secrets are made when the "
                                         "manifest is installed")
            elif spec.type == "value":
                self._state.get("secret", spec.name)
