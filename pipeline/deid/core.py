"""De-identify one dataset by the PS3.15 Annex E profile, edition 2026d.

Every element at every sequence depth, the file meta, and a DICOMDIR's records go through the
same decision:

1. private elements: removed, unless Retain Safe Private is on and Table E.3.10-1 lists them
   (matched by group, private creator and element offset); private creators go with their
   block;
2. elements Table E.1-1 lists: the action for the chosen options (:mod:`pipeline.deid.profile`),
   conditional codes resolved by the attribute's Type in the instance's IOD (below);
3. other public elements, by VR: free text (LO, LT, SH, ST, UT, UC, PN) removed (emptied or
   dummied where the IOD requires it, like X/Z/D), except a short list of vendor and coded
   technical terms (``_TECHNICAL_TEXT``: Manufacturer, model, kernel, code values and
   schemes, ...); dates and date-times shifted; UIDs outside the Standard's root remapped; the
   rest kept; sequences are always cleaned item by item;
4. Code Meaning (0008,0104), free text a RIS may type anything into: a meaning the code's
   scheme dictionary gives it stays, a known code gets its canonical meaning, an unknown UCUM
   unit its code, any other a dummy unless ``keep_code_meanings`` names the scheme
   (:mod:`pipeline.deid._codes`). Ethnic Group and its code sequence go unless
   ``retain_ethnic_group`` (GDPR Art. 9), whatever Retain Patient Characteristics says.

Conditional codes take the Type of the attribute in the IOD of the SOP class, from highdicom's
tables of the Standard (``highdicom/_standard``: SOP class -> IOD -> modules -> attributes with
Types, generated from the innolitics dicom-standard JSON of PS3.3): Type 1 (and 1C) -> D, or U
for ``X/Z/U*`` (the sequence keeps its items, UIDs remapped); Type 2 (and 2C) -> Z, or U for
``X/Z/U*``; otherwise X. Refinements, each found by validating exports with dciodvfy: top-level
attributes of a U (optional) module count as Type 3 unless the instance carries the module (one
of its Type 1 attributes that no rule touches is there); an ``X/Z/U*`` reference sequence stays
(U) when the Common Instance Reference module lists the referenced series; attributes inside
sequences use the Type at that path (nested SR Content Sequences count as one level). Where
the IOD is unknown, the strictest reading applies (removed unless the code has no X). An
overlay group whose Overlay Data is removed goes as a whole.

Actions: D replaces with a dummy of the VR (dates are shifted instead, UIDs remapped), Z
empties, X removes, K keeps (sequences still cleaned), C cleans (dates shifted by the patient's
offset; free text emptied, as no cleaner can prove text free of identity; opaque binary
removed), U remaps a UID with the keyed HMAC.

Elements are decided by tag and raw VR first; one kept as it is is never decoded, so pydicom
(or :func:`pipeline.deid.encode.encode_part10`) writes its bytes back unchanged.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import warnings
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, config
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from pipeline._version import __version__
from pipeline.config import DeidConfig
from pipeline.deid._codes import meaning_for
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
#: D must leave a non-empty value (the attribute may be Type 1); C on these VRs removes
_D_ONLY_DUMMY: dict[str, str | bytes] = {
    "UR": "ANONYMOUS",
    **dict.fromkeys(("OB", "OD", "OF", "OL", "OV", "OW", "UN"), b"\x00" * 8),
}
_PATIENT_ID, _PATIENT_NAME, _ACCESSION = 0x00100020, 0x00100010, 0x00080050
_NO_CHECK = config.IGNORE
_SOP_CLASS = 0x00080016
_CODE_VALUE, _SCHEME, _CODE_MEANING = 0x00080100, 0x00080102, 0x00080104
#: Long Code Value, URN Code Value: a code's value where Code Value is absent
_OTHER_CODE_VALUES = (0x00080119, 0x00080120)
#: De-identification Method Code Sequence
_METHOD_CODES = BaseTag(0x00120064)
#: CID 7050: the option recorded for an object whose burned-in text was removed
CLEAN_PIXEL_DATA = ("113101", "Clean Pixel Data Option")
_DICOM_ROOT = "1.2.840.10008."
#: Ethnic Group, Ethnic Group Code Sequence, Ethnic Groups: Retain Patient Characteristics keeps
#: them in PS3.15, but ethnic origin is special-category data (GDPR Art. 9): kept only where
#: the configuration names it (``retain_ethnic_group``), removed by the Basic Profile otherwise
_ETHNIC_GROUP = frozenset({0x00102160, 0x00102161, 0x00102162})
_OVERLAY_GROUPS = frozenset(range(0x6000, 0x6020, 2))

_DIRECTORY_RECORDS = 0x00041220
#: Types of the record keys of a DICOMDIR (PS3.3 Annex F.5, Tables F.5-1 to F.5-3: Patient,
#: Study and Series Keys), which highdicom's module tables do not carry
_RECORD_KEY_TYPES: dict[tuple[str, ...], str] = {
    ("DirectoryRecordSequence", keyword): typ
    for keyword, typ in (
        ("PatientID", "1"),
        ("PatientName", "2"),
        ("StudyDate", "1"),
        ("StudyTime", "1"),
        ("StudyDescription", "2"),
        ("StudyInstanceUID", "1C"),
        ("AccessionNumber", "2"),
        ("Modality", "1"),
        ("SeriesInstanceUID", "1"),
        ("SeriesNumber", "1"),
        ("InstanceNumber", "1"),
    )
}

#: Public text attributes outside Table E.1-1 that hold vendor or coded technical terms, not
#: free text: kept (the Standard lists only what needs an action; these are what analysis and
#: coded content need). Any other out-of-table text (LO, LT, SH, ST, UT, UC, PN) is removed, or
#: emptied/dummied where the IOD requires it (resolved like X/Z/D).
_TECHNICAL_TEXT = frozenset(
    {
        0x00080070,  # Manufacturer
        0x00081090,  # Manufacturer's Model Name
        0x00181020,  # Software Versions
        0x00181210,  # Convolution Kernel
        0x00180024,  # Sequence Name
        0x00189005,  # Pulse Sequence Name
        0x00181250,  # Receive Coil Name
        0x00181251,  # Transmit Coil Name
        0x00180085,  # Imaged Nucleus
        0x00181160,  # Filter Type
        0x00281054,  # Rescale Type
        0x00080100,  # Code Value
        0x00080102,  # Coding Scheme Designator
        0x00080103,  # Coding Scheme Version
        0x00080119,  # Long Code Value
        0x00080120,  # URN Code Value
        0x00201040,  # Position Reference Indicator (SLIDE_CORNER for slides)
    }
)


@functools.cache
def _iod_types(sop_class_uid: str) -> dict[tuple[str, ...], str]:
    """(path of keywords..., keyword) -> strictest Type of the attribute in the IOD.

    A top-level attribute of a module the IOD only allows (usage U) counts as Type 3; one inside
    a sequence keeps its Type in the module, as the sequence holding it is there (a Modality
    LUT Sequence item needs its Modality LUT Type even where the Modality LUT module is U).
    """
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
            typ = attr["type"] if module["usage"] in ("M", "C") or attr["path"] else "3"
            if key not in out or order.get(typ, 4) < order.get(out[key], 4):
                out[key] = typ
    return out


@functools.cache
def _optional_modules(
    sop_class_uid: str,
) -> tuple[tuple[frozenset[str], tuple[tuple[str, str], ...]], ...]:
    """The IOD's U modules: (their top-level keywords, (keyword, Type) pairs of Type 1/1C/2/2C).

    A U module an instance carries counts in full: Reviewer Name (2C) of an Approval module
    whose Approval Status is there must stay, though the module itself is optional.
    """
    from highdicom._standard_utils import (
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return ()
    modules = get_module_attribute_map()
    out = []
    for module in get_iod_module_map().get(iod, []):
        if module["usage"] in ("M", "C"):
            continue
        top = [a for a in modules.get(module["key"], []) if not a["path"]]
        required = tuple((a["keyword"], a["type"]) for a in top if a["type"] != "3")
        if required:
            out.append((frozenset(a["keyword"] for a in top), required))
    return tuple(out)


def _present_module_types(
    ds: Dataset, sop_class_uid: str, types: dict[tuple[str, ...], str]
) -> dict[tuple[str, ...], str]:
    """``types`` with the Types of the U modules ``ds`` carries (a module is there when one
    of its Type 1 attributes that the profile leaves alone is)."""
    extra: dict[tuple[str, ...], str] = {}
    present = ds._dict
    for anchors, required in _module_anchors(sop_class_uid):
        if any(tag in present for tag in anchors):
            for keyword, typ in required:
                if types.get((keyword,), "3") == "3":
                    extra[(keyword,)] = typ
    return {**types, **extra} if extra else types


@functools.cache
def _module_anchors(
    sop_class_uid: str,
) -> tuple[tuple[tuple[int, ...], tuple[tuple[str, str], ...]], ...]:
    """The IOD's U modules: (the tags of their anchors, their required (keyword, Type)).

    An anchor is a Type 1 attribute that stays whatever the profile does (no rule of its
    own): a module whose only Type 1 attribute has a conditional code of its own is not held
    in place by it.
    """
    from pydicom.datadict import tag_for_keyword

    out = []
    for _keywords, required in _optional_modules(sop_class_uid):
        tags = [tag_for_keyword(k) for k, t in required if t == "1"]
        anchors = tuple(int(t) for t in tags if t is not None and rule_for(t) is None)
        out.append((anchors, required))
    return tuple(out)


def _type_at(types: dict[tuple[str, ...], str], key: tuple[str, ...]) -> str | None:
    """The Type at ``key``; an SR content tree is recursive, so nested Content Sequences count
    as one (the tables list one level: a TEXT item's Text Value is 1C at any depth)."""
    typ = types.get(key)
    if typ is None and key.count("ContentSequence") > 1:
        flat: list[str] = []
        for keyword in key:
            if not (keyword == "ContentSequence" and flat and flat[-1] == keyword):
                flat.append(keyword)
        typ = types.get(tuple(flat))
    return typ


def _resolve(code: str, typ: str | None) -> str:
    """A conditional code for an attribute of Type ``typ`` (None: not in the IOD)."""
    if "/" not in code:
        return code
    choices = code.replace("*", "").split("/")
    if typ in ("1", "1C"):
        # present with a value: an X/Z/U* sequence keeps its items (UIDs remapped); the Z of
        # X/Z becomes a dummy, which Z allows and a Type 1 needs
        return "U" if "U" in choices else "D"
    if typ in ("2", "2C"):
        # present, may be empty (X/D too: removing a Type 2 breaks the IOD); an X/Z/U*
        # sequence keeps its references remapped instead of emptied: an empty Source Image
        # Sequence leaves the Common Instance Reference module listing series the instance
        # no longer references (SEG, parametric maps), and remapped UIDs identify no one
        return "U" if "U" in choices else "Z"
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
    retain_ethnic_group:
        Keep Ethnic Group (0010,2160), its Code Sequence (0010,2161) and Ethnic Groups
        (0010,2162) under Retain Patient Characteristics. Off: the Basic Profile removes them
        whatever the options say (special-category data, GDPR Art. 9).
    keep_code_meanings:
        Coding Scheme Designators whose Code Meanings stay as they are where the code is
        local or unknown (``"*"``: every scheme). Otherwise such a meaning becomes a dummy; a
        known code always gets its scheme's canonical meaning (:mod:`pipeline.deid._codes`).
    """

    def __init__(
        self,
        pseudonymizer: Pseudonymizer,
        options: Iterable[Option | str] = (),
        *,
        retain_ethnic_group: bool = False,
        keep_code_meanings: Iterable[str] = (),
    ):
        self.pseudo = pseudonymizer
        self.options = frozenset(Option(o) for o in options)
        self.retain_ethnic_group = retain_ethnic_group
        self.keep_code_meanings = frozenset(keep_code_meanings)
        if {Option.RETAIN_LONG_FULL_DATES, Option.RETAIN_LONG_MODIFIED_DATES} <= self.options:
            raise ValueError(
                "retain_long_full_dates and retain_long_modified_dates exclude each other"
            )
        self._codes: dict[int, str | None] = {}
        self._uid_cache: dict[str, str] = {}
        self._shift_cache: dict[tuple[str, str, int], str] = {}
        self._code_elements: dict[tuple[bool, bool], RawDataElement] = {}
        self._days = 0
        self._code_items: dict[bool, list[tuple[str, str]]] = {}

    @classmethod
    def from_config(cls, pseudonymizer: Pseudonymizer, cfg: DeidConfig) -> Deidentifier:
        """The engine the ``deid`` section of a configuration describes."""
        return cls(
            pseudonymizer,
            cfg.options,
            retain_ethnic_group=cfg.retain_ethnic_group,
            keep_code_meanings=cfg.keep_code_meanings,
        )

    # ------------------------------------------------------------------ the method markers

    def method_description(self) -> str:
        """The De-identification Method text: profile, edition, options, software."""
        opts = ", ".join(sorted(o.value for o in self.options)) or "no options"
        return f"PS3.15 {EDITION} Basic Profile ({opts}); pacsflow {__version__}"[:64]

    def _markers(self, ds: Dataset, clean_pixels: bool = False) -> None:
        implicit, little = ds.original_encoding
        if little is True and implicit is not None:
            _set_text(ds, 0x00120062, "CS", "YES")  # Patient Identity Removed
            _set_text(ds, 0x00120063, "LO", self.method_description())
            ds._dict[_METHOD_CODES] = self._method_code_element(implicit, clean_pixels)
            _set_text(ds, 0x00280303, "CS", self._longitudinal())
            return
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method_description()
        ds.add_new(_METHOD_CODES, "SQ", self._method_code_sequence(clean_pixels))
        ds.LongitudinalTemporalInformationModified = self._longitudinal()

    def _longitudinal(self) -> str:
        if Option.RETAIN_LONG_FULL_DATES in self.options:
            return "UNMODIFIED"
        if Option.RETAIN_LONG_MODIFIED_DATES in self.options:
            return "MODIFIED"
        return "REMOVED"

    def _method_code_sequence(self, clean_pixels: bool = False) -> Sequence:
        """The De-identification Method Code Sequence: one item per code (with the Clean
        Pixel Data Option, 113101, for an object whose burned-in text was removed)."""
        codes = self._code_items.get(clean_pixels)
        if codes is None:
            codes = self._code_items[clean_pixels] = self._method_codes(clean_pixels)
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.add_new(0x00080100, "SH", value)  # Code Value
            item.add_new(0x00080102, "SH", "DCM")  # Coding Scheme Designator
            item.add_new(0x00080104, "LO", meaning)  # Code Meaning
            items.append(item)
        return Sequence(items)

    def _method_code_element(self, implicit: bool, clean_pixels: bool = False) -> RawDataElement:
        """The sequence as a raw element: the bytes pydicom writes for it, encoded once."""
        elem = self._code_elements.get((implicit, clean_pixels))
        if elem is None:
            from pydicom.filebase import DicomBytesIO
            from pydicom.filewriter import write_data_element

            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = implicit, True
            codes = self._method_code_sequence(clean_pixels)
            write_data_element(fp, DataElement(_METHOD_CODES, "SQ", codes))
            value = bytes(fp.getvalue())[8 if implicit else 12 :]
            elem = RawDataElement(_METHOD_CODES, "SQ", len(value), value, 0, implicit, True)
            self._code_elements[implicit, clean_pixels] = elem
        return elem

    def _method_codes(self, clean_pixels: bool = False) -> list[tuple[str, str]]:
        """(code value, meaning): the Basic Profile (113100), then each option's code, then
        the Clean Pixel Data Option (113101) where the pixels were cleaned."""
        return (
            [("113100", "Basic Application Confidentiality Profile")]
            + [o.code for o in sorted(self.options, key=lambda o: o.value)]
            + ([CLEAN_PIXEL_DATA] if clean_pixels else [])
        )

    def _code_for(self, tag: int) -> str | None:
        """The table's (unresolved) code for ``tag`` under this option set, cached."""
        try:
            return self._codes[tag]
        except KeyError:
            rule = rule_for(tag)
            code = None
            if rule is not None:
                keep_all = tag not in _ETHNIC_GROUP or self.retain_ethnic_group
                code = rule.action(self.options) if keep_all else rule.basic
            self._codes[tag] = code
            return code

    # ------------------------------------------------------------------ values

    def _shift(self, vr: str, value: str, days: int) -> str:
        key = (vr, value, days)
        shifted = self._shift_cache.get(key)
        if shifted is None:
            if len(self._shift_cache) > 65536:
                self._shift_cache.clear()
            shifted = self._shift_cache[key] = self._shift_value(vr, value, days)
        return shifted

    def _shift_value(self, vr: str, value: str, days: int) -> str:
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

    def deidentify(
        self, ds: Dataset, *, in_place: bool = False, clean_pixels: bool = False
    ) -> DeidResult:
        """Return a de-identified copy of ``ds`` (the input is not changed).

        ``clean_pixels`` says the pixel data were cleaned of burned-in text
        (:mod:`pipeline.deid.pixels`): the method codes then name the Clean Pixel Data Option.

        The patient's date offset comes from the original Patient ID, so all of a patient's
        objects shift alike; the Patient ID becomes its keyed token. With ``in_place`` the
        input itself is de-identified and returned (no deep copy: a third of the time for a
        header with many elements); read what you need of the original first.
        """
        out = ds if in_place else copy.deepcopy(ds)
        patient_id = str(_peek(ds, _PATIENT_ID) or "")
        had_patient_id, had_name = _PATIENT_ID in ds._dict, _PATIENT_NAME in ds._dict
        accession = str(_peek(ds, _ACCESSION) or "")
        source_meta = getattr(ds, "file_meta", None)
        original_encoding = ds.original_encoding
        self._days = self.pseudo.date_offset_days(patient_id)
        self._counts = {"removed": 0, "replaced": 0, "remapped": 0, "shifted": 0}
        sop_class = str(_peek(ds, _SOP_CLASS) or "") or str(
            (source_meta or {}).get("MediaStorageSOPClassUID", "")
        )
        types = _present_module_types(ds, sop_class, _iod_types(sop_class))
        records = out.get(_DIRECTORY_RECORDS, None)
        if records is not None:  # a DICOMDIR: its records patient by patient, below
            del out[_DIRECTORY_RECORDS]
        with warnings.catch_warnings():
            # pydicom's validation warnings quote values (identifiers): never let them out
            warnings.simplefilter("ignore")
            self._walk(out, (), types, known_iod=bool(types))
            if records is not None:
                self._directory_records(records.value, {**types, **_RECORD_KEY_TYPES})
                out[_DIRECTORY_RECORDS] = records
        # identifiers pseudonymised, not just emptied, so that research data still links
        if had_patient_id:
            _set_text(out, _PATIENT_ID, "LO", self.pseudo.token(patient_id))
        if had_name:
            _set_text(out, _PATIENT_NAME, "PN", self.pseudo.token(patient_id))
        if accession:
            _set_text(out, _ACCESSION, "SH", self.pseudo.token(accession, domain="accession"))
        self._markers(out, clean_pixels)
        from pydicom.dataset import FileMetaDataset

        source_meta = source_meta or FileMetaDataset()
        meta = FileMetaDataset()
        # the two UIDs are written as their converted values (as when this read them through
        # pydicom), whatever the profile did to them
        _canonical_uid(ds, _SOP_CLASS)
        _canonical_uid(out, 0x00080018)
        media_uid = str(_get(source_meta, 0x00020003, "") or "")
        syntax = _get(source_meta, 0x00020010, None)
        if syntax is None:  # a bare dataset: the syntax it was read with
            implicit, little = original_encoding
            syntax = (
                "1.2.840.10008.1.2"
                if implicit is not False
                else ("1.2.840.10008.1.2.1" if little is not False else "1.2.840.10008.1.2.2")
            )
        # the elements `meta.Keyword = value` makes, without its per-element validation (a
        # fifth of the engine's time on a CT slice); all in group 2, as the meta needs
        for tag, vr, value in (
            (0x00020002, "UI", _get(source_meta, 0x00020002, _get(ds, _SOP_CLASS, ""))),
            (
                0x00020003,
                "UI",
                UID(
                    _get(out, 0x00080018, None) or (self.pseudo.uid(media_uid) if media_uid else "")
                ),
            ),
            (0x00020010, "UI", syntax),
            (0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID),
            (0x00020013, "SH", f"PACSFLOW_{__version__}"[:16]),
        ):
            meta._dict[BaseTag(tag)] = DataElement(tag, vr, value, validation_mode=_NO_CHECK)
        out.file_meta = meta
        c = self._counts
        return DeidResult(out, c["removed"], c["replaced"], c["remapped"], c["shifted"])

    def _directory_records(self, records: Sequence, types: dict[tuple[str, ...], str]) -> None:
        """De-identify the records of a DICOMDIR, each with its patient's tokens and offset.

        Records come in directory order (a PATIENT record, then its studies, series and
        instances), so the last PATIENT record seen owns the records after it. Patient ID, name
        and accession number become the same keyed tokens as in the instances, dates shift by
        that patient's offset, Referenced SOP Instance UIDs map like the instances' own, and
        each component of a Referenced File ID (folder names often are patient IDs) becomes a
        keyed 8-character token. Record offsets are byte positions: rewrite them after the
        lengths change (:func:`pipeline.deid.dicomdir.write_dicomdir`).
        """
        patient = ""
        for item in records:
            if str(item.get("DirectoryRecordType", "")).upper() == "PATIENT":
                patient = str(item.get("PatientID", "") or "")
            self._days = self.pseudo.date_offset_days(patient)
            accession = str(item.get("AccessionNumber", "") or "")
            file_id = item.get("ReferencedFileID")
            had = {k: k in item for k in ("PatientID", "PatientName")}
            self._walk(item, ("DirectoryRecordSequence",), types, True)
            for keyword, present in had.items():
                if present:
                    setattr(item, keyword, self.pseudo.token(patient))
            if accession:
                item.AccessionNumber = self.pseudo.token(accession, domain="accession")
            if file_id is not None and "ReferencedFileID" in item:
                parts = [file_id] if isinstance(file_id, str) else list(file_id)
                item.ReferencedFileID = [
                    self.pseudo.token(str(p), domain="file-id", length=8) for p in parts
                ]

    def _walk(
        self, ds: Dataset, path: tuple[str, ...], types: dict[tuple[str, ...], str], known_iod: bool
    ) -> None:
        # Elements are looked at by tag and raw VR first: one kept or removed as it is is
        # never converted to a Python value (pydicom then writes its raw bytes back), which is
        # most of an engine's time on headers with hundreds of elements.
        d = ds._dict
        tags = list(d)
        refs_listed = not path and (0x00081115 in d or 0x00081200 in d)
        creators: dict[tuple[int, int], str] = {}
        if Option.RETAIN_SAFE_PRIVATE in self.options:  # only that option keeps any
            for tag in tags:
                if tag.is_private and 0x0010 <= tag.element <= 0x00FF:
                    creators[(tag.group, tag.element)] = str(ds[tag].value)
        overlays = {  # groups 6000-601E (even) holding Overlay Data
            t >> 16 for t in tags if t & 0xFFFF == 0x3000 and t >> 16 in _OVERLAY_GROUPS
        }
        counts = self._counts
        code_for = self._code_for
        for tag in tags:
            t = int(tag)  # int keys: a BaseTag compares by a Python __eq__ in int-keyed dicts
            group = t >> 16
            if group & 1:
                self._private(ds, tag, creators, path, types, known_iod)
                continue
            if group == 0x0002:
                continue  # file meta inside a dataset: rebuilt from scratch
            code = code_for(t)
            elem = d[tag]
            if t == _CODE_MEANING and code is None:
                self._code_meaning(ds, tag, elem)
                continue
            vr = _elem_vr(elem, t)
            if code is not None:
                typ = _type_at(types, (*path, _keyword(t))) if known_iod else None
                action = _resolve(code, typ)
                if action == "X" and code.startswith("X/Z/U") and refs_listed:
                    # the Common Instance Reference module (kept: no rule) lists the series
                    # this instance references: removing the references would break its 1C
                    # condition, so they stay, remapped (the U of X/Z/U*)
                    action = "U"
            elif vr == "UI":
                action = self._by_vr_raw(d, tag, elem) or self._by_vr(ds[tag])
            else:
                action = _by_vr_name(vr, t)
                if action == "X" and known_iod:  # free text the IOD requires stays, emptied
                    action = _resolve("X/Z/D", _type_at(types, (*path, _keyword(t))))
            if action == "X":
                del d[tag]  # public, not Pixel Data: nothing else of the Dataset to reset
                counts["removed"] += 1
                continue
            if action == "K" and vr != "SQ":
                continue  # kept as it is, never converted
            if vr != "SQ" and self._apply_raw(d, tag, elem, vr, action):
                continue
            self._apply(ds, ds[tag], action, (*path, _keyword(t)), types, known_iod)
        # an Overlay Plane module whose Overlay Data (Type 1) the profile removed is invalid:
        # the rest of that overlay group goes too
        for group in overlays:
            if (group << 16 | 0x3000) not in d:
                for tag in [t for t in d if t >> 16 == group]:
                    del ds[tag]
                    self._counts["removed"] += 1

    def _code_meaning(self, ds: Dataset, tag: BaseTag, elem: DataElement | RawDataElement) -> None:
        """The Code Meaning of the code item ``ds``: kept where it is one the scheme's
        dictionary gives the code; else the canonical meaning of a known code, the code itself
        for a UCUM unit, or a dummy (kept where ``keep_code_meanings`` names the scheme).
        Edited as bytes where the element is raw, like the rest of the walk."""
        raw = _raw_text(elem, "LO")
        current = (
            raw.decode("latin-1").strip(" \x00")
            if raw is not None
            else str(ds[tag].value or "").strip()
        )
        if not current:
            return  # nothing written into it
        scheme = str(_peek(ds, _SCHEME) or "").strip()
        value = str(_peek(ds, _CODE_VALUE) or "").strip()
        for other in _OTHER_CODE_VALUES:
            value = value or str(_peek(ds, other) or "").strip()
        text = meaning_for(scheme, value, current, self.keep_code_meanings) or _DUMMY["LO"]
        if text == current:
            return
        data = _encoded([text], "LO") if raw is not None else None
        if data is not None:
            ds._dict[tag] = _with_value(elem, "LO", data)  # type: ignore[arg-type]
        else:
            ds[tag] = DataElement(tag, "LO", text)
        self._counts["replaced"] += 1

    def _private(
        self,
        ds: Dataset,
        tag: BaseTag,
        creators: dict[tuple[int, int], str],
        path: tuple[str, ...],
        types: dict[tuple[str, ...], str],
        known_iod: bool,
    ) -> None:
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
        elif _vr_of(ds, tag) == "SQ":
            for item in ds[tag].value:
                self._walk(item, (*path, "private"), types, known_iod=False)

    def _by_vr(self, elem: DataElement) -> str:
        vr = elem.VR
        if vr != "UI":
            return _by_vr_name(vr, int(elem.tag))
        if vr == "UI":
            values = elem.value if elem.VM > 1 else [elem.value]
            # the DICOM root: standard UIDs, also those newer than pydicom's dictionary
            # (Label Map Segmentation Storage is not in pydicom 3.0's)
            registered = all(
                v and (str(v).startswith(_DICOM_ROOT) or UID(str(v)).name != str(v)) for v in values
            )
            return "K" if registered else "U"
        return "K"

    def _by_vr_raw(
        self, d: MutableMapping[BaseTag, DataElement | RawDataElement], tag: BaseTag, elem: object
    ) -> str | None:
        """:meth:`_by_vr` for a raw UI element, decided on its bytes; the element is left as
        pydicom would write it once converted. None: decide by :meth:`_by_vr`."""
        raw = _raw_text(elem, "UI")  # type: ignore[arg-type]
        if raw is None:
            return None
        values = _items(raw)
        data = _encoded(values, "UI")
        if data is None:
            return None
        if data != raw:  # the converted value is what the encoder would write
            d[tag] = _with_value(elem, "UI", data)  # type: ignore[arg-type]
        return "K" if all(v and _registered_uid(v) for v in values) else "U"

    def _uid(self, value: str) -> str:
        """The keyed UID of ``value``, remembered (a series repeats its study's UIDs)."""
        cache = self._uid_cache
        mapped = cache.get(value)
        if mapped is None:
            if len(cache) > 65536:
                cache.clear()
            mapped = cache[value] = self.pseudo.uid(value)
        return mapped

    def _apply_raw(
        self,
        d: MutableMapping[BaseTag, DataElement | RawDataElement],
        tag: BaseTag,
        elem: DataElement | RawDataElement,
        vr: str,
        action: str,
    ) -> bool:
        """:meth:`_apply` on the bytes of a raw element, for what it does most (remap UIDs,
        shift dates, empty or dummy text): the element stays a raw one holding the bytes the
        converted and changed element would be written with. False (nothing done) where
        :meth:`_apply` must convert it."""
        raw = _raw_text(elem, vr)
        if raw is None:
            return False
        counts = self._counts
        if vr == "UI" and action in ("U", "D", "C"):
            values = _items(raw)
            if len(values) > 1:
                values = [self._uid(v) for v in values]
            elif values[0]:
                values = [self._uid(values[0])]
            key = "remapped"
        elif vr in ("DA", "DT") and action in ("C", "D"):
            values = _items(raw)
            days = self._days
            if len(values) > 1:
                values = [self._shift(vr, v, days) for v in values]
            elif values[0]:
                values = [self._shift(vr, values[0], days)]
            key = "shifted"
        elif action == "U" or vr not in _BYTE_TEXT_VRS:
            return False
        elif vr == "TM" and action == "C":
            values = _items(raw)  # kept, as the converted element is written
            key = ""
        elif action == "Z" or (action == "C" and vr in _TEXT_VRS):
            values = [""]
            key = "replaced"
        else:
            dummy = _DUMMY.get(vr, _D_ONLY_DUMMY.get(vr) if action == "D" else None)
            if not isinstance(dummy, str):
                return False
            values = [dummy]
            key = "replaced"
        data = _encoded(values, vr)
        if data is None:
            return False
        d[tag] = _with_value(elem, vr, data)  # type: ignore[arg-type]
        if key:
            counts[key] += 1
        return True

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
        dummy = _DUMMY.get(vr, _D_ONLY_DUMMY.get(vr) if action == "D" else None)
        if dummy is None:
            del ds[elem.tag]
            self._counts["removed"] += 1
            return
        elem.value = dummy
        self._counts["replaced"] += 1


def _by_vr_name(vr: str, tag: int) -> str:
    """The action for a public attribute outside the table, by VR (UIDs: see ``_by_vr``)."""
    if vr in _TEXT_VRS:
        return "K" if tag in _TECHNICAL_TEXT else "X"
    if vr in ("DA", "DT"):
        return "C"
    return "K"  # SQ (cleaned item by item), numbers, codes, binary


@functools.cache
def _registered_uid(value: str) -> bool:
    """A UID of the Standard: under its root, or one pydicom's dictionary names."""
    return value.startswith(_DICOM_ROOT) or UID(value).name != value


@functools.cache
def _keyword(tag: int) -> str:
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(tag) or ""


def _vr_of(ds: Dataset, tag: BaseTag) -> str:
    """The VR of an element of ``ds`` without converting its value (see :func:`_elem_vr`)."""
    return _elem_vr(ds.get_item(tag), tag)


def _elem_vr(elem: DataElement | RawDataElement, tag: int) -> str:
    """The VR of an element without converting its value: the VR it was encoded with, or the
    dictionary's where that is missing (implicit VR) or UN (a known attribute sent as UN must
    not escape the rules of its real VR)."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    return _dictionary_vr(tag, str(vr or "UN"))


@functools.cache
def _dictionary_vr(tag: int, fallback: str) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        known = dictionary_VR(tag)
    except KeyError:
        return fallback
    return known if " or " not in known else fallback


def _raw_text(elem: DataElement | RawDataElement, vr: str) -> bytes | None:
    """The raw value bytes of ``elem`` when it can be edited as bytes: still raw, encoded
    with ``vr`` itself (or implicitly, ``vr`` from the dictionary), of defined length; None
    where the element must go through pydicom (converted already, sent as UN, deferred)."""
    if not isinstance(elem, RawDataElement):
        return None
    value = elem.value
    if not isinstance(value, bytes) or elem.length == 0xFFFFFFFF:
        return None
    if vr != elem.VR and not (elem.VR is None and elem.is_implicit_VR):
        return None
    return value


def _with_value(elem: RawDataElement, vr: str, data: bytes) -> RawDataElement:
    """``elem`` holding ``data`` (of defined length) with ``vr``."""
    return RawDataElement(
        elem.tag, vr, len(data), data, elem.value_tell, elem.is_implicit_VR, elem.is_little_endian
    )


def _items(value: bytes) -> list[str]:
    """A text value's values as pydicom decodes a raw AE/AS/CS/DA/DT/TM/UI value (latin-1,
    trailing spaces and NULs dropped, split at backslashes)."""
    return value.decode("latin-1").rstrip(" \x00").split("\\")


def _encoded(values: list[str], vr: str) -> bytes | None:
    """The bytes the encoder writes for a text value set to ``values`` (one or several), None
    where it is not ASCII (pydicom would encode it by the character set)."""
    text = "\\".join(values)
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if len(data) % 2:
        data += b"\x00" if vr == "UI" else b" "
    return data


#: VRs whose empty or dummy value the engine writes as bytes (ASCII in every character set)
_BYTE_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)


@functools.cache
def _safe_creators() -> frozenset[tuple[int, str, int]]:
    from pipeline.deid import _profile

    return frozenset(_profile.SAFE_PRIVATE)


def _canonical_uid(ds: Dataset, tag: int) -> None:
    """Leave ``ds[tag]`` (a UID) as the encoder writes it once pydicom has converted it."""
    elem = ds._dict.get(tag)  # type: ignore[call-overload]
    if elem is None or not isinstance(elem, RawDataElement):
        return
    raw = _raw_text(elem, "UI")
    data = None if raw is None else _encoded(_items(raw), "UI")
    if data is None:
        ds[tag]  # converted by pydicom, as before
    elif data != raw:
        ds._dict[elem.tag] = _with_value(elem, "UI", data)


def _get(ds: Dataset, tag: int, default: object) -> Any:
    """``ds.get(keyword, default)`` by tag, without converting the element (:func:`_peek`)."""
    return _peek(ds, tag) if tag in ds._dict else default


def _peek(ds: Dataset, tag: int) -> Any:
    """The value of ``ds[tag]`` (None if absent) without converting the element in ``ds``:
    it stays raw, so the engine can still edit it as bytes. A single ASCII UID comes as
    ``str`` (equal to the ``UID`` pydicom gives)."""
    elem = ds._dict.get(tag)  # type: ignore[call-overload]
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        if elem.VR == "UI" or (elem.VR is None and _dictionary_vr(tag, "") == "UI"):
            values = _items(elem.value)
            if len(values) == 1 and values[0].isascii():
                return values[0]
        charset = ds.original_character_set or ds._character_set
        return convert_raw_data_element(elem, encoding=charset, ds=ds).value
    return ds[tag].value


def _set_text(ds: Dataset, tag: int, vr: str, text: str) -> None:
    """``ds[tag] = text`` (the attribute's dictionary VR is ``vr``) as a raw element holding
    the bytes the encoder would write for it, where ``ds`` was read little endian and the
    element is absent or raw with that VR; by pydicom otherwise."""
    implicit, little = ds.original_encoding
    elem = ds._dict.get(tag)  # type: ignore[call-overload]
    raw = elem is None or _raw_text(elem, vr) is not None
    data = _encoded([text], vr) if raw and little is True else None
    if data is not None and implicit is not None:
        key = BaseTag(tag)
        ds._dict[key] = RawDataElement(key, vr, len(data), data, 0, implicit, True)
    elif tag in ds._dict:
        ds[tag].value = text
    else:
        ds.add_new(tag, vr, text)
