"""Search a FHIR R4 server for the orders and reports of crawled studies (the read side's
server source).

The other source of :mod:`pipeline.fhir.context` beside a Bulk Data export folder: for each
crawled study, by its original accession number and Study Instance UID (held in memory only,
sent to the EHR that issued them, never logged: :class:`pipeline.fhir.client.FhirClient`
searches by POST with a form body and keeps query strings out of the logs),

1. ``ServiceRequest?identifier=<accession>`` and ``DiagnosticReport?identifier=<accession>``;
2. ``ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``, and ``ServiceRequest?_id=`` of each
   ServiceRequest an ImagingStudy is ``basedOn`` that step 1 did not find (a search, not a
   read: the EHR's id stays out of every URL);
3. ``DiagnosticReport?based-on=ServiceRequest/<id>`` for every ServiceRequest found.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.fhir.client import FhirClient
from pipeline.fhir.ndjson import ExportFile, NdjsonLine
from pipeline.fhir.systems import study_identifier

__all__ = ["study_resources"]


def study_resources(
    client: FhirClient, studies: Iterable[tuple[Iterable[str], Iterable[str]]]
) -> list[NdjsonLine]:
    """The ServiceRequests, ImagingStudies and DiagnosticReports of ``studies`` (each the
    original accession numbers and Study Instance UIDs of one study), one line each as an
    export would hold them (each version once), named ``search/<type>:<n>``."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}

    def keep(resource: dict[str, Any]) -> None:
        version = str((resource.get("meta") or {}).get("versionId") or "")
        found.setdefault((resource["resourceType"], str(resource.get("id")), version), resource)

    for accessions, uids in studies:
        orders: set[str] = set()
        based_on: set[str] = set()
        for accession in accessions:
            for resource in client.search("ServiceRequest", {"identifier": accession}):
                keep(resource)
                orders.add(str(resource.get("id")))
            for resource in client.search("DiagnosticReport", {"identifier": accession}):
                keep(resource)
        for uid in uids:
            query = {"identifier": study_identifier(uid)}
            for resource in client.search("ImagingStudy", query):
                keep(resource)
                for ref in resource.get("basedOn") or []:
                    target = str((ref or {}).get("reference") or "")
                    if target.startswith("ServiceRequest/"):
                        based_on.add(target.split("/")[1])
        for rid in sorted(based_on - orders):
            for order in client.search("ServiceRequest", {"_id": rid}):
                keep(order)
                orders.add(rid)
        for rid in sorted(orders):
            query = {"based-on": f"ServiceRequest/{rid}"}
            for resource in client.search("DiagnosticReport", query):
                keep(resource)
    lines = []
    counts: dict[str, int] = {}
    for (kind, _, _), resource in found.items():
        counts[kind] = counts.get(kind, 0) + 1
        name = f"search/{kind}"
        file = ExportFile(Path(name), kind, 0, 0)
        lines.append(NdjsonLine(file, name, counts[kind], json.dumps(resource)))
    return lines
