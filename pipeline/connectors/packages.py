"""Compressed files and packages inside a folder archive: archives within the archive.

A file of a folder archive may be a compressed stream (gzip, bzip2, xz: e.g. ``IM1.dcm.gz``)
or a package (zip, tar, and tar compressed by any of the three), found by its first bytes,
never by its name (a ``.dcm`` that is really gzip is common). A compressed stream is
transparent: the object is what it decompresses to, at the file's own location. A package
holds objects of its own, one per member, each at a location naming the member
(``a.zip!/dir/m.dcm``, see :func:`~pipeline.connectors.folder.member_location`); packages and
streams nest (``a.zip!/b.tar.gz!/c.dcm.gz``).

Everything is bounded by the configuration's ``limits``, before or while it is read, never
after: one member decompresses to at most ``max_decompressed_bytes`` (counted as it streams,
whatever its header declares; a zip member declaring more is refused unread), a package holds
at most ``max_archive_members`` members, and an object lies inside at most
``max_archive_depth`` containers (each compressed stream and each package is one; 0 reads
every file as it is, as before). A member is decompressed into a spooled temporary file
(memory up to 16 MiB, then an unnamed temporary file), so memory stays flat whatever the ratio.
What cannot be read is an :class:`~pipeline.errors.InputError` with a reason: ``too_large``,
``encrypted``, ``corrupt_archive``, ``truncated`` or ``undecodable`` (a zip compression
method Python cannot read); a member that is a link, a device or a FIFO is skipped with its
reason, and a second member of a name already seen (zip and tar allow it) is skipped as a
duplicate: the first one of a name is the object.
"""

from __future__ import annotations

import atexit
import bz2
import collections
import gzip
import io
import lzma
import os
import stat
import tarfile
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO, Any, BinaryIO, Final, Literal, cast

from pipeline.config import LimitsConfig
from pipeline.enums import QuarantineReason, SkipReason
from pipeline.errors import InputError, TooLarge, UnreadableDicom

__all__ = ["Member", "PackageKind", "clear_tar_cache", "iter_objects", "open_member", "sniff"]

PackageKind = Literal["gzip", "bzip2", "xz", "zip", "tar"]
_STREAMS: Final = ("gzip", "bzip2", "xz")
_HEAD: Final = 512
_CHUNK: Final = 1 << 20
_SPOOL: Final = 16 << 20
_MiB: Final = 1 << 20


def sniff(head: bytes) -> PackageKind | None:
    """What a file's first bytes (512 are enough) say it is; None: anything else (DICOM,
    or not DICOM: the parser says).

    A DICOM file (``DICM`` at offset 128) is DICOM whatever its preamble holds (a preamble
    may be a TIFF or zip header on purpose).

    Examples
    --------
    >>> sniff(b"\\x1f\\x8b\\x08\\x00")
    'gzip'
    >>> sniff(bytes(128) + b"DICM") is None
    True
    """
    if head[128:132] == b"DICM":
        return None
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    return None


@dataclass
class Member:
    """One entry found inside a file: an object (``stream`` set: its bytes, decompressed,
    seekable, at 0), a member passed over (``skip`` set) or one that cannot be read
    (``error`` set). The caller closes ``stream``."""

    parts: list[bytes]
    size: int | None = None
    stream: BinaryIO | None = None
    skip: SkipReason | None = None
    error: InputError | None = None


def _mib(n: int) -> str:
    return f"{n / _MiB:.0f} MiB" if n >= _MiB else f"{n} bytes"


def _head(fp: IO[bytes]) -> bytes:
    start = fp.tell()
    head = fp.read(_HEAD)
    fp.seek(start)
    return head


def _corrupt(what: str) -> InputError:
    return InputError(what, reason=QuarantineReason.CORRUPT_ARCHIVE)


def _decompressor(kind: PackageKind, fp: IO[bytes]) -> IO[bytes]:
    if kind == "gzip":
        return cast("IO[bytes]", gzip.GzipFile(fileobj=fp, mode="rb"))
    if kind == "bzip2":
        return cast("IO[bytes]", bz2.BZ2File(fp))
    return cast("IO[bytes]", lzma.LZMAFile(fp))


def _copy(src: IO[bytes], limits: LimitsConfig, what: str) -> tuple[BinaryIO, int]:
    """``src`` read to its end into a spooled temporary file, in 1 MiB steps, refusing more
    than ``limits.max_decompressed_bytes``: (the copy at 0, its size).

    Raises
    ------
    TooLarge
        Past the bound (nothing more is read).
    UnreadableDicom
        The stream ends early (``truncated``).
    InputError
        The stream is corrupt (``corrupt_archive``).
    """
    cap = limits.max_decompressed_bytes
    out = cast("BinaryIO", tempfile.SpooledTemporaryFile(max_size=_SPOOL))  # noqa: SIM115
    total = 0
    try:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > cap:
                raise TooLarge(
                    f"{what} decompresses to more than {_mib(cap)}, beyond "
                    "limits.max_decompressed_bytes (not read further)"
                )
            out.write(chunk)
    except EOFError:
        out.close()
        raise UnreadableDicom(
            f"{what} ends early (truncated)", reason=QuarantineReason.TRUNCATED
        ) from None
    except (OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, tarfile.TarError) as exc:
        out.close()
        raise _corrupt(f"{what} is corrupt ({type(exc).__name__})") from None
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out, total


def _unwrap(
    fp: IO[bytes], depth: int, limits: LimitsConfig, owned: bool
) -> tuple[PackageKind | None, IO[bytes], int, bool]:
    """Peel the compressed streams off ``fp``: (what is left: None for an object, "zip" or
    "tar"; a stream of it at its start, seekable unless a compressed tar is streamed; the
    depth reached; whether the caller must close that stream, which then closes what it
    reads from).

    A compressed tar is handed back as its decompressing stream (read once, member by member:
    never the whole tar in a temporary file); any other compressed content is decompressed
    into a spooled file, within the bounds. ``fp`` is closed on an error when ``owned``.
    """
    try:
        while True:
            kind = sniff(_head(fp))
            if kind is None:
                return None, fp, depth, owned
            depth = _deeper(kind, depth, limits)
            if kind not in _STREAMS:
                return kind, fp, depth, owned
            start = fp.tell()
            try:
                inner = _decompressor(kind, fp).read(_HEAD)
            except EOFError:
                raise UnreadableDicom(
                    f"the {kind} stream ends early (truncated)",
                    reason=QuarantineReason.TRUNCATED,
                ) from None
            except (OSError, zlib.error, lzma.LZMAError) as exc:
                raise _corrupt(f"the {kind} stream is corrupt ({type(exc).__name__})") from None
            fp.seek(start)
            if sniff(inner) == "tar":
                depth = _deeper("tar", depth, limits)
                owning = _Owning(_decompressor(kind, fp), fp if owned else None)
                return "tar", cast("IO[bytes]", owning), depth, True
            copy, _ = _copy(_decompressor(kind, fp), limits, f"the {kind} stream")
            if owned:
                fp.close()
            fp, owned = copy, True
    except BaseException:
        if owned:
            fp.close()
        raise


def _deeper(kind: str, depth: int, limits: LimitsConfig) -> int:
    depth += 1
    if depth > limits.max_archive_depth:
        raise TooLarge(
            f"a {kind} nested {depth} deep, beyond limits.max_archive_depth "
            f"({limits.max_archive_depth})"
        )
    return depth


class _Owning(io.RawIOBase):
    """A decompressing stream read by ``tarfile`` that closes, with itself, the spooled
    file it decompresses from."""

    def __init__(self, inner: IO[bytes], owned: IO[bytes] | None) -> None:
        super().__init__()
        self._inner = inner
        self._owned = owned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
            if self._owned is not None:
                self._owned.close()
        super().close()


def _zip(fp: IO[bytes], limits: LimitsConfig) -> zipfile.ZipFile:
    """Open a zip, its members counted first (from its end record: no central directory of
    millions of entries is read)."""
    end = getattr(zipfile, "_EndRecData")(fp)  # noqa: B009 (the stdlib's own EOCD reader)
    if end is None:
        raise _corrupt("the zip has no central directory (corrupt or truncated)")
    if int(end[4]) > limits.max_archive_members:
        raise TooLarge(
            f"the zip holds {int(end[4])} members, beyond limits.max_archive_members "
            f"({limits.max_archive_members})"
        )
    fp.seek(0)
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _corrupt(f"the zip cannot be read ({type(exc).__name__})") from None
    return zf


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: LimitsConfig) -> BinaryIO:
    """One zip member's bytes, decompressed within the bounds."""
    if info.flag_bits & 0x1:
        raise InputError(
            "the zip member is encrypted: pacsflow holds no password; decrypt the package",
            reason=QuarantineReason.ENCRYPTED,
        )
    if info.file_size > limits.max_decompressed_bytes:
        raise TooLarge(
            f"the zip member declares {_mib(info.file_size)}, beyond "
            f"limits.max_decompressed_bytes ({_mib(limits.max_decompressed_bytes)}); not read"
        )
    try:
        src = zf.open(info)
    except NotImplementedError:
        raise InputError(
            f"the zip member uses compression method {info.compress_type}, which cannot be "
            "read here; repack it with deflate, bzip2 or lzma",
            reason=QuarantineReason.UNDECODABLE,
        ) from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _corrupt(f"the zip member cannot be read ({type(exc).__name__})") from None
    with src:
        out, _ = _copy(src, limits, "the zip member")
    return out


def _zip_skip(info: zipfile.ZipInfo) -> SkipReason | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return SkipReason.ARCHIVE_LINK
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded
        return SkipReason.NOT_REGULAR_FILE
    return None


def _name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _tar(fp: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(
            fileobj=fp, mode="r|", encoding="utf-8", errors="surrogateescape", ignore_zeros=False
        )
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise _corrupt(f"the tar cannot be read ({type(exc).__name__})") from None


def _tar_skip(ti: tarfile.TarInfo) -> SkipReason | None:
    if ti.issym() or ti.islnk():
        return SkipReason.ARCHIVE_LINK
    if not ti.isfile():
        return SkipReason.NOT_REGULAR_FILE
    return None


def _tar_next(tf: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return tf.next()
    except EOFError:
        raise UnreadableDicom(
            "the tar ends early (truncated)", reason=QuarantineReason.TRUNCATED
        ) from None
    except (tarfile.TarError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise _corrupt(f"the tar is corrupt ({type(exc).__name__})") from None


def _tar_member(tf: tarfile.TarFile, ti: tarfile.TarInfo, limits: LimitsConfig) -> BinaryIO:
    if ti.size > limits.max_decompressed_bytes:
        raise TooLarge(
            f"the tar member declares {_mib(ti.size)}, beyond limits.max_decompressed_bytes "
            f"({_mib(limits.max_decompressed_bytes)}); not read"
        )
    src = tf.extractfile(ti)
    if src is None:  # pragma: no cover (regular files always have data)
        raise _corrupt("the tar member has no data")
    out, n = _copy(src, limits, "the tar member")
    if n != ti.size:
        out.close()
        raise UnreadableDicom("the tar ends early (truncated)", reason=QuarantineReason.TRUNCATED)
    return out


def iter_objects(
    fp: IO[bytes], parts: list[bytes], limits: LimitsConfig, *, depth: int = 0
) -> Iterator[Member]:
    """Every object in the file ``fp`` (seekable, at 0) whose location parts are ``parts``.

    A plain file yields one member without a stream (the caller reads the file itself). A
    member's stream is valid until the iteration resumes; it is closed then.
    Per-object problems are members with ``error`` set; one that concerns a whole package (it
    is corrupt, truncated past its last good member, holds too many members) is a member at
    the package's own location, after its good members.
    """
    try:
        kind, stream, depth, owned = _unwrap(fp, depth, limits, owned=False)
    except InputError as exc:
        yield Member(parts, error=exc)
        return
    try:
        if kind is None:
            size = stream.seek(0, 2)
            stream.seek(0)
            yield Member(parts, size=size, stream=cast("BinaryIO", stream) if owned else None)
        elif kind == "zip":
            yield from _iter_zip(stream, parts, limits, depth)
        else:
            yield from _iter_tar(stream, parts, limits, depth)
    finally:
        if owned:
            stream.close()


def _each(
    parts: list[bytes],
    name: bytes,
    seen: set[bytes],
    skip: SkipReason | None,
    read: Callable[[], BinaryIO],
    limits: LimitsConfig,
    depth: int,
) -> Iterator[Member]:
    """The objects of one package member (itself, or what it holds when it is a package)."""
    here = [*parts, name]
    if name in seen:
        yield Member(here, skip=SkipReason.ARCHIVE_DUPLICATE)
        return
    seen.add(name)
    if skip is not None:
        yield Member(here, skip=skip)
        return
    try:
        data = read()
    except InputError as exc:
        yield Member(here, error=exc)
        return
    with data:
        for m in iter_objects(data, here, limits, depth=depth):
            if m.stream is None and m.skip is None and m.error is None:
                m.stream = data  # a plain member: its own bytes
            yield m


def _too_many(parts: list[bytes], kind: str, limits: LimitsConfig) -> Member:
    return Member(
        parts,
        error=TooLarge(
            f"the {kind} holds more than {limits.max_archive_members} members, beyond "
            "limits.max_archive_members: the rest is not read"
        ),
    )


def _iter_zip(
    fp: IO[bytes], parts: list[bytes], limits: LimitsConfig, depth: int
) -> Iterator[Member]:
    try:
        zf = _zip(fp, limits)
    except InputError as exc:
        yield Member(parts, error=exc)
        return
    seen: set[bytes] = set()
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            yield from _each(
                parts,
                _name(info.filename),
                seen,
                _zip_skip(info),
                partial(_zip_member, zf, info, limits),
                limits,
                depth,
            )


def _iter_tar(
    fp: IO[bytes], parts: list[bytes], limits: LimitsConfig, depth: int
) -> Iterator[Member]:
    seen: set[bytes] = set()
    n = 0
    try:
        tf = _tar(fp)
        while (ti := _tar_next(tf)) is not None:
            if ti.isdir():
                continue
            n += 1
            if n > limits.max_archive_members:
                yield _too_many(parts, "tar", limits)
                return
            yield from _each(
                parts,
                _name(ti.name),
                seen,
                _tar_skip(ti),
                partial(_tar_member, tf, ti, limits),
                limits,
                depth,
            )
    except InputError as exc:
        yield Member(parts, error=exc)


#: decompressed copies of compressed tars being read back, most recent last:
#: key (path, size, mtime) -> an unlinked temporary file (its file descriptor) or None when the
#: tar is too big to keep (then each member is streamed as before)
_TAR_CACHE: collections.OrderedDict[tuple[bytes, int, int], _Cached | None] = (
    collections.OrderedDict()
)
_TAR_CACHE_LOCK = threading.Lock()
_TAR_CACHE_ENTRIES: Final = 2


@dataclass
class _Cached:
    """A decompressed tar kept open (unlinked) and where each member's data lies in it."""

    held: IO[bytes]
    #: member name -> (offset of its data, size), the first member of a name, regular files
    #: only (a link or device: None, as the crawl skipped it)
    index: dict[bytes, tuple[int, int] | None]


def clear_tar_cache() -> None:
    """Close and forget the decompressed tars kept by this process."""
    with _TAR_CACHE_LOCK:
        for cached in _TAR_CACHE.values():
            if cached is not None:
                cached.held.close()
        _TAR_CACHE.clear()


atexit.register(clear_tar_cache)


def _reopen(held: IO[bytes]) -> IO[bytes]:
    """A new reader of an unlinked file, with its own offset (Linux /proc/self/fd)."""
    return open(f"/proc/self/fd/{held.fileno()}", "rb")


def _decompressed_tar(
    key: tuple[bytes, int, int], fp: IO[bytes], limits: LimitsConfig
) -> _Cached | None:
    """The decompressed tar inside the compressed file ``fp`` (the package at ``key``), made
    once per process and kept (two packages at most), or None: ``fp`` is no compressed tar,
    the tar is beyond ``limits.max_package_cache_bytes``, it cannot be read whole (its
    members then fail as the crawl saw them), or this system cannot reopen an unlinked file.
    The copy is an unnamed file: nothing is left on disk."""
    cap = limits.max_package_cache_bytes
    if cap <= 0 or not os.path.isdir("/proc/self/fd"):
        return None
    with _TAR_CACHE_LOCK:
        if key in _TAR_CACHE:
            _TAR_CACHE.move_to_end(key)
            return _TAR_CACHE[key]
    kind = sniff(_head(fp))
    if kind not in _STREAMS:
        return None
    start = fp.tell()
    try:
        if sniff(_decompressor(kind, fp).read(_HEAD)) != "tar":
            return None
    except (EOFError, OSError, zlib.error, lzma.LZMAError):
        return None  # open_member says what is wrong with it
    finally:
        fp.seek(start)
    held = cast("IO[bytes]", tempfile.TemporaryFile())  # noqa: SIM115 (kept open in the cache)
    cached: _Cached | None = None
    try:
        total = 0
        src = _decompressor(kind, fp)
        while chunk := src.read(_CHUNK):
            total += len(chunk)
            if total > cap:
                break
            held.write(chunk)
        else:
            held.flush()
            held.seek(0)
            index: dict[bytes, tuple[int, int] | None] = {}
            with tarfile.open(
                fileobj=held, mode="r:", encoding="utf-8", errors="surrogateescape"
            ) as tf:
                for ti in tf:
                    name = _name(ti.name)
                    if ti.isdir() or name in index:
                        continue
                    index[name] = None if _tar_skip(ti) else (ti.offset_data, ti.size)
            cached = _Cached(held, index)
    except (EOFError, OSError, zlib.error, lzma.LZMAError, tarfile.TarError):
        cached = None  # streamed as before: its error is the member's
    finally:
        fp.seek(start)
        if cached is None:
            held.close()
    with _TAR_CACHE_LOCK:
        _TAR_CACHE[key] = cached
        while len(_TAR_CACHE) > _TAR_CACHE_ENTRIES:
            _, old = _TAR_CACHE.popitem(last=False)
            if old is not None:
                old.held.close()
    return cached


def _cached_member(cached: _Cached, name: bytes, limits: LimitsConfig) -> BinaryIO:
    where = cached.index.get(name)
    if where is None:
        raise _missing()
    offset, size = where
    if size > limits.max_decompressed_bytes:
        raise TooLarge(
            f"the tar member declares {_mib(size)}, beyond limits.max_decompressed_bytes "
            f"({_mib(limits.max_decompressed_bytes)}); not read"
        )
    with _reopen(cached.held) as reader:
        reader.seek(offset)
        out, n = _copy(cast("IO[bytes]", _Limited(reader, size)), limits, "the tar member")
    if n != size:
        out.close()
        raise UnreadableDicom("the tar ends early (truncated)", reason=QuarantineReason.TRUNCATED)
    return out


class _Limited(io.RawIOBase):
    """The next ``size`` bytes of a stream."""

    def __init__(self, inner: IO[bytes], size: int) -> None:
        self._inner, self._left = inner, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        n = self._inner.readinto(view)  # type: ignore[attr-defined]
        self._left -= n or 0
        return n or 0


def open_member(
    fp: IO[bytes],
    names: list[bytes],
    limits: LimitsConfig,
    cache_key: tuple[bytes, int, int] | None = None,
) -> BinaryIO:
    """The decompressed bytes of the object inside the file ``fp`` reached by ``names`` (one
    name per package on the way; none: the file itself, decompressed), read as the crawl read
    it (the first member of a name), within the bounds. ``fp`` is closed unless it is what is
    handed back (a plain file); the caller closes what it gets.

    Raises
    ------
    InputError
        The member is not there any more, or cannot be read (its reason as the crawl gives).
    """
    to_close: list[IO[bytes]] = [fp]
    current: IO[bytes] = fp
    depth = 0
    if cache_key is not None and names:
        # a compressed tar read member by member: decompressed once, kept for the next ones
        cached = _decompressed_tar(cache_key, fp, limits)
        if cached is not None:
            fp.close()
            found = _cached_member(cached, names[0], limits)
            if len(names) > 1:
                return open_member(found, names[1:], limits)  # closes found unless returned
            try:
                kind, inner, _, owned = _unwrap(found, 2, limits, owned=False)
            except BaseException:
                found.close()
                raise
            if kind is not None:
                found.close()
                raise InputError(
                    "a package, not an object: its members are objects",
                    reason=QuarantineReason.NOT_DICOM,
                )
            if inner is not found:
                found.close()
            return cast("BinaryIO", inner)
    try:
        for name in [*names, None]:
            kind, current, depth, owned = _unwrap(current, depth, limits, owned=False)
            if owned:
                to_close.append(current)
            if name is None:
                if kind is not None:
                    raise InputError(
                        "a package, not an object: its members are objects",
                        reason=QuarantineReason.NOT_DICOM,
                    )
                to_close = [f for f in to_close if f is not current]
                return cast("BinaryIO", current)
            if kind is None:
                raise _missing()
            current = (_zip_find if kind == "zip" else _tar_find)(current, name, limits)
            to_close.append(current)
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        for f in reversed(to_close):
            f.close()


def _missing() -> InputError:
    return InputError(
        "the package member is not there any more: the package changed since the crawl "
        "(crawl again)",
        reason=QuarantineReason.UNREADABLE,
    )


def _zip_find(fp: IO[bytes], name: bytes, limits: LimitsConfig) -> BinaryIO:
    zf = _zip(fp, limits)
    with zf:
        for info in zf.infolist():
            if _name(info.filename) == name and not info.is_dir():
                if _zip_skip(info) is not None:
                    raise _missing()
                return _zip_member(zf, info, limits)
    raise _missing()


def _tar_find(fp: IO[bytes], name: bytes, limits: LimitsConfig) -> BinaryIO:
    tf = _tar(fp)
    while (ti := _tar_next(tf)) is not None:
        if _name(ti.name) == name and not ti.isdir():
            if _tar_skip(ti) is not None:
                raise _missing()
            return _tar_member(tf, ti, limits)
    raise _missing()
