"""A folder tree of DICOM files as an archive (any file names, nested to any depth).

**Locations.** A POSIX file name is bytes, not text: it need not be UTF-8 and may hold a
newline. The index stores a location as text (Parquet strings are UTF-8), so a file's path
relative to the root is written in one lossless, printable form (:func:`encode_location`):
bytes that are not UTF-8 and control characters (C0, DEL, C1) become ``\\xHH`` (one per
byte), and a backslash is doubled only where it would otherwise read as such an escape (before
``\\``, ``x`` or an escaped character). Every other name, e.g. ``P1/ST1/IM_0001`` or
``DICOM\\IM1``, is its own location, as it always was. :func:`decode_location` gives the bytes
back, and every read goes through them, whatever the locale.

**What the walk counts.** Every entry below the root is one of: a regular file (a unit), or
skipped with a :class:`~pipeline.enums.SkipReason`: pacsflow's own temporary files
(``.*.tmp-*``, by design), symlinks (by default none is followed: a link whose target is inside
the root names what the walk reaches at its own path, so following it would index one object
twice; one that leaves the root is followed only when configured), broken links and link
loops, folders reached a second time, FIFOs, sockets and devices, and what cannot be read.
Names starting with a dot are entries like any other.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from pipeline.config import LimitsConfig
from pipeline.connectors.base import RawObject, Skipped, StoreResult, Unit, result_path
from pipeline.connectors.packages import iter_objects, open_member, sniff
from pipeline.dicom.atomic import TEMPORARY_GLOB, atomic_write_bytes
from pipeline.enums import QuarantineReason, SkipReason, SourceKind
from pipeline.errors import InputError, SourceError

logger = logging.getLogger(__name__)

__all__ = [
    "MEMBER_SEPARATOR",
    "FolderSource",
    "decode_location",
    "encode_location",
    "member_location",
    "split_location",
]

#: characters a location never shows as they are: control characters and undecodable bytes
_HIDDEN = "\x00-\x1f\x7f-\x9f\udc80-\udcff"
#: the text between the levels of a location inside a package (``a.zip!/m.dcm``); a ``!``
#: right before a ``/`` in any name is written ``\\x21`` so this text never occurs in one
MEMBER_SEPARATOR = "!/"
_TO_ESCAPE = re.compile(f"\\\\(?=[\\\\x{_HIDDEN}]|!/)|[{_HIDDEN}]|!(?=/)")
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2})")
_TEMPORARY = os.fsencode(TEMPORARY_GLOB)
_SNIFF = 512  # bytes that tell a compressed file or a package (tar: 262)


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return "".join(f"\\x{b:02x}" for b in ch.encode())


def encode_location(raw: bytes) -> str:
    """The location (printable UTF-8 text, one line) of a root-relative path given as bytes.

    Lossless: ``decode_location(encode_location(raw)) == raw`` for any bytes.

    Examples
    --------
    >>> encode_location(b"P1/IM_0001")
    'P1/IM_0001'
    >>> encode_location(b"bad\\xff\\nname.dcm")
    'bad\\\\xff\\\\x0aname.dcm'
    >>> encode_location(b"a\\\\b")
    'a\\\\b'
    """
    text = raw.decode("utf-8", "surrogateescape")
    if text.isprintable() and "\\" not in text and "!/" not in text:  # the common case, fast
        return text
    return _TO_ESCAPE.sub(_escape, text)


def decode_location(location: str) -> bytes:
    """The root-relative path (bytes) that :func:`encode_location` wrote as ``location``."""
    if "\\" not in location:
        return location.encode("utf-8", "surrogateescape")
    out = bytearray()
    pos = 0
    for m in _ESCAPED.finditer(location):
        out += location[pos : m.start()].encode("utf-8", "surrogateescape")
        code = m.group(1)
        out += b"\\" if code == "\\" else bytes((int(code[1:], 16),))
        pos = m.end()
    out += location[pos:].encode("utf-8", "surrogateescape")
    return bytes(out)


def member_location(parts: Sequence[bytes]) -> str:
    """The location of an object inside packages: the root-relative path of the file, then
    the member's name in each package, each part encoded by :func:`encode_location` and joined
    by ``!/`` (which no encoded part holds).

    Examples
    --------
    >>> member_location([b"P1/a.zip", b"dir/m.dcm"])
    'P1/a.zip!/dir/m.dcm'
    >>> member_location([b"odd!/name.zip", b"x.tar.gz", b"m!"])
    'odd\\\\x21/name.zip!/x.tar.gz!/m!'
    """
    return MEMBER_SEPARATOR.join(encode_location(p) for p in parts)


def split_location(location: str) -> list[bytes]:
    """The parts (bytes) :func:`member_location` joined: one for a file's own location."""
    return [decode_location(p) for p in location.split(MEMBER_SEPARATOR)]


@dataclass(frozen=True)
class FolderSource:
    """Every regular file below ``root`` is an object; ``location`` is its path relative to
    root (see :func:`encode_location`).

    Symlinks: one whose target lies inside the root is skipped (its target is walked at its
    own path); one that leaves the root is followed only with ``follow_symlinks_outside_root``
    (each folder is then entered once, by device and inode, so loops end), and reads refuse a
    location that leads out of the root otherwise. With ``follow_symlinks`` false no link is
    followed. Every entry passed over is a :class:`~pipeline.connectors.base.Skipped`.

    Compressed files and packages (:mod:`pipeline.connectors.packages`): a file that is a
    compressed stream is the object it decompresses to, at its own location; a package (zip,
    tar, compressed tar) is one unit (its size and mtime the watermark) whose members are
    objects at locations from :func:`member_location`; :meth:`open` reads them decompressed.
    """

    root: Path
    follow_symlinks: bool = True
    follow_symlinks_outside_root: bool = False
    kind: SourceKind = SourceKind.FOLDER
    #: bounds on compressed files and packages (``max_archive_depth`` 0: none is opened)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        root = Path(self.root).resolve()
        if encode_location(os.fsencode(root)) != str(root):
            raise SourceError(
                f"the archive root {encode_location(os.fsencode(root))} is not plain UTF-8 text "
                "(it holds bytes that are not UTF-8, a control character or a backslash escape): "
                "rename the folder or crawl its subfolders"
            )
        object.__setattr__(self, "root", root)

    @property
    def source_id(self) -> str:
        """The absolute folder path."""
        return str(self.root)

    def is_available(self) -> bool:
        """True when the root folder exists and can be listed."""
        return self.root.is_dir() and os.access(self.root, os.R_OK | os.X_OK)

    def check(self) -> None:
        """Raise :class:`SourceError` when the root folder is missing or unreadable."""
        if not self.is_available():
            raise SourceError(f"archive folder not found or not readable: {self.root}")

    def list_units(self) -> Iterator[Unit | Skipped]:
        """Walk the tree depth-first in sorted order (deterministic), yielding regular files
        and, for every other entry, why it was skipped.

        Each file is a unit whose watermark is its size and mtime.

        Raises
        ------
        SourceError
            When the root folder does not exist or cannot be read.
        """
        self.check()
        root = os.fsencode(self.root)
        st = os.stat(root)
        seen_dirs: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
        stack: list[tuple[bytes, bytes]] = [(root, b"")]
        while stack:
            folder, rel = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if not rel:
                    raise SourceError(f"cannot list the archive folder: {exc.strerror}") from None
                yield self._skip(rel, SkipReason.UNREADABLE, exc.strerror)
                continue
            subdirs: list[tuple[bytes, bytes]] = []
            for entry in entries:
                name = entry.name
                rel_e = rel + b"/" + name if rel else name
                if name[:1] == b"." and fnmatch.fnmatchcase(name, _TEMPORARY):
                    yield self._skip(rel_e, SkipReason.PACSFLOW_TEMPORARY)
                    continue
                try:
                    if entry.is_symlink():
                        est = self._link_target(entry, root)
                    else:
                        est = entry.stat(follow_symlinks=False)
                except _Skip as skip:
                    yield self._skip(rel_e, skip.reason, skip.detail)
                    continue
                except OSError as exc:
                    yield self._skip(rel_e, SkipReason.UNREADABLE, exc.strerror)
                    continue
                if stat.S_ISDIR(est.st_mode):
                    key = (est.st_dev, est.st_ino)
                    if key in seen_dirs:
                        yield self._skip(rel_e, SkipReason.FOLDER_REPEAT)
                        continue
                    seen_dirs.add(key)
                    subdirs.append((entry.path, rel_e))
                elif stat.S_ISREG(est.st_mode):
                    yield Unit(
                        encode_location(rel_e),
                        f"{est.st_size}:{est.st_mtime_ns}",
                        est.st_size,
                        est.st_mtime_ns,
                    )
                else:
                    yield self._skip(rel_e, SkipReason.NOT_REGULAR_FILE)
            stack.extend(reversed(subdirs))

    def _link_target(self, entry: os.DirEntry[bytes], root: bytes) -> os.stat_result:
        """The stat of the target of the symlink ``entry`` when the walk follows it, or
        :class:`_Skip` with why not."""
        if not self.follow_symlinks:
            raise _Skip(SkipReason.SYMLINK_NOT_FOLLOWED)
        try:
            target = os.stat(entry.path)
        except OSError as exc:  # dangling, or a loop (ELOOP)
            raise _Skip(SkipReason.BROKEN_SYMLINK, exc.strerror) from None
        if _inside(os.path.realpath(entry.path), root):
            raise _Skip(SkipReason.SYMLINK_INSIDE_ROOT)
        if not self.follow_symlinks_outside_root:
            raise _Skip(SkipReason.SYMLINK_OUTSIDE_ROOT)
        return target

    @staticmethod
    def _skip(rel: bytes, reason: SkipReason, detail: str | None = None) -> Skipped:
        location = encode_location(rel)
        logger.debug("skipped %s: %s%s", location, reason.value, f" ({detail})" if detail else "")
        return Skipped(location, reason)

    def read_unit(self, unit: Unit) -> Iterator[RawObject]:
        """A file is one object: hand its path to the parser (header only), or, when the
        file was swapped for a link out of the root since the listing, an error that
        quarantines it. A compressed file is the object it decompresses to, and a package
        one object per member (its stream, decompressed), links and duplicates skipped."""
        path = self.path_of(unit.key)
        # the listing never makes a unit of a link unless links may leave the root: one lstat
        # here (a realpath per object would cost more than reading a small header)
        if not self.follow_symlinks_outside_root and os.path.islink(path):
            real = os.path.realpath(os.fsencode(path))
            if not _inside(real, os.fsencode(self.root)):
                error = self._outside(unit.key)
                yield RawObject(unit.key, unit.key, unit.size_bytes, unit.mtime_ns, error=error)
                return
        plain = RawObject(
            location=unit.key,
            unit_key=unit.key,
            size_bytes=unit.size_bytes,
            mtime_ns=unit.mtime_ns,
            path=path,
        )
        if self.limits.max_archive_depth == 0:
            yield plain
            return
        try:
            fp = open(path, "rb")  # noqa: SIM115 (closed below)
        except OSError:
            yield plain  # the parser opens it again and says why it cannot
            return
        with fp:
            try:
                head = fp.read(_SNIFF)
                fp.seek(0)
            except OSError:
                head = b""
            if sniff(head) is None:
                # the parser reads this open file (the crawl parses each object before it
                # asks for the next): one open a file, as before packages were looked for
                yield replace(plain, stream=fp)
                return
            for m in iter_objects(fp, [decode_location(unit.key)], self.limits):
                location = member_location(m.parts)
                if m.stream is None and m.error is None and m.skip is None:
                    yield plain  # pragma: no cover (sniffed as a package, reads as a file)
                    continue
                yield RawObject(
                    location=location,
                    unit_key=unit.key,
                    size_bytes=m.size if m.stream is not None else None,
                    mtime_ns=unit.mtime_ns,
                    stream=m.stream,
                    error=m.error,
                    skip=m.skip,
                )

    def path_of(self, location: str) -> Path:
        """The absolute path of an object, refusing locations that escape the root."""
        raw = decode_location(location)
        if raw.startswith(b"/") or b".." in raw.split(b"/"):
            raise SourceError(f"location escapes the archive root: {location}")
        return Path(os.fsdecode(os.path.join(os.fsencode(self.root), raw)))

    def open(self, location: str) -> BinaryIO:
        """Open an object for binary reading: a file as it is, or the decompressed bytes of a
        compressed file or of a package's member (a seekable spooled copy, within the
        ``limits``).

        Raises
        ------
        InputError
            When the file opened lies outside the archive root (a symlink on the way) and
            ``follow_symlinks_outside_root`` is false: it is closed unread. For a member: it
            cannot be read (``too_large``, ``encrypted``, ``corrupt_archive``, ...) or is not
            in its package any more.
        """
        parts = location.split(MEMBER_SEPARATOR)
        if len(parts) > 1 and self.limits.max_archive_depth == 0:
            raise InputError(
                f"{location} is inside a package and limits.max_archive_depth is 0",
                reason=QuarantineReason.UNREADABLE,
            )
        path = self.path_of(parts[0])
        fp = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        if not self.follow_symlinks_outside_root:
            try:
                # the file actually opened (no window between a check and the open), by its fd
                real = os.readlink(f"/proc/self/fd/{fp.fileno()}".encode())
            except OSError:  # no /proc: resolve the path instead
                real = os.path.realpath(os.fsencode(path))
            if not _inside(real, os.fsencode(self.root)):
                fp.close()
                raise self._outside(location)
        if self.limits.max_archive_depth == 0:
            return fp
        try:
            st = os.fstat(fp.fileno())
            key = (os.fsencode(path), st.st_size, st.st_mtime_ns)
            names = [decode_location(p) for p in parts[1:]]
            return open_member(fp, names, self.limits, cache_key=key)
        except BaseException:
            fp.close()
            raise

    @staticmethod
    def _outside(location: str) -> InputError:
        return InputError(
            f"{location} leads out of the archive root through a symlink; not read "
            "(source.follow_symlinks_outside_root allows it)",
            reason=QuarantineReason.UNREADABLE,
        )

    # ---------------------------------------------------------------- as a write-back destination

    def store(self, files: list[Path]) -> list[StoreResult]:
        """Copy each file (atomically) to ``<root>/<study>/<series>/<sop>.dcm``."""
        import pydicom

        results = []
        for f in files:
            data = f.read_bytes()
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            target = result_path(
                self.root, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            try:
                _atomic_write(target, data)
            except OSError as exc:
                raise SourceError(f"cannot write into {self.root}: {exc.strerror}") from None
            results.append(StoreResult(str(ds.SOPInstanceUID), True, "written"))
        return results

    def confirm(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """The file is there and is that object."""
        import pydicom

        path = result_path(self.root, study_uid, series_uid, sop_uid)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (OSError, ValueError, EOFError):
            return False
        return str(ds.get("SOPInstanceUID", "")) == sop_uid


class _Skip(Exception):
    """An entry the walk passes over (internal: becomes a :class:`Skipped`)."""

    def __init__(self, reason: SkipReason, detail: str | None = None) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.detail = detail


def _inside(real: bytes, root: bytes) -> bool:
    """Whether the resolved path ``real`` is ``root`` or below it."""
    return real == root or real.startswith(root.rstrip(b"/") + b"/")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it into place."""
    atomic_write_bytes(path, data)
