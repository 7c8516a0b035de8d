"""The blob store that local images travel through: requests carry references, never bytes.

A directory store by default (`file://` references on a volume the workers share), or an
S3-compatible bucket (`s3://bucket/prefix`, boto3; workers read it with the same endpoint).
Both are content-addressed: the same image is stored once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Protocol


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        target = self._target(file_sha256(path), path.suffix)
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


class S3BlobStore:
    """Objects under `s3://bucket/prefix/`, keyed by content hash; an existing object is not re-uploaded."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None) -> None:
        try:
            import boto3
        except ImportError:
            raise ValueError("s3:// blob stores need boto3: pip install 'imgstream[s3]'") from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def _key(self, digest: str, suffix: str) -> str:
        name = f"{digest[:2]}/{digest}{suffix.lower()}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_file(self, path: Path) -> str:
        return self.put_bytes(path.read_bytes(), path.suffix)

    def put_bytes(self, data: bytes, suffix: str) -> str:
        key = self._key(hashlib.sha256(data).hexdigest(), suffix)
        if not self._exists(key):
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"


def open_blob_store(location: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None) -> BlobStore:
    """A store for `location`: a directory path, a file:// URI or s3://bucket[/prefix]."""
    scheme, sep, rest = location.partition("://")
    if not sep:
        return DirectoryBlobStore(location)
    if scheme == "file":
        return DirectoryBlobStore(rest)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"blob store {location!r} names no bucket: use s3://bucket[/prefix]")
        return S3BlobStore(bucket, prefix, s3_endpoint_url, s3_region)
    raise ValueError(f"blob store scheme {scheme!r} is not supported; use a directory or s3://bucket/prefix")
