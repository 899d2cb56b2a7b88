"""gematik VAU channels: the E-Rezept VAU (gemSpec_Krypt A_20160…A_20175, :mod:`.erp`) and the
ePA 3 VAU ("VAU-Protokoll für ePA für alle", gemSpec_Krypt chapter 7, :mod:`.epa`).

The core modules are framework-free and do no I/O; :mod:`.http` holds the FastAPI routes and
:mod:`.server` the process. See docs/vau.md for what is implemented to which requirement.
"""
