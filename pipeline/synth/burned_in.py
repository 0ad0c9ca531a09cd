"""Synthetic objects with burned-in text: names, IDs and dates in the pixels, and where.

Each object is an ultrasound-like (dark speckled sector, single or multi-frame, grey or RGB) or
a secondary-capture-like (light or mid-grey page) image with its synthetic patient's name,
MRN, birth date and study date drawn into every frame, in several fonts (Pillow's default
font at a size, the DejaVu faces matplotlib ships), sizes and contrasts, with Burned In
Annotation YES. The ground truth gives each token's box per frame; it is never written into
the objects (the bench and the tests read it from a file of their own, outside any archive).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from pipeline.synth.core import IMPLEMENTATION_CLASS_UID, synth_uid
from pipeline.synth.names import draw_identity, specific_character_set

__all__ = ["TextBox", "burned_in_object", "fonts", "write_burned_in"]

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class TextBox:
    """One identifying token drawn into a frame: kind (name, id, birth_date, study_date),
    the text, and its box (x0, y0, x1, y1) in pixels, end exclusive."""

    frame: int
    kind: str
    text: str
    x0: int
    y0: int
    x1: int
    y1: int


def fonts() -> list[str]:
    """The TrueType fonts available offline: the DejaVu faces of matplotlib's data (a
    dependency) and of Debian's fonts-dejavu-core when installed; "" stands for Pillow's
    default font."""
    found = [""]
    spec = importlib.util.find_spec("matplotlib")
    places = []
    if spec is not None and spec.origin is not None:
        places.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf")
    places.append(Path("/usr/share/fonts/truetype/dejavu"))
    for place in places:
        for name in (
            "DejaVuSans.ttf",
            "DejaVuSans-Bold.ttf",
            "DejaVuSansMono.ttf",
            "DejaVuSerif.ttf",
        ):
            path = place / name
            if path.is_file() and all(Path(f).name != name for f in found if f):
                found.append(str(path))
    return found


def _font(path: str, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size) if not path else ImageFont.truetype(path, size)


def _background(rng: np.random.Generator, kind: str, rows: int, cols: int) -> NDArray[np.uint8]:
    if kind == "US":  # black frame, speckled fan below the top band
        img = np.zeros((rows, cols), np.float32)
        yy, xx = np.mgrid[0:rows, 0:cols]
        apex_x, apex_y = cols / 2, rows * 0.12
        angle = np.arctan2(xx - apex_x, yy - apex_y + 1e-3)
        radius = np.hypot(xx - apex_x, yy - apex_y)
        fan = (np.abs(angle) < 0.6) & (radius > rows * 0.05) & (radius < rows * 0.85)
        speckle = rng.rayleigh(40.0, size=(rows, cols)).astype(np.float32)
        img[fan] = np.clip(speckle[fan] * (1.2 - radius[fan] / rows), 0, 200)
        return img.astype(np.uint8)
    base = float(rng.integers(150, 235))  # a light page with a soft gradient
    grad = np.linspace(0, 20, cols, dtype=np.float32)[None, :]
    img = base - grad + rng.normal(0, 2.0, size=(rows, cols)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _date_text(rng: np.random.Generator, value: str) -> str:
    y, m, d = value[:4], value[4:6], value[6:]
    forms = (f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{y}-{m}-{d}", f"{d}/{m}/{y}")
    return forms[int(rng.integers(len(forms)))]


def burned_in_object(index: int, seed: int = 0) -> tuple[Dataset, list[TextBox]]:
    """Object ``index`` of the burned-in set drawn with ``seed``: the dataset (pixels
    included, Explicit VR Little Endian) and the boxes of its identifying tokens."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index, 2102])
    who = draw_identity(rng, index=index)
    kind = ("US", "US", "SC")[index % 3]
    nframes = 3 if kind == "US" and index % 6 == 0 else 1
    colour = kind == "US" and index % 4 == 1
    rows, cols = (480, 640) if kind == "US" else (600, 800)
    year, month, day = (int(rng.integers(a, b)) for a, b in ((10, 26), (1, 13), (1, 29)))
    study_date = f"20{year:02d}{month:02d}{day:02d}"
    tokens = [
        ("name", f"{who.family.upper()}, {who.given}"),
        ("id", f"MRN {who.patient_id}"),
        ("birth_date", f"DOB {_date_text(rng, who.birth_date)}"),
        ("study_date", _date_text(rng, study_date)),
    ]
    faces = fonts()
    face = faces[int(rng.integers(len(faces)))]
    size = int(rng.choice([11, 13, 16, 20, 26]))
    background = _background(rng, kind, rows, cols)
    # light text on black (US), dark text on a light page (SC)
    level = int(rng.choice([255, 200, 150] if kind == "US" else [0, 40, 90]))
    font = _font(face, size)
    boxes: list[TextBox] = []
    frames = []
    spots = [
        (8, 6),
        (cols // 2 + 10, 6),
        (8, rows - 3 * size - 8),
        (cols // 2 + 10, rows - 3 * size - 8),
    ]
    order = rng.permutation(len(spots))
    for f in range(nframes):
        img = Image.fromarray(background)
        draw = ImageDraw.Draw(img)
        for t, (what, text) in enumerate(tokens):
            x, y = spots[int(order[t % len(spots)])]
            y += (t // len(spots)) * (size + 6)
            for j, part in enumerate(text.split(" ")):
                box = draw.textbbox((x, y), part, font=font)
                draw.text((x, y), part, fill=level, font=font)
                kind_j = "label" if what != "name" and j == 0 and len(text.split(" ")) > 1 else what
                if kind_j != "label":
                    boxes.append(TextBox(f, kind_j, part.strip(","), *(int(v) for v in box)))
                x = int(box[2]) + max(4, size // 3)
        frame = np.asarray(img, dtype=np.uint8)
        if colour:
            frame = np.stack([frame, frame, (frame * 0.9).astype(np.uint8)], axis=-1)
        frames.append(frame)
    pixels = np.stack(frames)
    return _dataset(index, seed, who, kind, study_date, pixels, colour), boxes


def _dataset(
    index: int,
    seed: int,
    who: Any,
    kind: str,
    study_date: str,
    pixels: NDArray[np.uint8],
    colour: bool,
) -> Dataset:
    nframes = pixels.shape[0]
    sop_class = (US_MULTIFRAME if nframes > 1 else US_IMAGE) if kind == "US" else SECONDARY_CAPTURE
    study = synth_uid("burned-in", seed, index, "study")
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = synth_uid("burned-in", seed, index, "sop")
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = synth_uid("burned-in", seed, index, "series")
    ds.Modality = "US" if kind == "US" else "OT"
    ds.ConversionType = "WSD" if kind != "US" else None
    if ds.ConversionType is None:
        del ds.ConversionType
    ds.SpecificCharacterSet = specific_character_set(who.dicom_name)
    ds.PatientName = who.dicom_name
    ds.PatientID = who.patient_id
    ds.PatientBirthDate = who.birth_date
    ds.PatientSex = who.sex
    ds.StudyDate = ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"A{index:07d}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if nframes > 1:
        ds.NumberOfFrames = nframes
        ds.FrameTime = 33.3
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta = meta
    ds["PixelData"].VR = "OB"
    return ds


def write_burned_in(folder: Path, truth: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` burned-in objects under ``folder`` and their ground truth as JSON at
    ``truth`` (a file outside ``folder``: {file name: [box, ...]}); return the files."""
    folder = Path(folder)
    if Path(truth).resolve().is_relative_to(folder.resolve()):
        raise ValueError("the ground truth must not be written inside the archive folder")
    folder.mkdir(parents=True, exist_ok=True)
    paths, table = [], {}
    for i in range(count):
        ds, boxes = burned_in_object(i, seed)
        path = folder / f"burned_in_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        table[path.name] = [asdict(b) for b in boxes]
    Path(truth).write_text(json.dumps(table, indent=1))
    return paths
