"""The DIMSE source against a real Orthanc: C-FIND listing, C-GET and C-MOVE retrieval, cache,
crawl window, association cap, unreachable PACS, HTJ2K reported per instance, DICOM TLS.

The module stores a small synthetic archive (one patient: a CT study of 3 series and an MR study
of 2) with fresh UIDs in the session's Orthanc, the HTJ2K series re-encoded to Explicit VR
Little Endian first (Orthanc 1.10 cannot send HTJ2K over DIMSE). Every other series keeps its
transfer syntax (JPEG-LS, JPEG 2000, implicit VR, ...), and C-GET must bring each instance back
in it, as stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import pickle
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pipeline.config.models import DimseConfig, DimseTlsConfig, SourceConfig
from pipeline.connectors.base import RawObject, Unit
from pipeline.connectors.dimse import DimseSource, get_contexts, in_window
from pipeline.enums import QuarantineReason, SourceKind
from pipeline.errors import ConfigError, InputError, SourceError
from pipeline.synth import synthesize

if TYPE_CHECKING:
    from conftest import OrthancServer
    from distributed import Client

pytestmark = pytest.mark.integration

SEED = 20261204  # no other test uses this seed
HTJ2K = "1.2.840.10008.1.2.4.201"
DIMSE_LOGGER = "pipeline.connectors.dimse"
#: pynetdicom 3.0.4 leaks the socket of a failed connection (its ``_shutdown_socket`` skips
#: ``close()`` when ``shutdown()`` raises; fixed upstream by pydicom/pynetdicom#999), so the
#: tests that connect to nothing on purpose ignore that one ResourceWarning.
LEAKED_SOCKET = "ignore:unclosed <socket.socket:ResourceWarning"


# --------------------------------------------------------------------------------------------
# data in the PACS
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Series:
    """One series of the synthetic archive, from its ground_truth.json."""

    study_uid: str
    transfer_syntax: str
    files: tuple[Path, ...]


@dataclasses.dataclass(frozen=True)
class StoredStudy:
    """One study stored in Orthanc by this module: SOP UID -> (series UID, transfer syntax)."""

    study_uid: str
    instances: dict[str, tuple[str, str]]

    @property
    def watermark(self) -> str:
        return f"{len({se for se, _ in self.instances.values()})}:{len(self.instances)}"


def _stow(orthanc: OrthancServer, datasets: list[Dataset]) -> None:
    with requests.Session() as session:
        session.trust_env = False
        client = orthanc.dicomweb_client(session)
        response = client.store_instances(datasets)
    assert len(response.get("FailedSOPSequence", [])) == 0
    assert len(response.ReferencedSOPSequence) == len(datasets)


def _fresh_copy(archive: list[Series], *, htj2k: str) -> dict[str, list[Dataset]]:
    """The archive's series with fresh UIDs, grouped by new study UID.

    ``htj2k``: ``"decompress"`` (re-encode to Explicit VR LE), ``"skip"`` or ``"only"``.
    """
    studies: dict[str, str] = {}
    out: dict[str, list[Dataset]] = {}
    for series in archive:
        is_htj2k = series.transfer_syntax == HTJ2K
        if (htj2k == "skip" and is_htj2k) or (htj2k == "only" and not is_htj2k):
            continue
        study_uid = studies.setdefault(series.study_uid, generate_uid())
        series_uid = generate_uid()
        for path in series.files:
            ds = dcmread(path)
            if is_htj2k and htj2k == "decompress":
                ds.decompress()  # Explicit VR Little Endian
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out.setdefault(study_uid, []).append(ds)
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> list[Series]:
    """A one-patient synthetic archive of this module's own (8 CT slices of 64×64)."""
    out = tmp_path_factory.mktemp("dimse-synth")
    synthesize(out, patients=1, seed=SEED, ct_slices=8, rows=64, columns=64, include_bad=False)
    truth = json.loads((out / "ground_truth.json").read_text(encoding="utf-8"))
    return [
        Series(e["StudyInstanceUID"], e["TransferSyntaxUID"], tuple(out / f for f in e["files"]))
        for e in truth["series"]
    ]


@pytest.fixture(scope="module")
def stored(orthanc: OrthancServer, archive: list[Series]) -> list[StoredStudy]:
    """The archive in Orthanc with fresh UIDs (HTJ2K re-encoded), one StoredStudy per study."""
    studies = []
    for study_uid, datasets in _fresh_copy(archive, htj2k="decompress").items():
        _stow(orthanc, datasets)
        studies.append(
            StoredStudy(
                study_uid,
                {
                    str(ds.SOPInstanceUID): (
                        str(ds.SeriesInstanceUID),
                        str(ds.file_meta.TransferSyntaxUID),
                    )
                    for ds in datasets
                },
            )
        )
    assert len(studies) == 2
    return studies


def source_for(
    orthanc: OrthancServer,
    cache: Path,
    studies: list[StoredStudy] | None = None,
    *,
    clock: Callable[[], dt.datetime] | None = None,
    port: int | None = None,
    called_aet: str | None = None,
    **dimse: Any,
) -> DimseSource:
    """A DimseSource for the test Orthanc, listing only ``studies`` (by a UID-list filter)."""
    filters = {"StudyInstanceUID": "\\".join(s.study_uid for s in studies)} if studies else {}
    cfg = SourceConfig(
        calling_aet=orthanc.scu_aet,
        timeout_s=10,
        study_filters=filters,
        dimse=DimseConfig(**{"storage_port": orthanc.scu_port, **dimse}),
    )
    uri = f"dimse://{called_aet or orthanc.aet}@127.0.0.1:{port or orthanc.dicom_port}"
    return DimseSource.from_uri(uri, cfg, cache_dir=cache, clock=clock)


def unit_of(study: StoredStudy) -> Unit:
    return Unit(key=f"studies/{study.study_uid}", watermark=study.watermark)


def sop_of(raw: RawObject) -> str:
    return raw.location.rsplit("/", 1)[1]


def assert_retrieved(raws: list[RawObject], study: StoredStudy) -> None:
    """Every stored instance exactly once, as a cached file pydicom reads in full, as stored."""
    assert [r.error for r in raws if r.error is not None] == []
    counts = Counter(sop_of(r) for r in raws)
    assert set(counts) == set(study.instances)
    assert set(counts.values()) == {1}
    for raw in raws:
        sop = sop_of(raw)
        series, syntax = study.instances[sop]
        assert raw.location == f"studies/{study.study_uid}/series/{series}/instances/{sop}"
        assert raw.unit_key == f"studies/{study.study_uid}"
        assert raw.path is not None
        assert raw.size_bytes == raw.path.stat().st_size
        # cache names are hashes, never UIDs
        assert study.study_uid not in str(raw.path)
        assert sop not in str(raw.path)
        ds = dcmread(raw.path)
        assert ds.SOPInstanceUID == sop
        assert ds.file_meta.TransferSyntaxUID == syntax  # sent as stored, not transcoded
        assert ds.pixel_array.shape[-2:] == (ds.Rows, ds.Columns)


@pytest.fixture
def dimse_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=DIMSE_LOGGER)
    return caplog


def association_events(caplog: pytest.LogCaptureFixture) -> list[tuple[float, str]]:
    """(time, "open" | "close") of each association the connector logged."""
    out = []
    for record in caplog.records:
        if not record.name.startswith(DIMSE_LOGGER) or not record.getMessage().startswith(
            "association"
        ):
            continue
        message = record.getMessage()
        out.append((record.created, "open" if "opened" in message else "close"))
    return out


def closed_port() -> int:
    """A loopback port nobody listens on (bound, read, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def at(hh: int, mm: int) -> Callable[[], dt.datetime]:
    return lambda: dt.datetime(2026, 11, 28, hh, mm)


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_uri_config_and_pickling(tmp_path: Path) -> None:
    """URIs parse strictly, the source id names no credentials, and the source pickles."""
    cfg = SourceConfig(study_filters={"ModalitiesInStudy": "CT"})
    source = DimseSource.from_uri("dimse://PACS01@pacs.example.org:104", cfg, cache_dir=tmp_path)
    assert source.kind is SourceKind.DIMSE
    assert source.source_id == "dimse://PACS01@pacs.example.org:104"
    assert (source.called_aet, source.host, source.port) == ("PACS01", "pacs.example.org", 104)
    assert pickle.loads(pickle.dumps(source)) == source
    v6 = DimseSource.from_uri("dimse://PACS@[::1]:11112", cfg, cache_dir=tmp_path)
    assert (v6.host, v6.source_id) == ("::1", "dimse://PACS@[::1]:11112")
    for bad in (
        "dimse://pacs.example.org:104",  # no AE title
        "dimse://PACS@pacs.example.org",  # no port
        "dimse://A_TITLE_LONGER_THAN_16@host:104",
        "dimse://PACS@host:104/studies",
        "dicom://PACS@host:104",
        "dimse://PACS@host:99999",
    ):
        with pytest.raises(ConfigError, match=r"dimse://AET@host:port|port"):
            DimseSource.from_uri(bad, cfg, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a DICOM keyword"):
        DimseSource.from_uri(
            "dimse://PACS@host:104",
            SourceConfig(study_filters={"NoSuchKeyword": "x"}),
            cache_dir=tmp_path,
        )
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        DimseConfig(window="7pm-7am")
    with pytest.raises(ValueError, match="starts where it ends"):
        DimseConfig(window="07:00-07:00")
    with pytest.raises(ConfigError, match="C-MOVE over TLS needs"):
        DimseSource.from_uri(
            "dimse://PACS@host:104",
            SourceConfig(dimse=DimseConfig(tls=DimseTlsConfig())),
            cache_dir=tmp_path,
        )


def test_presentation_contexts_fit_one_association() -> None:
    """One context per syntax while 127 last; a catch-all context per class beyond that."""
    few = get_contexts(["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"])
    assert all(len(syntaxes) == 1 for _, syntaxes in few)
    assert len(few) == 2 * len({s for _, (s,) in few})
    many = get_contexts([f"1.2.3.{i}" for i in range(60)])
    assert len(many) == 120  # 127 // 60 = 2 each: Explicit VR LE, then all the others
    assert many[0] == ("1.2.3.0", ["1.2.840.10008.1.2.1"])
    assert len(many[1][1]) > 40
    assert len(get_contexts([f"1.2.3.{i}" for i in range(127)])) == 127
    with pytest.raises(ValueError, match="1 to 127"):
        get_contexts([f"1.2.3.{i}" for i in range(128)])


@pytest.mark.filterwarnings(LEAKED_SOCKET)
def test_check_echoes_and_fails_fast(orthanc: OrthancServer, tmp_path: Path) -> None:
    """C-ECHO succeeds; a closed port or a wrong called AE title is a SourceError, fast."""
    source_for(orthanc, tmp_path).check()

    started = time.monotonic()
    with pytest.raises(SourceError, match=r"cannot associate with TESTPACS@127\.0\.0\.1") as info:
        source_for(orthanc, tmp_path, port=closed_port()).check()
    assert time.monotonic() - started < 3
    assert "'PACSFLOW'" in str(info.value)  # names our calling AE title

    # Orthanc rejects the association; on a loaded machine DCMTK sometimes aborts it instead
    # (seen in a CI run with a model training beside it): either way a SourceError naming it
    with pytest.raises(SourceError, match=r"rejected|aborted") as info:
        source_for(orthanc, tmp_path, called_aet="NOTTESTPACS").check()
    assert "'NOTTESTPACS'" in str(info.value) or "rejected" in str(info.value)


def test_list_units_finds_the_studies_with_watermarks(
    orthanc: OrthancServer, stored: list[StoredStudy], tmp_path: Path
) -> None:
    """STUDY-level C-FIND, filtered to this module's studies: keys and series:instances."""
    units = source_for(orthanc, tmp_path, stored).list_units()
    assert iter(units) is units  # a generator, not a list
    found = {u.key: u.watermark for u in units}
    assert found == {f"studies/{s.study_uid}": s.watermark for s in stored}
    # no leftover spill files in the cache
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.filterwarnings(LEAKED_SOCKET)
def test_read_unit_by_c_get_then_from_the_cache(
    orthanc: OrthancServer,
    stored: list[StoredStudy],
    tmp_path: Path,
    dimse_log: pytest.LogCaptureFixture,
) -> None:
    """C-GET brings every instance once, as stored; a second read of the study uses the cache.

    The second read goes to a closed port: it can only succeed without the network.
    """
    source = source_for(orthanc, tmp_path, retrieve="get")
    for study in stored:
        assert_retrieved(list(source.read_unit(unit_of(study))), study)
    assert not any("C-MOVE" in r.getMessage() for r in dimse_log.records)

    dimse_log.clear()
    offline = dataclasses.replace(source, port=closed_port(), clock=at(12, 0), window="19:00-07:00")
    for study in stored:
        again = list(offline.read_unit(unit_of(study)))
        assert_retrieved(again, study)
    assert association_events(dimse_log) == []

    # a changed watermark (the study grew) is fetched again
    grown = Unit(unit_of(stored[0]).key, "3:19")
    with pytest.raises(SourceError, match="cannot associate"):
        list(dataclasses.replace(offline, window=None).read_unit(grown))


def test_read_unit_by_c_move(
    orthanc: OrthancServer, stored: list[StoredStudy], tmp_path: Path
) -> None:
    """C-MOVE to our own Storage SCP (AE PACSFLOW on the port Orthanc knows) brings it all."""
    source = source_for(orthanc, tmp_path, retrieve="move")
    for study in stored:
        assert_retrieved(list(source.read_unit(unit_of(study))), study)
    # the SCP is gone after the retrieval: nothing listens on the port (TIME_WAIT aside)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", orthanc.scu_port))


def test_open_fetches_one_instance(
    orthanc: OrthancServer, stored: list[StoredStudy], tmp_path: Path
) -> None:
    """``open`` of an instance not in the cache retrieves just that instance by C-GET."""
    study = stored[1]
    sop, (series, syntax) = sorted(study.instances.items())[0]
    source = source_for(orthanc, tmp_path, retrieve="get")
    location = f"studies/{study.study_uid}/series/{series}/instances/{sop}"
    with source.open(location) as fh:
        ds = dcmread(fh)
    assert (ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID) == (sop, syntax)
    [folder] = tmp_path.iterdir()
    assert len(list(folder.glob("*.dcm"))) == 1


def test_crawl_window(orthanc: OrthancServer, stored: list[StoredStudy], tmp_path: Path) -> None:
    """Outside 19:00-07:00 listing and reading refuse; inside they work."""
    night = "19:00-07:00"
    assert [in_window(night, at(*hm)()) for hm in [(19, 0), (0, 0), (6, 59)]] == [True] * 3
    assert [in_window(night, at(*hm)()) for hm in [(7, 0), (12, 0), (18, 59)]] == [False] * 3
    assert [in_window("08:00-17:30", at(*hm)()) for hm in [(8, 0), (17, 29)]] == [True] * 2
    assert [in_window("08:00-17:30", at(*hm)()) for hm in [(7, 59), (17, 30)]] == [False] * 2
    assert in_window(None, at(12, 0)())

    outside = source_for(orthanc, tmp_path, stored, clock=at(12, 0), window="19:00-07:00")
    message = r"outside the crawl window 19:00-07:00 \(local time\); rerun inside it"
    with pytest.raises(SourceError, match=message):
        next(outside.list_units())
    with pytest.raises(SourceError, match=message):
        next(outside.read_unit(unit_of(stored[0])))

    inside = dataclasses.replace(outside, clock=at(23, 30))
    assert len(list(inside.list_units())) == 2


def test_association_cap_across_threads(
    orthanc: OrthancServer,
    stored: list[StoredStudy],
    tmp_path: Path,
    dimse_log: pytest.LogCaptureFixture,
) -> None:
    """With max_associations=1, two threads reading two studies never overlap associations."""
    source = source_for(orthanc, tmp_path, retrieve="get", max_associations=1)
    results: dict[str, list[RawObject]] = {}
    errors: list[BaseException] = []

    def read(study: StoredStudy) -> None:
        try:
            results[study.study_uid] = list(source.read_unit(unit_of(study)))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(s,)) for s in stored]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for study in stored:
        assert_retrieved(results[study.study_uid], study)
    events = association_events(dimse_log)
    assert len(events) >= 4  # at least a C-FIND and a C-GET per study
    assert [kind for _, kind in events] == ["open", "close"] * (len(events) // 2)


def _read_on_worker(
    source: DimseSource, unit: Unit, ready: str, go: str
) -> list[tuple[float, str]]:
    """Run on a Dask worker: say ready, wait for go, read a unit, return its association events.

    ``ready`` and ``go`` name a ``distributed.Queue`` and ``Event``: the test starts the
    reads together, so they would overlap without the cap.
    """
    from distributed import Event, Queue

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger(DIMSE_LOGGER)
    handler = Keep(logging.DEBUG)
    previous = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        Queue(ready).put(unit.key)
        assert Event(go).wait(30), "the test never said go"
        raws = list(source.read_unit(unit))
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
    assert all(r.error is None for r in raws)
    return [
        (r.created, "open" if "opened" in r.getMessage() else "close")
        for r in records
        if r.getMessage().startswith("association")
    ]


def test_association_cap_across_dask_workers(
    orthanc: OrthancServer,
    stored: list[StoredStudy],
    tmp_path: Path,
    dask_client: Client,
) -> None:
    """On two Dask workers, max_associations=1 holds: a distributed.Semaphore serialises them.

    The source travels to the workers pickled. ``_read_on_worker`` lives in this test module,
    which workers cannot import, and ``submit`` pickles a task's function by reference; so
    each worker first unpickles the function from cloudpickle bytes (by value), then a second
    task on the same worker applies it.
    """
    import cloudpickle
    from dask.utils import apply
    from distributed import Event, Queue

    source = source_for(orthanc, tmp_path, retrieve="get", max_associations=1)
    workers = sorted(dask_client.scheduler_info()["workers"])
    assert len(workers) == 2
    blob = cloudpickle.dumps(_read_on_worker)  # by value: the fixture registers this module
    futures = []
    for study, worker in zip(stored, workers, strict=True):
        fn = dask_client.submit(cloudpickle.loads, blob, workers=[worker], pure=False)
        args = [source, unit_of(study), f"ready-{tmp_path.name}", f"go-{tmp_path.name}"]
        futures.append(dask_client.submit(apply, fn, args, workers=[worker], pure=False))
    ready = Queue(f"ready-{tmp_path.name}", client=dask_client)
    assert {ready.get(timeout=30) for _ in stored} == {unit_of(s).key for s in stored}
    Event(f"go-{tmp_path.name}", client=dask_client).set()
    per_worker = dask_client.gather(futures)
    events = sorted(e for events in per_worker for e in events)
    assert all(len(e) >= 4 for e in per_worker)
    assert [kind for _, kind in events] == ["open", "close"] * (len(events) // 2)


@pytest.mark.parametrize("retrieve", ["get-then-move", "move"])
def test_htj2k_instances_are_reported_unretrievable(
    orthanc: OrthancServer, archive: list[Series], tmp_path: Path, retrieve: str
) -> None:
    """Orthanc 1.10 cannot send HTJ2K over DIMSE: each such instance is a per-object error.

    The study holds the HTJ2K series as stored plus another series of its study.
    ``get-then-move``: C-GET brings the other series and fails the HTJ2K instances (0xB000),
    and the C-MOVE of those fails too. ``move``: the study-level C-MOVE fails as a whole
    (0xC000), then one C-MOVE per series brings the other series. Either way each HTJ2K
    instance comes back as a raw object with reason ``unretrievable``, ``open`` of one raises
    that error, and the study is not marked complete.
    """
    copies = _fresh_copy(archive, htj2k="only")
    [(study_uid, htj2k)] = copies.items()
    [original] = [s for s in archive if s.transfer_syntax == HTJ2K]
    other = next(s for s in archive if s.study_uid == original.study_uid and s != original)
    others = []
    series_uid = generate_uid()
    for path in other.files:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        others.append(ds)
    _stow(orthanc, htj2k + others)
    unit = Unit(f"studies/{study_uid}", f"2:{len(htj2k) + len(others)}")

    source = source_for(orthanc, tmp_path, retrieve=retrieve)
    raws = list(source.read_unit(unit))

    got = {sop_of(r) for r in raws if r.path is not None}
    assert got == {str(ds.SOPInstanceUID) for ds in others}
    failed = [r for r in raws if r.error is not None]
    assert {sop_of(r) for r in failed} == {str(ds.SOPInstanceUID) for ds in htj2k}
    for raw in failed:
        assert isinstance(raw.error, InputError)
        assert raw.error.reason is QuarantineReason.UNRETRIEVABLE
        assert str(raw.error).startswith("the PACS could not send this instance (C-")
        assert "C-MOVE status 0xC000" in str(raw.error)
        assert raw.path is None
        series = str(htj2k[0].SeriesInstanceUID)
        assert raw.location == f"studies/{study_uid}/series/{series}/instances/{sop_of(raw)}"
    [folder] = tmp_path.iterdir()
    assert not (folder / "study.json").exists()
    with pytest.raises(InputError, match="could not send this instance") as info:
        source.open(failed[0].location)
    assert info.value.reason is QuarantineReason.UNRETRIEVABLE


# --------------------------------------------------------------------------------------------
# DICOM TLS, against a pynetdicom Verification SCP (Orthanc's TLS needs its own instance)
# --------------------------------------------------------------------------------------------


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.contextmanager
def tls_echo_scp(server: tuple[Path, Path], client_ca: Path) -> Iterator[int]:
    """A TLS-only Verification SCP that requires a client certificate; yields its port."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(server[0]), str(server[1]))
    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(Verification)
    scp = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx)
    try:
        yield int(scp.server_address[1])
    finally:
        scp.shutdown()


@pytest.mark.filterwarnings(LEAKED_SOCKET)
def test_tls_echo(tmp_path: Path) -> None:
    """check() over DICOM TLS with a client certificate; an untrusted server is refused."""
    server = _self_signed(tmp_path, "server")
    client = _self_signed(tmp_path, "client")
    stranger = _self_signed(tmp_path, "stranger")

    def source(ca: Path, port: int) -> DimseSource:
        tls = DimseTlsConfig(ca=ca, cert=client[0], key=client[1])
        cfg = SourceConfig(timeout_s=5, dimse=DimseConfig(retrieve="get", tls=tls))
        return DimseSource.from_uri(f"dimse://TLSPACS@127.0.0.1:{port}", cfg, cache_dir=tmp_path)

    with tls_echo_scp(server, client_ca=client[0]) as port:
        source(server[0], port).check()
        with pytest.raises(SourceError, match="cannot associate"):
            source(stranger[0], port).check()
