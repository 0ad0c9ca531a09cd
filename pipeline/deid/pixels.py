"""Burned-in text: find it in the pixels, black it out, and quarantine what stays unsure.

Ultrasound, secondary captures and some radiographs carry names, IDs and dates in their
pixels. :func:`clean_pixels` reads every frame of such an object with an OCR engine that runs
offline (Tesseract, Debian ``tesseract-ocr``: its word boxes and confidences, through its
command line, so no Python binding is needed), blacks out the words the configuration says
must go (``deid.clean_pixels``: every word outside the modality's keep regions, or only the
words that match the object's own identifiers and dates), and re-encodes the pixel data
uncompressed (Explicit or Implicit VR Little Endian; colour as RGB, a palette expanded), with
Burned In Annotation NO. The caller records the Clean Pixel Data Option (DCM 113101).

The engine finds text on plain margins but often nothing where the same text is drawn over
speckle or anatomy. With ``detect_levels`` (the default) each frame is also searched for text
drawn at a grey level of its own (:mod:`pipeline.deid.text_regions`: a spike of the histogram
whose pixels form thin strokes in rows, as a device's annotations are drawn); those regions
are blacked out where all text goes, and read by the engine where what they say decides.

Fail closed: whatever this cannot decide raises :class:`BurnedInText` (an
:class:`~pipeline.errors.InputError` with reason ``burned_in_phi``), so the object stays
quarantined as it was without cleaning:

- the engine missing, failing or timing out, pixels that cannot be decoded, no pixel data;
- a word read with a confidence between ``noise_confidence`` and ``min_confidence`` where
  keeping it depends on what it says (inside a keep region; or, with ``own_identifiers``,
  a word that does not match);
- text still read on the cleaned pixels where none may be (``recheck``);
- a text region found by its level that decides what is kept (inside a keep region, or with
  ``own_identifiers``) on which the engine reads no word, or an unsure one;
- text boxes covering more than ``max_blackout`` of a frame (text cannot be told from the
  image).

Messages never quote what was read (it may be a name): only counts, frames and boxes.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.multival import MultiValue

from pipeline.config import CleanPixelsConfig
from pipeline.deid.text_regions import find_text_regions
from pipeline.dicom.redact import apply_boxes
from pipeline.enums import QuarantineReason
from pipeline.errors import InputError

__all__ = [
    "BurnedInText",
    "CleanResult",
    "Word",
    "apply_boxes",
    "clean_pixels",
    "engine_available",
    "identifier_tokens",
    "read_words",
]

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_PALETTE_TAGS = (
    0x00281101, 0x00281102, 0x00281103,  # descriptors
    0x00281199,  # Palette Color LUT UID
    0x00281201, 0x00281202, 0x00281203,  # data
    0x00281221, 0x00281222, 0x00281223,  # segmented data
)  # fmt: skip


class BurnedInText(InputError):
    """Burned-in text could not be removed for sure: the object stays quarantined."""

    reason = QuarantineReason.BURNED_IN_PHI


@dataclass(frozen=True)
class Word:
    """One word the engine read: its box in image pixels, confidence (0-100) and text."""

    left: int
    top: int
    width: int
    height: int
    confidence: float
    text: str
    #: the box of the engine's line this word is on (x0, y0, x1, y1): glyphs of the line
    #: it could not read as words lie in it
    line: tuple[int, int, int, int] | None = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end exclusive."""
        return self.left, self.top, self.left + self.width, self.top + self.height


@dataclass(frozen=True)
class CleanResult:
    """What :func:`clean_pixels` did to one object.

    ``boxes`` are ``(frame, x0, y0, x1, y1)`` in pixels, end exclusive (the regions set to
    black); ``words`` how many words were read in all; ``syntax`` the transfer syntax the
    pixel data are now encoded in.
    """

    boxes: tuple[tuple[int, int, int, int, int], ...]
    words: int
    syntax: str


def engine_available(cfg: CleanPixelsConfig) -> str | None:
    """The engine's executable path, or None when it is not installed."""
    return shutil.which(cfg.engine_path)


def read_words(image: NDArray[np.uint8], cfg: CleanPixelsConfig) -> list[Word]:
    """Read the words of a grey-level ``image`` (rows, cols) with the configured engine.

    Raises
    ------
    BurnedInText
        The engine is missing, fails or runs past ``timeout_s``.
    """
    exe = engine_available(cfg)
    if exe is None:
        raise BurnedInText(
            f"may carry burned-in text and the OCR engine {cfg.engine!r} is not installed "
            f"({cfg.engine_path!r} not found); quarantined until it is"
        )
    from PIL import Image

    scale = cfg.upscale
    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize(
            (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one core per object: workers are parallel
    try:
        done = subprocess.run(
            [exe, "stdin", "stdout", "-l", cfg.language, "--psm", "11", "tsv"],
            input=buf.getvalue(),
            capture_output=True,
            timeout=cfg.timeout_s,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BurnedInText(
            f"may carry burned-in text and the OCR engine ran past {cfg.timeout_s:g} s on a "
            "frame; quarantined"
        ) from None
    except OSError as exc:
        raise BurnedInText(
            f"may carry burned-in text and the OCR engine cannot run ({type(exc).__name__}); "
            "quarantined"
        ) from None
    if done.returncode != 0:
        raise BurnedInText(
            f"may carry burned-in text and the OCR engine failed (exit {done.returncode}); "
            "quarantined"
        )
    words = []
    lines: dict[tuple[str, ...], tuple[int, int, int, int]] = {}
    rows = csv.reader(io.StringIO(done.stdout.decode("utf-8", "replace")), delimiter="\t")
    for row in rows:
        if len(row) < 12 or row[0] not in ("4", "5"):  # level 4: a line, 5: a word
            continue
        left, top, width, height = (int(v) for v in row[6:10])
        box = (
            left // scale,
            top // scale,
            -(-(left + width) // scale),
            -(-(top + height) // scale),
        )
        if row[0] == "4":
            lines[tuple(row[1:5])] = box
            continue
        text = row[11].strip()
        if not text:
            continue
        words.append(
            Word(
                box[0],
                box[1],
                box[2] - box[0],
                box[3] - box[1],
                float(row[10]),
                text,
                lines.get(tuple(row[1:5])),
            )
        )
    return words


# ------------------------------------------------------------------ identifiers


def _norm(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


def _date_forms(value: str) -> set[str]:
    """The normalized ways a DA value (YYYYMMDD) is written on screens."""
    value = value.strip()[:8]
    if len(value) != 8 or not value.isdigit():
        return set()
    y, m, d = value[:4], value[4:6], value[6:]
    months = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    mon = months[int(m) - 1] if 1 <= int(m) <= 12 else ""
    return {
        y + m + d,
        m + d + y,
        d + m + y,
        d + m + y[2:],
        m + d + y[2:],
        y[2:] + m + d,
        d + mon + y,
        d + mon + y[2:],
    }


#: header attributes whose values are identifying when burned in (names, IDs, dates)
_ID_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "StationName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "StudyID",
)
_DATE_KEYWORDS = (
    "PatientBirthDate",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
)


def identifier_tokens(ds: Any) -> set[str]:
    """The normalized tokens of ``ds``'s own identifiers, names and dates (at least 2
    characters): what ``match: own_identifiers`` blacks out."""
    tokens: set[str] = set()
    for key in _ID_KEYWORDS:
        value = ds.get(key)
        if value in (None, ""):
            continue
        for v in value if isinstance(value, MultiValue | list | tuple) else [value]:
            text = str(v)
            for part in re.split(r"[\s^,=\\/]+", text):
                if len(_norm(part)) >= 2:
                    tokens.add(_norm(part))
            if len(_norm(text)) >= 2:
                tokens.add(_norm(text))
    for key in _DATE_KEYWORDS:
        tokens |= _date_forms(str(ds.get(key) or ""))
    return tokens


def _near(a: str, b: str) -> bool:
    """Equal, or one edit apart for tokens of 5 characters or more (an OCR misread)."""
    if a == b:
        return True
    if min(len(a), len(b)) < 5 or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    short, long = (a, b) if len(a) < len(b) else (b, a)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _matches(text: str, tokens: set[str]) -> bool:
    word = _norm(text)
    if len(word) < 2:
        return False
    for token in tokens:
        if _near(word, token):
            return True
        if len(word) >= 4 and len(token) >= 4 and (word in token or token in word):
            return True
    return False


# ------------------------------------------------------------------ pixels


def _frames(ds: Any) -> tuple[NDArray[Any], str]:
    """The object's frames as (frames, rows, cols[, 3]) and the photometric interpretation
    they are in now (colour as RGB, palettes expanded)."""
    from pydicom.pixels import apply_color_lut

    arr = ds.pixel_array  # YBR is converted to RGB by pydicom's default
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:
            arr = (arr >> 8).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8)
        samples, photometric = 3, "RGB"
    elif samples == 3:
        photometric = "RGB"
    if nframes == 1:
        arr = arr[None, ...]
    expected = 4 if samples == 3 else 3
    if arr.ndim != expected:
        raise BurnedInText(
            f"may carry burned-in text and its pixel data have an unexpected shape "
            f"{tuple(arr.shape)}; quarantined"
        )
    return np.ascontiguousarray(arr), photometric


def _grey(frame: NDArray[Any]) -> NDArray[np.uint8]:
    """An 8-bit grey view of one frame for the engine (contrast stretched)."""
    f = frame.astype(np.float32)
    if f.ndim == 3:
        f = f @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(f.shape, dtype=np.uint8)
    return np.clip((f - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def _inside(box: tuple[int, int, int, int], regions: Sequence[Sequence[float]], shape: Any) -> bool:
    rows, cols = shape[0], shape[1]
    x0, y0, x1, y1 = box
    return any(
        x0 >= r[0] * cols and x1 <= r[2] * cols and y0 >= r[1] * rows and y1 <= r[3] * rows
        for r in regions
    )


def _is_text(word: Word) -> bool:
    """At least two letters or digits: a single glyph or a line is not a token."""
    return len(_norm(word.text)) >= 2


def _pad(word: Word, frame: int, shape: Any) -> tuple[int, int, int, int, int]:
    """The word's box with a margin, widened to its line where the line is no taller than
    the word twice (a line of text, not a block of texture)."""
    margin = max(2, word.height // 4)
    x0, y0, x1, y1 = word.box
    if word.line is not None and word.line[3] - word.line[1] <= 2 * word.height:
        x0, y0 = min(x0, word.line[0]), min(y0, word.line[1])
        x1, y1 = max(x1, word.line[2]), max(y1, word.line[3])
    return (
        frame,
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(shape[1], x1 + margin),
        min(shape[0], y1 + margin),
    )


def _decide(
    words: list[Word],
    frame: int,
    shape: Any,
    cfg: CleanPixelsConfig,
    regions: Sequence[Sequence[float]],
    tokens: set[str] | None,
) -> list[tuple[int, int, int, int, int]]:
    """The boxes to black out among ``words`` of one frame; raises where unsure."""
    boxes = []
    for w in words:
        if w.confidence < cfg.noise_confidence or not _is_text(w):
            continue
        sure = w.confidence >= cfg.min_confidence
        inside = _inside(w.box, regions, shape)
        if tokens is None:  # all text outside the keep regions
            if not inside:
                boxes.append(_pad(w, frame, shape))
            elif not sure:
                raise BurnedInText(
                    f"may carry burned-in text: a word read with confidence "
                    f"{w.confidence:.0f} (unsure) inside a keep region of frame {frame}; "
                    "quarantined"
                )
            continue
        if _matches(w.text, tokens):
            boxes.append(_pad(w, frame, shape))
        elif not sure and not inside:
            raise BurnedInText(
                f"may carry burned-in text: a word read with confidence {w.confidence:.0f} "
                f"(unsure) in frame {frame} cannot be told from an identifier; quarantined"
            )
    return boxes


def _level_regions(frame: NDArray[Any], cfg: CleanPixelsConfig) -> list[tuple[int, int, int, int]]:
    """The regions of text drawn at a level of its own in ``frame`` (none when off)."""
    if not cfg.detect_levels:
        return []
    return find_text_regions(frame, max_height=cfg.max_text_height)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _decide_regions(
    drawn: list[tuple[int, int, int, int]],
    words: list[Word],
    frame: int,
    shape: Any,
    cfg: CleanPixelsConfig,
    regions: Sequence[Sequence[float]],
    tokens: set[str] | None,
) -> list[tuple[int, int, int, int, int]]:
    """The level-detected text regions of one frame to black out; raises where what a
    region says decides and the engine read nothing for sure on it.

    With ``match: all`` a region outside the keep regions goes whatever it says. Where it
    would be kept (inside a keep region; or, with ``own_identifiers``, unless it matches),
    the engine's words on it decide: one matching word blacks it out, words all read for
    sure and none matching keep it, and anything else (nothing read, or unsure words)
    keeps the object quarantined: the engine cannot tell what that text says.
    """
    out = []
    for box in drawn:
        inside = _inside(box, regions, shape)
        if tokens is None and not inside:
            out.append((frame, *box))
            continue
        on = [
            w
            for w in words
            if w.confidence >= cfg.noise_confidence and _is_text(w) and _overlaps(w.box, box)
        ]
        if tokens is not None and any(_matches(w.text, tokens) for w in on):
            out.append((frame, *box))
        elif not on or any(w.confidence < cfg.min_confidence for w in on):
            raise BurnedInText(
                f"may carry burned-in text: a text-like region {list(box)} of frame {frame} "
                "the OCR engine cannot read for sure decides what is kept; quarantined"
            )
    return out


def _check_blackout(
    boxes: list[tuple[int, int, int, int, int]], frame: int, shape: Any, cfg: CleanPixelsConfig
) -> None:
    """Raise when the boxes of ``frame`` cover more of it than ``max_blackout``."""
    mask = np.zeros((int(shape[0]), int(shape[1])), bool)
    for f, x0, y0, x1, y1 in boxes:
        if f == frame:
            mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    covered = float(mask.mean())
    if covered > cfg.max_blackout:
        raise BurnedInText(
            f"may carry burned-in text: text-like regions cover {100 * covered:.0f} % of "
            f"frame {frame} (more than clean_pixels.max_blackout {100 * cfg.max_blackout:.0f} "
            "%): text cannot be told from the image; quarantined"
        )


def _regions_for(ds: Any, cfg: CleanPixelsConfig) -> Sequence[Sequence[float]]:
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", ""))
    return cfg.keep_regions.get(sop) or cfg.keep_regions.get(modality) or ()


def clean_pixels(ds: Any, cfg: CleanPixelsConfig) -> CleanResult:
    """Black out the burned-in text of ``ds`` (a whole dataset, pixels included) in place.

    The pixel data are replaced by the cleaned frames, uncompressed; Burned In Annotation
    becomes NO. ``ds.file_meta`` names the new transfer syntax.

    Raises
    ------
    BurnedInText
        Anything that keeps the text from being removed for sure (see the module).
    """
    if "PixelData" not in ds:
        raise BurnedInText(
            "may carry burned-in PHI and holds no pixel data to clean (a document or "
            "non-image object); quarantined until a rule clears it"
        )
    meta = getattr(ds, "file_meta", None)
    if str((meta or {}).get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.2":
        raise BurnedInText(
            "may carry burned-in text and is Explicit VR Big Endian (retired), which is not "
            "cleaned; quarantined"
        )
    if engine_available(cfg) is None:  # before decoding anything
        read_words(np.zeros((1, 1), np.uint8), cfg)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if nframes > cfg.max_frames:
        raise BurnedInText(
            f"may carry burned-in text in {nframes} frames, more than clean_pixels.max_frames "
            f"({cfg.max_frames}); quarantined"
        )
    try:
        frames, photometric = _frames(ds)
    except BurnedInText:
        raise
    except Exception as exc:
        raise BurnedInText(
            f"may carry burned-in text and its pixels cannot be decoded to clean "
            f"({type(exc).__name__}); quarantined"
        ) from None
    regions = _regions_for(ds, cfg)
    tokens = identifier_tokens(ds) if cfg.match == "own_identifiers" else None
    fill: int | float = 0  # black: 0 for colour and unsigned MONOCHROME2
    if photometric == "MONOCHROME1":  # black is the highest value there
        bits = int(ds.get("BitsStored", 8 * frames.dtype.itemsize) or 8)
        fill = (1 << bits) - 1 if frames.dtype.kind == "u" else int(frames.max())
    elif frames.dtype.kind == "i":
        fill = int(frames.min())
    boxes: list[tuple[int, int, int, int, int]] = []
    count = 0
    shape = frames.shape[1:3]
    passes = _PASSES if cfg.recheck else 1
    for index in range(frames.shape[0]):
        # text drawn at a level of its own, found before anything is blacked out
        drawn = _level_regions(frames[index], cfg)
        for attempt in range(passes):
            # each pass reads the frame as the last one left it: text the engine could not
            # separate from its neighbours is found once they are black; a pass that finds
            # nothing to remove ends (and is the recheck)
            words = read_words(_grey(frames[index]), cfg)
            count += len(words)
            if attempt:  # after the first pass only text for sure: texture reads anew
                words = [w for w in words if w.confidence >= cfg.min_confidence]
            found = _decide(words, index, shape, cfg, regions, tokens)
            if not attempt and drawn:
                found += _decide_regions(drawn, words, index, shape, cfg, regions, tokens)
            if not found:
                break
            apply_boxes(frames, found, fill)
            boxes.extend(found)
            _check_blackout(boxes, index, shape, cfg)
            if cfg.recheck and attempt == passes - 1:
                raise BurnedInText(
                    f"may carry burned-in text: words still read in frame {index} after "
                    f"{passes} cleaning passes; quarantined"
                )
    syntax = _write(ds, frames, photometric)
    return CleanResult(tuple(boxes), count, syntax)


def _write(ds: Any, frames: NDArray[Any], photometric: str) -> str:
    """Replace the pixel data of ``ds`` by ``frames``, uncompressed; return the syntax."""
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    old = str(meta.get("TransferSyntaxUID", "") or "")
    syntax = _IMPLICIT_LE if old == _IMPLICIT_LE else _EXPLICIT_LE
    for tag in _PALETTE_TAGS:
        if tag in ds:
            del ds[tag]
    samples = 3 if frames.ndim == 4 else 1
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    if frames.dtype == np.uint8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelRepresentation = 0
    else:
        bits = frames.dtype.itemsize * 8
        if int(ds.get("BitsAllocated", bits) or bits) != bits:
            ds.BitsAllocated = bits
    if old in _LOSSY:  # decoded from a lossy syntax: its history stays
        ds.LossyImageCompression = "01"
    data = frames.astype(frames.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\0"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if frames.dtype.itemsize == 1 else "OW"
    ds["PixelData"].is_undefined_length = False
    ds.BurnedInAnnotation = "NO"
    meta.TransferSyntaxUID = syntax
    return syntax


#: reading passes per frame with recheck: the last must find nothing left to remove
_PASSES = 3

#: transfer syntaxes whose decoded pixels differ from the originals
_LOSSY = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.4.100",
        "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
    }
)
