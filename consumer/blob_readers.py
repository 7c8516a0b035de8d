"""Blob references read from the worker's own storage: `file://` inside configured roots.

(`s3://` lives in consumer/s3_reader.py.) A reader refuses what it may not read before reading it, and
never blocks on a file that is not a regular one.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path
from typing import Final, Iterable, Protocol, Sequence
from urllib.parse import unquote, urlsplit

from imgstream.analysis.imaging import FETCH_FAILED, TOO_LARGE, ImageError
from imgstream.schemas.config import BlobReads


class BlobReader(Protocol):
    """Reads one blob reference (e.g. file:///a.jpg, s3://bucket/key) of a scheme it owns.

    A reader that can answer some references at once, without waiting on anything, may also have
    `read_now(reference, max_bytes) -> bytes | None` (None: ask `read`); the fetcher then skips the
    deadline and the concurrency slot for them.
    """

    async def read(self, reference: str, max_bytes: int) -> bytes:
        """The blob's bytes; ImageError(image_too_large) past `max_bytes`, image_fetch_failed otherwise."""
        ...


class FileBlobReader:
    """file:// references to local paths inside the configured root directories (none: refuse all).

    `reads`: where the file is read. "thread": always in the loop's thread pool, for storage that can
    block (NFS, FUSE). "inline": a plain reference to a file of at most INLINE_READ_BYTES on the event
    loop itself (the quick route: a handful of syscalls, tens of microseconds against a thread hop's
    hundred or more), everything else in the pool. "auto": inline when every root lies on a local
    file system (by /proc/self/mountinfo, with nothing else mounted beneath it), thread otherwise.
    """

    def __init__(self, roots: Sequence[str], *, reads: BlobReads = "auto") -> None:
        self._roots = [Path(os.path.realpath(os.path.expanduser(root))) for root in roots]
        # The roots as path prefixes, for the quick route's containment check.
        self._prefixes = tuple(str(root).rstrip("/") + "/" for root in self._roots)
        self.inline = _QUICK_ROUTE and (reads == "inline" or (reads == "auto" and _roots_are_local(self._roots)))

    def read_now(self, reference: str, max_bytes: int) -> bytes | None:
        """The bytes, read on the calling thread, when this reader reads inline and `reference` is a
        plain one to a small regular file inside the roots; None when `read` must decide."""
        return self._read_quickly(reference, min(max_bytes, INLINE_READ_BYTES)) if self.inline else None

    async def read(self, reference: str, max_bytes: int) -> bytes:
        data = self.read_now(reference, max_bytes)
        if data is not None:
            return data
        # File systems (NFS, FUSE) can block, and resolving the path is a syscall per component:
        # both stay off the event loop. (No context copy as asyncio.to_thread makes: nothing here logs.)
        return await asyncio.get_running_loop().run_in_executor(None, self._read, reference, max_bytes)

    def _read(self, reference: str, max_bytes: int) -> bytes:
        data = self._read_quickly(reference, max_bytes) if _QUICK_ROUTE else None
        if data is not None:
            return data
        return _read_regular_file(self._checked_path(reference), reference, max_bytes)

    def _read_quickly(self, reference: str, max_bytes: int) -> bytes | None:
        """The bytes of a plain file:///path inside the roots, of at most `max_bytes`, resolved by the
        kernel: the file opened by O_PATH (which opens nothing for I/O: no device or FIFO acts on it),
        its real path read back from /proc/self/fd, then that very file reopened for reading (no
        symlink can be swapped in between). None for anything else, and for every refusal: the full
        route (realpath, then open) decides those and words their errors."""
        if not reference.startswith("file:///") or not _PLAIN_PATH.fullmatch(reference, 7):
            return None  # quoting, queries, dot segments, control characters, //: urlsplit and realpath's
        try:
            located = os.open(reference[7:], _LOCATE_FLAGS)
        except (OSError, ValueError):
            return None
        try:
            real = os.readlink(f"/proc/self/fd/{located}")
            if not real.startswith(self._prefixes) and real + "/" not in self._prefixes:
                return None
            info = os.fstat(located)
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                return None
            fd = os.open(f"/proc/self/fd/{located}", _OPEN_FLAGS)
        except OSError:
            return None
        finally:
            os.close(located)
        try:
            # To the end of the file, as the full route reads (some file systems return short reads).
            data = os.read(fd, info.st_size + 1)
            while len(data) <= info.st_size:
                more = os.read(fd, info.st_size + 1 - len(data))
                if not more:
                    break
                data += more
        except OSError:
            return None
        finally:
            os.close(fd)
        # More than fstat said: it grew meanwhile; the full route reads it to its end, or refuses it.
        return data if len(data) <= info.st_size else None

    def _checked_path(self, reference: str) -> Path:
        """The real path behind `reference`, refused when it is not local or lies outside the roots."""
        parts = urlsplit(reference)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(FETCH_FAILED, f"blob {reference!r} names host {parts.netloc!r}; only local files are read")
        raw_path = unquote(parts.path)
        if not raw_path.startswith("/"):
            raise ImageError(FETCH_FAILED, f"blob {reference!r} is not an absolute path (use file:///path)")
        # realpath resolves symlinks and "..", so a link inside a root cannot lead outside it.
        path = Path(os.path.realpath(raw_path))
        if not any(path.is_relative_to(root) for root in self._roots):
            allowed = ", ".join(str(root) for root in self._roots) or "none"
            raise ImageError(
                FETCH_FAILED,
                f"blob {reference!r} is outside the blob roots (fetch.blob_roots: {allowed}); add its directory to "
                "fetch.blob_roots (IMGSTREAM_FETCH__BLOB_ROOTS or worker --blob-root) to allow it",
            )
        return path


# Opening a FIFO for reading blocks until a writer comes, and opening a device may act on it:
# open without blocking (no controlling terminal either), then look at what was opened.
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
# FileBlobReader's quick route: Linux's O_PATH and /proc/self/fd; elsewhere only the full one.
_QUICK_ROUTE: Final = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")
_LOCATE_FLAGS: Final = getattr(os, "O_PATH", 0) | getattr(os, "O_CLOEXEC", 0)
# What the quick route takes after file://: absolute paths of printable ASCII and non-ASCII characters,
# without %-escapes, queries or fragments, dot segments (., .., hidden files: realpath's), or //.
_SEGMENT: Final = r"[^\x00-\x20\x7f%?#/.][^\x00-\x20\x7f%?#/]*"
_PLAIN_PATH: Final = re.compile(rf"/(?:{_SEGMENT}(?:/{_SEGMENT})*/?)?")  # one way to match: linear time


# The largest file read on the event loop: a local disk's cold read of this much is well under a
# millisecond; bigger ones (rare among images) go to the thread pool.
INLINE_READ_BYTES: Final = 1 << 20
# File systems whose metadata and reads are served by this host (a disk, memory, an image layer):
# anything else (nfs, cifs, fuse.*, 9p, ceph, virtiofs...) may wait on a network or a daemon.
LOCAL_FILE_SYSTEMS: Final = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "jfs", "reiserfs",
    "tmpfs", "ramfs", "overlay", "squashfs", "erofs", "vfat", "exfat", "ntfs3", "iso9660",
})
_MOUNTINFO: Final = "/proc/self/mountinfo"


def mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of each line of a /proc/<pid>/mountinfo text."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        if len(fields) <= separator + 1:
            continue
        # Spaces, tabs, newlines and backslashes in a path are written as octal escapes (\040...).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        found.append((point, fields[separator + 1]))
    return found


def roots_on_local_file_systems(roots: Iterable[Path], mount_table: Sequence[tuple[str, str]]) -> bool:
    """Whether each root's own mount is local and nothing non-local is mounted beneath it."""
    def inside(path: str, point: str) -> bool:
        return path == point or path.startswith(point.rstrip("/") + "/")

    for root in map(str, roots):
        own = [(point, kind) for point, kind in mount_table if inside(root, point)]
        # The deepest mount point holds the root; of two on one point, the later one (it hides the first).
        if not own or max(reversed(own), key=lambda mount: len(mount[0]))[1] not in LOCAL_FILE_SYSTEMS:
            return False
        if any(inside(point, root) and kind not in LOCAL_FILE_SYSTEMS for point, kind in mount_table):
            return False
    return True


def _roots_are_local(roots: Iterable[Path]) -> bool:
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as handle:
            return roots_on_local_file_systems(roots, mounts(handle.read()))
    except OSError:
        return False


def _read_regular_file(path: Path, reference: str, max_bytes: int) -> bytes:
    """Read at most max_bytes from a regular file (never a device, FIFO or socket, and never blocking on one)."""
    try:
        # O_NONBLOCK means nothing to a regular file's reads, and nothing else is read.
        with os.fdopen(os.open(path, _OPEN_FLAGS), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(FETCH_FAILED, f"blob {reference!r} is not a regular file")
            if info.st_size > max_bytes:
                message = f"blob {reference!r} is {info.st_size} bytes, over the limit of {max_bytes}"
                raise ImageError(TOO_LARGE, message)
            data = handle.read(max_bytes + 1)  # +1: the file may have grown since fstat
    except FileNotFoundError:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} not found") from None
    except IsADirectoryError:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} is not a regular file") from None
    except OSError as exc:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} could not be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ImageError(TOO_LARGE, f"blob {reference!r} is over the limit of {max_bytes} bytes")
    return data


# --- http(s) -------------------------------------------------------------------------------
