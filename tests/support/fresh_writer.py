"""A writer process for the freshness crash test: FreshStore transactions (one record + three
postings each) through the real anchor members, printing ``ack N`` after each one returned.

Run: ``python tests/support/fresh_writer.py`` with a JSON job on stdin (test keys travel on a
pipe, never in argv, the environment or a file): ``{engine: "sqlite"|"postgres", path | dsn +
schema, members, policy, cert, key, mac_key (hex), start, count, stall_at?}``. Prints ``ready``
once the store is open, then ``ack <i>`` per committed and anchored transaction. With
``stall_at: i`` the anchor hangs once transaction ``i`` is committed to the database (it prints
``stalled`` and never advances), so a kill lands between COMMIT and the anchor advance for sure.
"""

from __future__ import annotations

import json
import sys
import time

from safehold.records.search import NAMESPACE_SUFFIX, PREFIX_LEN

POSTINGS_NS = f"records:patients{NAMESPACE_SUFFIX}"


def record_key(i: int) -> bytes:
    return b"rec-%08d" % i


def posting_key(term: int, i: int) -> bytes:
    return bytes([term]) * PREFIX_LEN + record_key(i)


class StallingAnchor:
    """Test hook, not a fake of hardware: forwards to the real anchor client, except that once
    ``stall`` is set the next ``advance`` (the step after the database COMMIT) hangs."""

    def __init__(self, inner) -> None:
        self.inner, self.stall = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def advance(self, *args, **kwargs):
        if self.stall:
            print("stalled", flush=True)
            time.sleep(3600)
        return self.inner.advance(*args, **kwargs)


def main() -> int:
    from safehold.attestation.policy import AppraisalPolicy
    from safehold.attestation.verifier import Verifier
    from safehold.freshness.anchor.client import QuorumAnchor
    from safehold.freshness.store import FreshStore
    from safehold.freshness.vmap import NamespacePolicy
    from safehold.records.fresh import POSTINGS_POLICY

    job = json.loads(sys.stdin.read())
    if job["engine"] == "sqlite":
        from safehold.store.sqlite import SqliteStore

        inner = SqliteStore(job["path"])
    else:
        from safehold.store.postgres import PostgresStore

        inner = PostgresStore(job["dsn"], schema=job["schema"], application_name="fresh-writer", max_size=2)
    anchor = QuorumAnchor(job["members"], Verifier(AppraisalPolicy.from_toml(job["policy"])),
                          client_cert_pem=job["cert"].encode(), client_key_pem=job["key"].encode(),
                          timeout=2.0)
    anchor = StallingAnchor(anchor)
    fs = FreshStore(inner, ledger="records", mac_key=bytes.fromhex(job["mac_key"]), anchor=anchor,
                    policy=NamespacePolicy(POSTINGS_POLICY))
    fs.check()
    print("ready", flush=True)
    for i in range(job["start"], job["start"] + job["count"]):
        anchor.stall = i == job.get("stall_at")
        with fs.transaction() as tx:
            tx.put("records:patients", record_key(i), b"record %d" % i, expected_version=0)
            for t in range(3):
                tx.put(POSTINGS_NS, posting_key(t, i), b"id", expected_version=0)
        print(f"ack {i}", flush=True)
    fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
