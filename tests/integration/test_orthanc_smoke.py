"""Smoke tests of the ``orthanc`` fixture: a real Orthanc over DICOMweb and DICOM on loopback.

Each test sends copies of the synthetic archive's series with fresh UIDs, so tests never see
each other's data in the session-wide PACS.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
import requests
from pydicom import Dataset, dcmread
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

if TYPE_CHECKING:
    from conftest import OrthancServer, SynthArchive, SynthSeries
    from dicomweb_client.api import DICOMwebClient

pytestmark = pytest.mark.integration

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
DIMSE_TIMEOUT_S = 30


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def read_series(series: SynthSeries) -> list[Dataset]:
    """Read every file of a series (Part 10 files, in InstanceNumber order)."""
    assert series.part10, f"series {series.series_uid} has no file meta to send"
    datasets = [dcmread(path) for path in series.files]
    assert [ds.SOPInstanceUID for ds in datasets] == list(series.sop_instance_uids)
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {series.transfer_syntax}
    return datasets


def give_fresh_uids(datasets: Sequence[Dataset]) -> tuple[str, str]:
    """Give one series new Study, Series, Frame of Reference and SOP Instance UIDs, in place.

    The pixel data and transfer syntax are untouched. Returns ``(study_uid, series_uid)``.
    """
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    for ds in datasets:
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return study_uid, series_uid


def sop_uids(datasets: Iterable[Dataset]) -> set[str]:
    """The SOP Instance UIDs of some datasets."""
    return {str(ds.SOPInstanceUID) for ds in datasets}


def qido_values(results: Iterable[dict[str, Any]], keyword: str) -> list[Any]:
    """The first value of ``keyword`` in each QIDO-RS (DICOM JSON) result."""
    return [Dataset.from_json(result)[keyword].value for result in results]


def stow(dicomweb: DICOMwebClient, datasets: Sequence[Dataset]) -> Dataset:
    """Store datasets by STOW-RS; assert every one is referenced and none failed."""
    response = dicomweb.store_instances(list(datasets))
    # the DICOMweb plugin 1.7 always sends FailedSOPSequence, empty when nothing failed
    failed = response.get("FailedSOPSequence", [])
    assert len(failed) == 0, f"STOW-RS failures: {failed}"
    referenced = {str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence}
    assert referenced == sop_uids(datasets)
    return response


def stored_transfer_syntax(orthanc: OrthancServer, sop_instance_uid: str) -> str:
    """The transfer syntax Orthanc stored an instance in (REST ``/tools/lookup`` + metadata)."""
    found = orthanc.rest("POST", "/tools/lookup", data=sop_instance_uid)
    assert found.status_code == 200, found.text
    [match] = [m for m in found.json() if m["Type"] == "Instance"]
    meta = orthanc.rest("GET", f"/instances/{match['ID']}/metadata/TransferSyntax")
    assert meta.status_code == 200, meta.text
    return meta.text.strip()


def scu(orthanc: OrthancServer) -> AE:
    """A pynetdicom AE with the fixture's registered calling AE title and finite timeouts."""
    ae = AE(ae_title=orthanc.scu_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DIMSE_TIMEOUT_S
    return ae


def no_delay(assoc: Association) -> None:
    """Turn Nagle's algorithm off on an association's socket.

    pynetdicom leaves it on, so each DIMSE message waits ~40 ms for a delayed ACK (16 C-STOREs:
    0.85 s with it, 0.2 s without).
    """
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(orthanc: OrthancServer, ae: AE) -> Association:
    """Associate ``ae`` with the test Orthanc (called AE checked) and assert it is accepted."""
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established, f"association to {orthanc.aet} rejected or aborted"
    no_delay(assoc)
    return assoc


def c_find(orthanc: OrthancServer, query: Dataset) -> tuple[list[Dataset], int]:
    """Run a Study Root C-FIND; return the matches and the final status."""
    ae = scu(orthanc)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(orthanc, ae)
    matches: list[Dataset] = []
    final = None
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status, "C-FIND got no status (timeout or aborted association)"
            if status.Status in PENDING:
                assert identifier is not None
                matches.append(identifier)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    assert final is not None, "C-FIND ended without a final status"
    return matches, final


@pytest.fixture
def ct_axials(synth_archive: SynthArchive) -> list[SynthSeries]:
    """The axial CT series of the synthetic archive (16 slices each)."""
    series = synth_archive.of_kind("ct_axial")
    assert series, "the synthetic archive has no axial CT series"
    assert all(len(s.files) == 16 for s in series)
    return series


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_http_needs_credentials(orthanc: OrthancServer) -> None:
    """Authentication is on: no or wrong credentials get 401, the registered user gets in."""
    assert orthanc.rest("GET", "/system", auth=None).status_code == 401
    assert orthanc.rest("GET", "/dicom-web/studies", auth=None).status_code == 401
    wrong = (orthanc.username, orthanc.password + "-wrong")
    assert orthanc.rest("GET", "/system", auth=wrong).status_code == 401

    system = orthanc.rest("GET", "/system")
    assert system.status_code == 200
    assert system.json()["DicomAet"] == orthanc.aet
    assert system.json()["DicomPort"] == orthanc.dicom_port
    assert system.json()["HttpPort"] == orthanc.http_port
    plugins = orthanc.rest("GET", "/plugins").json()
    assert "dicom-web" in plugins


def test_stow_rs_then_qido_rs_and_wado_rs(
    orthanc: OrthancServer, dicomweb: DICOMwebClient, ct_axials: list[SynthSeries]
) -> None:
    """A CT series stored by STOW-RS is found by QIDO-RS and retrieved intact by WADO-RS."""
    datasets = read_series(ct_axials[0])
    study_uid, series_uid = give_fresh_uids(datasets)

    stow(dicomweb, datasets)

    series = dicomweb.search_for_series(study_instance_uid=study_uid)
    assert qido_values(series, "SeriesInstanceUID") == [series_uid]
    assert qido_values(series, "Modality") == ["CT"]

    instances = dicomweb.search_for_instances(
        study_instance_uid=study_uid, series_instance_uid=series_uid
    )
    assert len(instances) == len(datasets)
    assert set(qido_values(instances, "SOPInstanceUID")) == sop_uids(datasets)

    studies = dicomweb.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert qido_values(studies, "StudyInstanceUID") == [study_uid]

    first = datasets[0]
    back = dicomweb.retrieve_instance(study_uid, series_uid, first.SOPInstanceUID)
    assert back.SOPInstanceUID == first.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID
    assert back.PixelData == first.PixelData
    assert stored_transfer_syntax(orthanc, first.SOPInstanceUID) == (
        first.file_meta.TransferSyntaxUID
    )


def test_c_store_then_c_find_and_c_move(
    orthanc: OrthancServer, ct_axials: list[SynthSeries]
) -> None:
    """A CT series sent by C-STORE is found by C-FIND (study and series level) and C-MOVEd."""
    datasets = read_series(ct_axials[-1])  # another series than the STOW-RS test's, if any
    study_uid, series_uid = give_fresh_uids(datasets)

    # C-STORE, proposing each SOP class with the transfer syntax the files are in
    ae = scu(orthanc)
    contexts = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    assoc = associate(orthanc, ae)
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    assert [int(s.Status) for s in statuses] == [SUCCESS] * len(datasets)

    # C-FIND, STUDY level
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.PatientID = ""
    query.ModalitiesInStudy = ""
    query.NumberOfStudyRelatedInstances = ""
    matches, final = c_find(orthanc, query)
    assert final == SUCCESS
    assert [m.StudyInstanceUID for m in matches] == [study_uid]
    assert matches[0].PatientID == datasets[0].PatientID
    assert "CT" in matches[0].ModalitiesInStudy
    assert int(matches[0].NumberOfStudyRelatedInstances) == len(datasets)

    # C-FIND, SERIES level
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.NumberOfSeriesRelatedInstances = ""
    matches, final = c_find(orthanc, query)
    assert final == SUCCESS
    assert [m.SeriesInstanceUID for m in matches] == [series_uid]
    assert matches[0].Modality == "CT"
    assert int(matches[0].NumberOfSeriesRelatedInstances) == len(datasets)

    # C-MOVE the series to a Storage SCP at the fixture's registered SCU AE and port
    received: list[Dataset] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(event.dataset)
        return SUCCESS

    scp = AE(ae_title=orthanc.scu_aet)
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = scp.start_server(
        ("127.0.0.1", orthanc.scu_port),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_CONN_OPEN, lambda event: no_delay(event.assoc)),
        ],
    )
    try:
        ae = scu(orthanc)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = associate(orthanc, ae)
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        try:
            responses = list(
                assoc.send_c_move(
                    query, orthanc.scu_aet, StudyRootQueryRetrieveInformationModelMove
                )
            )
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert responses, "C-MOVE got no response"
    final_status = responses[-1][0]
    assert int(final_status.Status) == SUCCESS
    assert int(final_status.get("NumberOfFailedSuboperations", 0)) == 0
    assert sop_uids(received) == sop_uids(datasets)


def test_compressed_series_are_accepted_over_stow_rs(
    dicomweb: DICOMwebClient, synth_archive: SynthArchive
) -> None:
    """Every compressed series of the archive is stored by STOW-RS and comes back unchanged.

    WADO-RS, asked for the stored transfer syntax, must return each instance in the syntax it
    was sent in, with the same encapsulated pixel bytes. This is checked through WADO-RS
    rather than Orthanc's metadata because of HTJ2K: Orthanc 1.10 stores it without knowing
    the syntax (no TransferSyntax metadata; C-STORE, C-MOVE and C-GET of it fail).

    All series are tried before the one assert, so a failure names every codec that failed.
    """
    compressed = [
        s for s in synth_archive.series if s.part10 and UID(s.transfer_syntax).is_compressed
    ]
    assert compressed, "the synthetic archive has no compressed series"

    expected: dict[str, str] = {}
    outcome: dict[str, str] = {}
    for series in compressed:
        label = f"{series.kind} ({UID(series.transfer_syntax).name})"
        expected[label] = f"{len(series.files)} stored and returned intact"
        datasets = read_series(series)
        study_uid, series_uid = give_fresh_uids(datasets)
        try:
            stow(dicomweb, datasets)
            # transfer-syntax=* asks for the stored syntax; without it, dicomweb-client's
            # series-level default Accept means Explicit VR LE and Orthanc transcodes (HTTP 500
            # for HTJ2K, which Orthanc 1.10's DCMTK does not know)
            returned = dicomweb.retrieve_series(
                study_uid, series_uid, media_types=(("application/dicom", "*"),)
            )
        except (requests.HTTPError, AssertionError) as exc:
            outcome[label] = f"failed: {exc}"
            continue
        sent = {ds.SOPInstanceUID: (series.transfer_syntax, ds.PixelData) for ds in datasets}
        back = {
            ds.SOPInstanceUID: (ds.file_meta.TransferSyntaxUID, ds.PixelData) for ds in returned
        }
        intact = sum(back.get(uid) == value for uid, value in sent.items())
        outcome[label] = (
            f"{intact} stored and returned intact"
            if back.keys() == sent.keys()
            else f"{len(back)} returned for {len(sent)} sent"
        )
    assert outcome == expected
