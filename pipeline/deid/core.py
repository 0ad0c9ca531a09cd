"""De-identify one dataset by the PS3.15 Annex E profile (a first engine; issue #4 goes on).

Every element at every sequence depth, and the file meta, goes through the same decision:

1. private elements: removed, unless Retain Safe Private is on and Table E.3.10-1 lists them
   (matched by group, private creator and element offset); private creators go with their
   block;
2. elements Table E.1-1 lists: the action for the chosen options (:mod:`pipeline.deid.profile`),
   conditional codes resolved by the attribute's Type in the instance's IOD (below);
3. other public elements, by VR: free text (LO, LT, SH, ST, UT, UC, PN) removed, dates and
   date-times shifted, UIDs that are not registered standard UIDs remapped, the rest kept;
   sequences are always cleaned item by item.

Conditional codes take the Type of the attribute in the IOD of the SOP class, from highdicom's
tables of the Standard (``highdicom/_standard``: SOP class -> IOD -> modules -> attributes with
Types, generated from the innolitics dicom-standard JSON of PS3.3): ``X/Z``, ``X/D``, ``X/Z/D``,
``Z/D`` and ``X/Z/U*`` become D for Type 1 (and 1C), Z for Type 2 (and 2C), X otherwise; an
``X/Z/U*`` sequence that must stay keeps its items with their UIDs remapped. Attributes inside
sequences use the Type at that path; where the IOD is unknown, the strictest reading applies
(the attribute is removed unless the code has no X).

Actions: D replaces with a dummy of the VR (dates are shifted instead, UIDs remapped), Z
empties, X removes, K keeps (sequences still cleaned), C cleans (dates shifted by the patient's
offset; free text emptied, as no cleaner can prove text free of identity), U remaps a UID with
the keyed HMAC.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from pipeline._version import __version__
from pipeline.deid.keys import Pseudonymizer
from pipeline.deid.profile import EDITION, Option, rule_for, safe_private_vr

__all__ = ["DeidResult", "Deidentifier"]

_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC", "PN"})
_DUMMY = {
    "PN": "ANONYMOUS",
    "LO": "ANONYMOUS",
    "SH": "ANONYMOUS",
    "CS": "ANONYMOUS",
    "LT": "ANONYMOUS",
    "ST": "ANONYMOUS",
    "UT": "ANONYMOUS",
    "UC": "ANONYMOUS",
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
    "TM": "000000",
    "DA": "19000101",
    "DT": "19000101000000",
}
_PATIENT_ID, _PATIENT_NAME, _ACCESSION = 0x00100020, 0x00100010, 0x00080050


@functools.cache
def _iod_types(sop_class_uid: str) -> dict[tuple[str, ...], str]:
    """(path of keywords..., keyword) -> strictest Type of the attribute in the IOD."""
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return {}
    modules = get_module_attribute_map()
    order = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}
    out: dict[tuple[str, ...], str] = {}
    for module in get_iod_module_map().get(iod, []):
        for attr in modules.get(module["key"], []):
            key = (*attr["path"], attr["keyword"])
            typ = attr["type"] if module["usage"] in ("M", "C") else "3"
            if key not in out or order.get(typ, 4) < order.get(out[key], 4):
                out[key] = typ
    return out


def _resolve(code: str, typ: str | None) -> str:
    """A conditional code for an attribute of Type ``typ`` (None: not in the IOD)."""
    if "/" not in code:
        return code
    choices = code.replace("*", "").split("/")
    if typ in ("1", "1C") and "D" in choices:
        return "D"
    if typ in ("1", "1C", "2", "2C") and "Z" in choices:
        return "Z"
    if typ in ("1", "1C", "2", "2C") and "U" in choices:
        return "U"
    if typ in ("1", "1C") and "Z" in choices:
        return "Z"
    return "X" if "X" in choices else choices[-1]


@dataclass(frozen=True)
class DeidResult:
    """A de-identified dataset and what was done, in numbers (no values)."""

    dataset: Dataset
    removed: int
    replaced: int
    remapped: int
    shifted: int


class Deidentifier:
    """Applies the Basic Profile and ``options`` with keyed pseudonyms.

    Parameters
    ----------
    pseudonymizer:
        The keyed HMAC mapper (UIDs, IDs, date offsets).
    options:
        Profile options (:class:`~pipeline.deid.profile.Option` or their values).
    """

    def __init__(self, pseudonymizer: Pseudonymizer, options: Iterable[Option | str] = ()):
        self.pseudo = pseudonymizer
        self.options = frozenset(Option(o) for o in options)
        if {Option.RETAIN_LONG_FULL_DATES, Option.RETAIN_LONG_MODIFIED_DATES} <= self.options:
            raise ValueError(
                "retain_long_full_dates and retain_long_modified_dates exclude each other"
            )

    # ------------------------------------------------------------------ the method markers

    def method_description(self) -> str:
        """The De-identification Method text: profile, edition, options, software."""
        opts = ", ".join(sorted(o.value for o in self.options)) or "no options"
        return f"PS3.15 {EDITION} Basic Profile ({opts}); pacsflow {__version__}"[:64]

    def _markers(self, ds: Dataset) -> None:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method_description()
        items = []
        for value, meaning in [("113100", "Basic Application Confidentiality Profile")] + [
            o.code for o in sorted(self.options, key=lambda o: o.value)
        ]:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if Option.RETAIN_LONG_FULL_DATES in self.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif Option.RETAIN_LONG_MODIFIED_DATES in self.options:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"

    # ------------------------------------------------------------------ values

    def _shift(self, vr: str, value: str, days: int) -> str:
        value = value.strip()
        try:
            if vr == "DA" and len(value) >= 8:
                day = dt.datetime.strptime(value[:8], "%Y%m%d") + dt.timedelta(days=days)
                return day.strftime("%Y%m%d")
            if vr == "DT" and len(value) >= 8:
                day = dt.datetime.strptime(value[:8], "%Y%m%d") + dt.timedelta(days=days)
                return day.strftime("%Y%m%d") + value[8:]
        except ValueError:
            return _DUMMY[vr]
        return value if vr == "TM" else _DUMMY.get(vr, "")

    def _map_values(self, elem: DataElement, func: object) -> None:
        if elem.VM > 1:
            elem.value = [func(str(v)) for v in elem.value]  # type: ignore[operator]
        elif elem.value not in (None, ""):
            elem.value = func(str(elem.value))  # type: ignore[operator]

    # ------------------------------------------------------------------ the walk

    def deidentify(self, ds: Dataset) -> DeidResult:
        """Return a de-identified copy of ``ds`` (the input is not changed).

        The patient's date offset comes from the original Patient ID, so all of a patient's
        objects shift alike; the Patient ID becomes its keyed token.
        """
        out = copy.deepcopy(ds)
        patient_id = str(ds.get("PatientID", "") or "")
        self._days = self.pseudo.date_offset_days(patient_id)
        self._counts = {"removed": 0, "replaced": 0, "remapped": 0, "shifted": 0}
        types = _iod_types(str(ds.get("SOPClassUID", "")))
        with warnings.catch_warnings():
            # pydicom's validation warnings quote values (identifiers): never let them out
            warnings.simplefilter("ignore")
            self._walk(out, (), types, known_iod=bool(types))
        # identifiers pseudonymised, not just emptied, so that research data still links
        if "PatientID" in ds:
            out.PatientID = self.pseudo.token(patient_id)
        if "PatientName" in ds:
            out.PatientName = self.pseudo.token(patient_id)
        if ds.get("AccessionNumber"):
            out.AccessionNumber = self.pseudo.token(str(ds.AccessionNumber), domain="accession")
        self._markers(out)
        from pydicom.dataset import FileMetaDataset

        source_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = source_meta.get(
            "MediaStorageSOPClassUID", ds.get("SOPClassUID", "")
        )
        meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID", "")
        syntax = source_meta.get("TransferSyntaxUID")
        if syntax is None:  # a bare dataset: the syntax it was read with
            implicit, little = ds.original_encoding
            syntax = (
                "1.2.840.10008.1.2"
                if implicit is not False
                else ("1.2.840.10008.1.2.1" if little is not False else "1.2.840.10008.1.2.2")
            )
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"PACSFLOW_{__version__}"[:16]
        out.file_meta = meta
        c = self._counts
        return DeidResult(out, c["removed"], c["replaced"], c["remapped"], c["shifted"])

    def _walk(
        self, ds: Dataset, path: tuple[str, ...], types: dict[tuple[str, ...], str], known_iod: bool
    ) -> None:
        creators: dict[tuple[int, int], str] = {}
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private and 0x0010 <= tag.element <= 0x00FF:
                creators[(tag.group, tag.element)] = str(elem.value)
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private:
                self._private(ds, elem, creators, path, types, known_iod)
                continue
            if tag.group == 0x0002:
                continue  # file meta inside a dataset: rebuilt from scratch
            keyword = elem.keyword or ""
            rule = rule_for(int(tag))
            if rule is not None:
                action = rule.action(self.options)
                typ = types.get((*path, keyword)) if known_iod else None
                action = _resolve(action, typ)
            else:
                action = self._by_vr(elem)
            self._apply(ds, elem, action, (*path, keyword), types, known_iod)

    def _private(
        self,
        ds: Dataset,
        elem: DataElement,
        creators: dict[tuple[int, int], str],
        path: tuple[str, ...],
        types: dict[tuple[str, ...], str],
        known_iod: bool,
    ) -> None:
        tag = elem.tag
        keep = False
        if Option.RETAIN_SAFE_PRIVATE in self.options:
            if 0x0010 <= tag.element <= 0x00FF:
                creator = creators.get((tag.group, tag.element), "")
                keep = any(g == tag.group and c == creator for (g, c, _o) in _safe_creators())
            elif tag.element > 0x00FF:
                creator = creators.get((tag.group, tag.element >> 8), "")
                keep = safe_private_vr(tag.group, creator, tag.element & 0xFF) is not None
        if not keep:
            del ds[tag]
            self._counts["removed"] += 1
        elif elem.VR == "SQ":
            for item in elem.value:
                self._walk(item, (*path, "private"), types, known_iod=False)

    def _by_vr(self, elem: DataElement) -> str:
        vr = elem.VR
        if vr == "SQ":
            return "K"
        if vr in _TEXT_VRS:
            return "X"
        if vr in ("DA", "DT"):
            return "C"
        if vr == "UI":
            values = elem.value if elem.VM > 1 else [elem.value]
            registered = all(v and UID(str(v)).name != str(v) for v in values)
            return "K" if registered else "U"
        return "K"

    def _apply(
        self,
        ds: Dataset,
        elem: DataElement,
        action: str,
        path: tuple[str, ...],
        types: dict[tuple[str, ...], str],
        known_iod: bool,
    ) -> None:
        vr = elem.VR
        if action == "X":
            del ds[elem.tag]
            self._counts["removed"] += 1
            return
        if vr == "SQ":
            if action == "Z":
                elem.value = Sequence()
                self._counts["replaced"] += 1
                return
            for item in elem.value:  # K, C, D, U: keep the items, cleaned recursively
                self._walk(item, path, types, known_iod)
            return
        if action == "K":
            return
        if action == "U" or (vr == "UI" and action in ("D", "C")):
            self._map_values(elem, self.pseudo.uid)
            self._counts["remapped"] += 1
            return
        if vr in ("DA", "DT") and action in ("C", "D"):
            self._map_values(elem, lambda v: self._shift(vr, v, self._days))
            self._counts["shifted"] += 1
            return
        if vr == "TM" and action == "C":
            return  # a whole-day offset leaves times of day as they are
        if action == "Z" or (action == "C" and vr in _TEXT_VRS):
            elem.value = "" if vr not in ("SQ",) else Sequence()
            self._counts["replaced"] += 1
            return
        # D (or C on something that is neither date nor text): a dummy of the VR
        dummy = _DUMMY.get(vr)
        if dummy is None:
            del ds[elem.tag]
            self._counts["removed"] += 1
            return
        elem.value = dummy
        self._counts["replaced"] += 1


@functools.cache
def _safe_creators() -> frozenset[tuple[int, str, int]]:
    from pipeline.deid import _profile

    return frozenset(_profile.SAFE_PRIVATE)
