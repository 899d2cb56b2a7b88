"""E-Rezept prescription workflow behind the E-Rezept VAU (FHIR R4, the Fachdienst's public API
shape): Task state machine (:mod:`.tasks`), KBV bundle checks (:mod:`.kbv`), IdP access tokens
(:mod:`.tokens`); routes in :mod:`.http`. See docs/erezept.md."""
