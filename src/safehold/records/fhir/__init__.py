"""HL7 FHIR R4 REST for the records service: ``/fhir`` beside the native API.

``core.py`` (framework-free: the resource store over the repositories, OperationOutcome,
Bundles), ``search.py`` (search parameters → blind-index terms and match rules),
``capability.py`` (the CapabilityStatement), ``types.py`` (R4 resource types), ``openapi.py``
(the OpenAPI description of ``/fhir``), ``http.py`` (the APIRouter; the only module here that
chooses HTTP status codes). docs/fhir.md describes what is supported and what is refused.
"""
