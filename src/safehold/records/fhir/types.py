"""The resource types of HL7 FHIR R4 (4.0.1), from the specification's resource list
(https://hl7.org/fhir/R4/resourcelist.html); ``/fhir`` accepts these and no others."""

from __future__ import annotations

import re

__all__ = ["FHIR_ID_RE", "R4_RESOURCE_TYPES", "check_fhir_id", "check_type"]

_R4_LIST = """
Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse
AuditEvent Basic Binary BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement
CarePlan CareTeam CatalogEntry ChargeItem ChargeItemDefinition Claim ClaimResponse
ClinicalImpression CodeSystem Communication CommunicationRequest CompartmentDefinition
Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest
DeviceUseStatement DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis
Encounter Endpoint EnrollmentRequest EnrollmentResponse EpisodeOfCare EventDefinition Evidence
EvidenceVariable ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal
GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice
Library Linkage List Location Measure MeasureReport Media Medication MedicationAdministration
MedicationDispense MedicationKnowledge MedicationRequest MedicationStatement MedicinalProduct
MedicinalProductAuthorization MedicinalProductContraindication MedicinalProductIndication
MedicinalProductIngredient MedicinalProductInteraction MedicinalProductManufactured
MedicinalProductPackaged MedicinalProductPharmaceutical MedicinalProductUndesirableEffect
MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder Observation
ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner
PractitionerRole Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson
RequestGroup ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject
RiskAssessment RiskEvidenceSynthesis Schedule SearchParameter ServiceRequest Slot Specimen
SpecimenDefinition StructureDefinition StructureMap Subscription Substance SubstanceNucleicAcid
SubstancePolymer SubstanceProtein SubstanceReferenceInformation SubstanceSourceMaterial
SubstanceSpecification SupplyDelivery SupplyRequest Task TerminologyCapabilities TestReport
TestScript ValueSet VerificationResult VisionPrescription
"""
R4_RESOURCE_TYPES = frozenset(_R4_LIST.split())

#: FHIR R4 ``id`` (§2.24.0.1 ``[A-Za-z0-9\\-\\.]{1,64}``), without the dot segments ``.``/``..``
#: that no URL can address.
FHIR_ID_RE = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9\-.]{1,64}")


def check_type(rtype: str) -> bool:
    """True if ``rtype`` is an R4 resource type."""
    return rtype in R4_RESOURCE_TYPES


def check_fhir_id(rid: object) -> bool:
    """True if ``rid`` is a FHIR R4 logical id (:data:`FHIR_ID_RE`)."""
    return isinstance(rid, str) and FHIR_ID_RE.fullmatch(rid) is not None
