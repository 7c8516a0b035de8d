"""The blob store that local images travel through: requests carry references, never bytes.

A directory store by default (`file://` references on a volume the workers share).
Object stores plug in by scheme; none is built in yet, and asking for one says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Protocol


class BlobStore(Protocol):
    def put_file(self, path: Path) -> str: ...

    def put_bytes(self, data: bytes, suffix: str) -> str: ...


class DirectoryBlobStore:
    """Content-addressed files under one directory: the same image is stored once."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().resolve()

    def _target(self, digest: str, suffix: str) -> Path:
        return self.directory / digest[:2] / f"{digest}{suffix.lower()}"

    def put_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        target = self._target(digest.hexdigest(), path.suffix)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(target)  # atomic: a worker never reads a half-written blob
        return target.as_uri()

    def put_bytes(self, data: bytes, suffix: str) -> str:
        target = self._target(hashlib.sha256(data).hexdigest(), suffix)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
        return target.as_uri()


def open_blob_store(location: str) -> BlobStore:
    """A store for `location`: a directory path or file:// URI; other schemes are not built in."""
    scheme, sep, rest = location.partition("://")
    if not sep:
        return DirectoryBlobStore(location)
    if scheme == "file":
        return DirectoryBlobStore(rest)
    raise ValueError(f"blob store scheme {scheme!r} is not supported by this install; use a directory")
