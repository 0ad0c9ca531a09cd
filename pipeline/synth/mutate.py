"""Seeded hostile variations of DICOM files, for fuzzing the stages (``bench/fuzz.py``).

Each mutant is one file changed by one of :data:`MUTATIONS`, chosen and placed by a
``random.Random`` seeded by the caller (the same seed, files and count give the same mutants):

- ``flip``: a few bytes of the header (before the Pixel Data element) changed at random;
- ``truncate``: the file cut at a random offset;
- ``length``: one element's length field set to its largest value (``0xFFFFFFFF``, undefined,
  for a 4-byte field; ``0xFFFF`` for a 2-byte one) or to a huge defined length;
- ``vr``: one element's VR swapped for another VR or for two letters that are none;
- ``nesting``: a sequence nested 20-400 items deep put before the pixel data;
- ``duplicate``: one element written twice;
- ``dims``: Rows, Columns (``0xFFFF``) or Number of Frames (a huge or non-numeric value)
  declaring pixel data far bigger than the file;
- ``number``: an integer or decimal string value made non-numeric.

Pure bytes in, bytes out: no pydicom, no I/O (the caller reads and writes the files).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pipeline.dicom.elements import KNOWN_VRS, UNDEFINED, MalformedElement, read_header

__all__ = ["MUTATIONS", "mutants", "mutate"]

MUTATIONS: Final = ("flip", "truncate", "length", "vr", "nesting", "duplicate", "dims", "number")
_VRS: Final = sorted(KNOWN_VRS)
_PIXEL_DATA: Final = 0x7FE00010
_NUMERIC_TEXT: Final = frozenset({0x00200013, 0x00280008, 0x00200012, 0x00180050, 0x00281053})


@dataclass(frozen=True)
class _Element:
    pos: int  # offset of its tag
    tag: int
    vr: bytes | None
    length: int
    at: int  # offset of its value


def _elements(data: bytes) -> tuple[list[_Element], bool]:
    """The top-level elements after the file meta (up to and with Pixel Data), and whether
    they are implicit VR; as far as they parse."""
    pos, implicit = 0, False
    if data[128:132] == b"DICM":
        pos = 132
        syntax = b""
        while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
            try:
                tag, _vr, length, at = read_header(data, pos, False)
            except MalformedElement:
                break
            if tag == 0x00020010:
                syntax = data[at : at + length].rstrip(b"\x00 ")
            pos = at + length
        implicit = syntax == b"1.2.840.10008.1.2"
    else:
        implicit = not data[4:6].isalpha()
    out: list[_Element] = []
    while pos + 8 <= len(data) and len(out) < 2000:
        try:
            tag, vr, length, at = read_header(data, pos, implicit)
        except MalformedElement:
            break
        out.append(_Element(pos, tag, vr, length, at))
        if tag == _PIXEL_DATA or length == UNDEFINED:
            break  # pixels, or a sequence: what follows is left alone
        pos = at + length
    return out, implicit


def _nested(depth: int, implicit: bool) -> bytes:
    """A Content Sequence nested ``depth`` items deep, every length undefined."""
    head = b"\x40\x00\x30\xa7" + (b"" if implicit else b"SQ\x00\x00") + b"\xff\xff\xff\xff"
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (head + item) * depth + (item_end + seq_end) * depth


def _length_field(el: _Element, implicit: bool) -> tuple[int, int]:
    """(offset, size) of an element's length field."""
    if implicit or el.vr is None:
        return el.pos + 4, 4
    if el.at - el.pos == 12:  # a VR with two reserved bytes and a 4-byte length
        return el.pos + 8, 4
    return el.pos + 6, 2


def mutate(data: bytes, rng: random.Random, kind: str) -> bytes:
    """One mutant of ``data`` by the mutation ``kind`` (one of :data:`MUTATIONS`)."""
    if kind == "truncate" or len(data) < 16:
        return data[: rng.randrange(0, max(len(data), 1))]
    elements, implicit = _elements(data)
    pixel = next((e.pos for e in elements if e.tag == _PIXEL_DATA), len(data))
    out = bytearray(data)
    body = [e for e in elements if e.tag != _PIXEL_DATA]
    if kind == "length" and elements:
        el = rng.choice(elements)
        at, size = _length_field(el, implicit)
        value = rng.choice([0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, len(data) * 4 + 2])
        out[at : at + size] = (value if size == 4 else 0xFFFF).to_bytes(size, "little")
        return bytes(out)
    if kind == "vr" and body and not implicit:
        el = rng.choice(body)
        vr = rng.choice([*_VRS, "ZZ", "ob", "\x00\x00"]).encode("latin-1")
        out[el.pos + 4 : el.pos + 6] = vr
        return bytes(out)
    if kind == "nesting" and elements:
        where = elements[-1].pos if elements[-1].tag == _PIXEL_DATA else elements[0].pos
        return bytes(out[:where] + _nested(rng.randrange(20, 400), implicit) + out[where:])
    if kind == "duplicate" and body:
        el = rng.choice(body)
        end = min(el.at + el.length, len(data))
        return bytes(out[:end] + out[el.pos : end] + out[end:])
    if kind == "dims":
        dims = [e for e in body if e.tag in (0x00280010, 0x00280011) and e.length == 2]
        frames = [e for e in body if e.tag == 0x00280008]
        if dims and (not frames or rng.random() < 0.6):
            for el in dims:
                out[el.at : el.at + 2] = struct.pack("<H", 0xFFFF)
            return bytes(out)
        if frames:
            el = frames[0]
            text = rng.choice([b"99999999", b"1A", b"-5", b"0"])
            out[el.at : el.at + el.length] = text[: el.length].ljust(el.length, b" ")
            return bytes(out)
    if kind == "number":
        texts = [e for e in body if e.tag in _NUMERIC_TEXT and 0 < e.length < 64]
        if texts:
            el = rng.choice(texts)
            out[el.at : el.at + el.length] = rng.choice([b"A", b"1e999", b"\\", b"nan"]).ljust(
                el.length, b" "
            )[: el.length]
            return bytes(out)
    # flip, and what a mutation finds nothing for: a few bytes of the header
    end = max(min(pixel + 8, len(data)), 1)
    for _ in range(rng.randrange(1, 6)):
        out[rng.randrange(0, end)] = rng.randrange(256)
    return bytes(out)


def mutants(files: Sequence[Path], n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``n`` mutants ``(mutation, bytes)`` of ``files``, round robin over the mutations and
    the files in a seeded order; each file is read once per mutant made from it."""
    rng = random.Random(seed)
    order = list(files)
    if not order:
        return
    rng.shuffle(order)
    for i in range(n):
        kind = MUTATIONS[i % len(MUTATIONS)]
        data = order[i % len(order)].read_bytes()
        yield kind, mutate(data, rng, kind)
