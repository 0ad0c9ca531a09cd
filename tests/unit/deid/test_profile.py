"""The PS3.15 E.1-1 profile: generated from the standard's CSV, every row and option checked."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.deid import _profile
from pipeline.deid.profile import EDITION, Option, resolve, rule_for, safe_private_vr

REPO = Path(__file__).resolve().parents[3]
STANDARDS = REPO.parent / "shared" / "standards"
E1_1 = STANDARDS / "ps3.15-table-e1-1.csv"


def _rows() -> list[dict[str, str]]:
    if not E1_1.exists():
        return []
    with open(E1_1, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tag(text: str) -> int:
    """A tag of the CSV as an int; for patterns, one concrete tag the pattern covers."""
    concrete = {
        "(50xx,xxxx)": 0x50020010,
        "(60xx,3000)": 0x60023000,
        "(60xx,4000)": 0x601E4000,
        "(gggg,eeee) where gggg is odd": 0x00291020,
    }
    if text in concrete:
        return concrete[text]
    return int(text[1:5] + text[6:10], 16)


def _cases() -> list[tuple[str, str, str]]:
    """(tag, option or 'basic', expected action) for the Basic Profile of every row and each
    option whose action differs from it."""
    cases = []
    for row in _rows():
        cases.append((row["tag"], "basic", row["basic"]))
        for option in Option:
            action = row[option.value]
            if action and action != row["basic"]:
                cases.append((row["tag"], option.value, action))
    return cases


CASES = _cases()


def test_edition_and_size() -> None:
    assert EDITION == "2026d"
    assert len(_profile.ATTRIBUTES) + len(_profile.PATTERNS) == 657
    assert len(_profile.SAFE_PRIVATE) == 479


@pytest.mark.skipif(not CASES, reason="../shared/standards not found: the per-row tests need it")
@pytest.mark.parametrize(
    ("tag", "option", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_every_row_and_option_gives_the_standard_action(
    tag: str, option: str, expected: str
) -> None:
    options = [] if option == "basic" else [Option(option)]
    assert resolve(_tag(tag), options) == expected


@pytest.mark.skipif(not E1_1.exists(), reason="../shared/standards not found")
def test_generated_module_is_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_deid_profile.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("tag", "options", "expected"),
    [  # the README's spot checks, which hold without ../shared
        (0x00080050, [], "Z"),
        (0x00100010, [], "Z"),
        (0x00100020, [], "Z/D"),
        (0x0008002A, [], "X/Z/D"),
        (0x0008002A, [Option.RETAIN_LONG_FULL_DATES], "K"),
        (0x0008002A, [Option.RETAIN_LONG_MODIFIED_DATES], "C"),
        (0x0020000D, [], "U"),
        (0x0020000D, [Option.RETAIN_UIDS], "K"),
        (0x00081140, [], "X/Z/U*"),
        (0x00080080, [Option.RETAIN_INSTITUTION_IDENTITY], "K"),
        (0x00181000, [Option.RETAIN_DEVICE_IDENTITY], "K"),
        (0x0040A730, [Option.CLEAN_STRUCTURED_CONTENT], "C"),
        (0x00100040, [Option.RETAIN_PATIENT_CHARACTERISTICS], "K"),
        (0x60003000, [Option.CLEAN_GRAPHICS], "C"),
        (0x00091001, [], "X"),
        (0x00091001, [Option.RETAIN_SAFE_PRIVATE], "C"),
    ],
)
def test_spot_checks(tag: int, options: list[Option], expected: str) -> None:
    assert resolve(tag, options) == expected


def test_conflicting_options_take_the_more_protective_action() -> None:
    calibration = next(t for t, e in _profile.ATTRIBUTES.items() if e[0] == "Calibration Date")
    both = [Option.RETAIN_DEVICE_IDENTITY, Option.RETAIN_LONG_MODIFIED_DATES]
    assert resolve(calibration, [Option.RETAIN_DEVICE_IDENTITY]) == "K"
    assert resolve(calibration, both) == "C"


def test_unlisted_and_pattern_tags() -> None:
    assert rule_for(0x00280010) is None  # Rows: not in the table, kept by VR rules
    assert resolve(0x00280010) is None
    assert rule_for(0x60044000) is not None  # Overlay Comments in another overlay group
    assert rule_for(0x60044000).name.startswith("Overlay Comments")  # type: ignore[union-attr]
    assert rule_for(0x60010010) is not None  # odd group: a private attribute


def test_safe_private_matches_creator_and_offset_not_block() -> None:
    (group, creator, offset), vr = next(iter(_profile.SAFE_PRIVATE.items()))
    assert safe_private_vr(group, creator, offset) == vr
    assert safe_private_vr(group, creator + " ", offset) is None
    assert Option.RETAIN_UIDS.code == ("113110", "Retain UIDs Option")
