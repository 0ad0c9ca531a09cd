"""HL7 FHIR R4 for pacsflow (issue #25).

Two directions:

- export: each written-back result becomes a FHIR transaction Bundle (ImagingStudy,
  DiagnosticReport, one Observation per measurement), delivered to a folder or to a FHIR
  server through an outbox, idempotently (deterministic ids, conditional create/update);
- context: the ServiceRequest and radiology DiagnosticReport around each crawled study are
  read from a Bulk Data export (NDJSON) or a FHIR server, de-identified, and added to the
  research tables ``orders`` and ``reports``.

Resources are built and validated with ``fhir.resources`` (its R4B models: FHIR 4.3, wire
compatible with R4 for every resource pacsflow writes or reads).
"""
