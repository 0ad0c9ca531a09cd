"""Generate pipeline/deid/_profile.py from the PS3.15 tables in ../shared/standards.

Reads Table E.1-1 (``ps3.15-table-e1-1.csv``: the Basic Application Level Confidentiality
Profile and every option column) and Table E.3.10-1 (``ps3.15-table-e3.10-1.csv``: safe private
attributes), and writes a Python module of plain literals that records the edition and the
SHA-256 of each source file. Never edit the output by hand: rerun this script.

    python tools/gen_deid_profile.py [--standards ../shared/standards] [--check]

``--check`` exits 1 when the committed module differs from what the CSVs give.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
from pathlib import Path

EDITION = "2026d"
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "pipeline" / "deid" / "_profile.py"
DEFAULT_STANDARDS = REPO.parent / "shared" / "standards"

#: CSV column -> (Option enum value, CID 7050 code, code meaning)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain_safe_private": ("retain_safe_private", "113111", "Retain Safe Private Option"),
    "retain_uids": ("retain_uids", "113110", "Retain UIDs Option"),
    "retain_device_identity": ("retain_device_identity", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": (
        "retain_institution_identity", "113112", "Retain Institution Identity Option",
    ),
    "retain_patient_characteristics": (
        "retain_patient_characteristics", "113108", "Retain Patient Characteristics Option",
    ),
    "retain_long_full_dates": (
        "retain_long_full_dates", "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_long_modified_dates": (
        "retain_long_modified_dates", "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "clean_descriptors": ("clean_descriptors", "113105", "Clean Descriptors Option"),
    "clean_structured_content": (
        "clean_structured_content", "113104", "Clean Structured Content Option",
    ),
    "clean_graphics": ("clean_graphics", "113103", "Clean Graphics Option"),
}  # fmt: skip
_TAG = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")
_PRIVATE_TAG = re.compile(r"^\(([0-9A-F]{4}),xx([0-9A-F]{2})\)$")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render(standards: Path) -> str:
    """The module text for the CSVs in ``standards``."""
    e1 = standards / "ps3.15-table-e1-1.csv"
    e310 = standards / "ps3.15-table-e3.10-1.csv"
    with open(e1, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with open(e310, newline="", encoding="utf-8") as fh:
        safe_rows = list(csv.DictReader(fh))
    lines = [
        '"""PS3.15 Annex E confidentiality profile tables, as data. GENERATED: do not edit.',
        "",
        "Made by tools/gen_deid_profile.py from ../shared/standards (see its README).",
        '"""',
        "",
        "# ruff: noqa: E501",
        "",
        f'EDITION = "{EDITION}"',
        f'E1_1_SHA256 = "{_sha256(e1)}"',
        f'E3_10_1_SHA256 = "{_sha256(e310)}"',
        "",
        "#: CSV option column -> (CID 7050 code, code meaning)",
        "OPTION_CODES: dict[str, tuple[str, str]] = {",
    ]
    for column, (_value, code, meaning) in OPTIONS.items():
        lines.append(f'    "{column}": ("{code}", "{meaning}"),')
    lines += [
        "}",
        "",
        "#: (group << 16 | element) -> (name, retired, basic action, {option: action})",
        "ATTRIBUTES: dict[int, tuple[str, bool, str, dict[str, str]]] = {",
    ]
    patterns = []
    for row in rows:
        overrides = {c: row[c] for c in OPTIONS if row[c]}
        entry = (row["name"], row["retired"] == "Y", row["basic"], overrides)
        m = _TAG.match(row["tag"])
        if m:
            tag = int(m.group(1) + m.group(2), 16)
            lines.append(f"    0x{tag:08X}: {entry!r},")
        else:
            patterns.append((row["tag"], entry))
    lines += [
        "}",
        "",
        "#: Rows whose tag is a pattern: (pattern, (name, retired, basic, {option: action}))",
        "PATTERNS: tuple[tuple[str, tuple[str, bool, str, dict[str, str]]], ...] = (",
    ]
    for pattern, entry in patterns:
        lines.append(f"    ({pattern!r}, {entry!r}),")
    lines += [
        ")",
        "",
        "#: Safe private attributes: (group, private creator, element offset) -> VR",
        "SAFE_PRIVATE: dict[tuple[int, str, int], str] = {",
    ]
    for row in safe_rows:
        m = _PRIVATE_TAG.match(row["tag"])
        if not m:
            raise ValueError(f"unexpected safe-private tag {row['tag']!r}")
        key = (int(m.group(1), 16), row["private_creator"], int(m.group(2), 16))
        lines.append(f"    ({key[0]:#06x}, {key[1]!r}, {key[2]:#04x}): {row['vr']!r},")
    lines += ["}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--standards", type=Path, default=DEFAULT_STANDARDS)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    text = render(args.standards)
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} is out of date: rerun {Path(__file__).name}")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({EDITION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
