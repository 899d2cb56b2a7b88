"""Private contact discovery: which identifiers (phone numbers, KVNRs, ...) are registered,
without the operator or the database learning which ones a client asked about.

Modules (framework-free core first; see docs/discovery.md):

* :mod:`.identifiers` — identifier kinds (E.164, KVNR, pluggable), normalisation, OPRF input;
* :mod:`.protocol` — fixed-size wire formats shared with the client SDK;
* :mod:`.keys` — the service's keys, derived from one secret released to the workload;
* :mod:`.table` — the oblivious lookup table (blocked scan, numpy);
* :mod:`.registry` — registrations in the untrusted store, only as keyed tags of OPRF outputs;
* :mod:`.ratelimit` — CDSI-style rate limiting with tokens over previously asked sets;
* :mod:`.core` — the service facade (evaluate, query, register, unregister);
* :mod:`.http` — the FastAPI router; :mod:`.server` — the process.

Nothing is imported here, so the client SDK can use :mod:`.identifiers` and :mod:`.protocol`
without loading any server module.
"""
