"""The de-identified export, byte for byte, against a golden run of the engine.

``export_golden.json`` holds a SHA-256 of every exported file (the encoded header followed by
the pixel tail copied from the source, or the whole re-encoded object) made by the export path
of ``deid_batch`` -- ``stage.read_object`` -> ``Deidentifier.deidentify(in_place=True)`` ->
``encode_part10`` -- under three option sets, for every file of ``../shared/data/dicom`` and of
two seeded synthetic archives. It was made by the code before the engine and the encoder
stopped going through pydicom's value conversion (issue #19 §3), so any speed-up that changes
one output byte fails here. Regenerate only for a deliberate change of what is de-identified::

    PYTHONPATH=$PWD .venv/bin/python tests/unit/deid/test_export_golden.py --write
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from pipeline.deid.core import Deidentifier
from pipeline.deid.encode import encode_part10
from pipeline.deid.keys import Pseudonymizer
from pipeline.deid.stage import read_object

GOLDEN = Path(__file__).with_name("export_golden.json")
SHARED_DICOM = Path(__file__).resolve().parents[4] / "shared" / "data" / "dicom"
KEY = b"golden-export-key-32-bytes-long!"
OPTION_SETS: dict[str, tuple[str, ...]] = {
    "basic": (),
    "default": ("retain_long_modified_dates", "retain_patient_characteristics"),
    "retain": (
        "retain_safe_private",
        "retain_uids",
        "retain_device_identity",
        "retain_institution_identity",
        "retain_long_full_dates",
        "clean_descriptors",
        "clean_structured_content",
    ),
}


def _export(data: bytes, deid: Deidentifier) -> str:
    """SHA-256 (24 hex digits) of the exported file, or the error's class name."""
    fp = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds, fp, tail = read_object(fp, True)
            out = deid.deidentify(ds, in_place=True).dataset
            body = encode_part10(out)
            if tail is not None:
                fp.seek(tail[0])
                body += fp.read(tail[1])
    except Exception as exc:
        return f"error:{type(exc).__name__}"
    return hashlib.sha256(body).hexdigest()[:24]


def _synthetic(root: Path) -> Iterator[tuple[str, Path]]:
    from pipeline.synth import synthesize

    small, full = root / "small", root / "full"
    synthesize(small, patients=1, seed=5, small=True, include_bad=True)
    synthesize(full, patients=1, seed=7, ct_slices=4, rows=64, columns=64, include_bad=True)
    for name, folder in (("synth-small", small), ("synth-full", full)):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix != ".json":
                yield f"{name}/{path.relative_to(folder)}", path


def _files(shared: Path, scratch: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(p for p in shared.rglob("*") if p.is_file()):
        if path.suffix.lower() not in (".csv", ".md", ".txt", ".json"):
            yield f"shared/{path.relative_to(shared)}", path
    yield from _synthetic(scratch)


def outputs(shared: Path) -> dict[str, dict[str, str]]:
    """{option set: {file: hash}} of the export of every file."""
    engines = {k: Deidentifier(Pseudonymizer(KEY), v) for k, v in OPTION_SETS.items()}
    result: dict[str, dict[str, str]] = {k: {} for k in OPTION_SETS}
    with tempfile.TemporaryDirectory() as scratch:
        for name, path in _files(shared, Path(scratch)):
            data = path.read_bytes()
            for key, deid in engines.items():
                result[key][name] = _export(data, deid)
    return result


def test_export_bytes_equal_the_golden_run(shared_data: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    got = outputs(shared_data / "dicom")
    for key in OPTION_SETS:
        assert got[key].keys() == golden[key].keys(), f"{key}: other files than the golden run"
        differ = sorted(n for n in golden[key] if got[key][n] != golden[key][n])
        assert not differ, f"{key}: {len(differ)} exports differ, e.g. {differ[:5]}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    GOLDEN.write_text(json.dumps(outputs(SHARED_DICOM), indent=0, sort_keys=True) + "\n")
