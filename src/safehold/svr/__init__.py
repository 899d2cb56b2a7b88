"""Secure Value Recovery (issue 13): PIN-protected secrets with a guess limit the operator
cannot reset (docs/svr.md).

* SVR2 (Signal's DB2): :mod:`.svr2` — backup, expose, restore, delete, query on one server.
* SVR3 (Signal's DB4): :mod:`.svr3` (one server's part) and :mod:`.db4` (the protocol's
  arithmetic, shared with the client): a secret split across ``n`` servers with additive
  OPRF-key shares, XOR encryption shares and an authorisation proof.
* Shared with the client SDK: :mod:`.protocol` (wire format, statuses), :mod:`.pin` (PIN
  normalisation, Argon2id, sealing), :mod:`.db4`, :mod:`.errors`.
* Service: :mod:`.rows` (state over the records engine and a FreshStore), :mod:`.keys`,
  :mod:`.core` (facade); :mod:`.http` (routes), :mod:`.server` (the process), :mod:`.launch`
  (``LocalSvr``: n servers on loopback).
"""
