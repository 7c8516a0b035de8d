"""s3:// blob references, read with boto3 (any S3-compatible store), confined to configured buckets.

A reference outside `fetch.s3_buckets` is refused before any S3 call, and a missing object,
a forbidden one and one outside the list all read the same: the answer never tells a
request whether an object exists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from imgstream.analysis.imaging import FETCH_FAILED, TOO_LARGE, ImageError
from imgstream.consumer.fetch import TransientFetchError

log = logging.getLogger(__name__)

# S3 answers worth trying again later: the store is overloaded or briefly unavailable.
_TRANSIENT_CODES: Final = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                     "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError"})


def split_s3_reference(reference: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    parts = urlsplit(reference)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} is not an s3://bucket/key reference")
    return parts.netloc, key


def unreadable(reference: str) -> ImageError:
    """The one answer for a missing object, a forbidden one and one outside fetch.s3_buckets."""
    return ImageError(FETCH_FAILED, f"blob {reference!r} cannot be read: no such object, or not one this worker "
                                    "may read (fetch.s3_buckets)")


class S3Scopes:
    """The buckets and prefixes (`bucket` or `bucket/prefix` entries) that s3:// references may name."""

    def __init__(self, entries: Sequence[str]) -> None:
        self._scopes: list[tuple[str, str]] = []
        for entry in entries:
            bucket, _, prefix = entry.strip("/").partition("/")
            self._scopes.append((bucket, prefix.strip("/")))

    def allows(self, bucket: str, key: str) -> bool:
        # S3 keys are names, not paths; a "." or ".." segment would still let a store that
        # normalises paths leave the prefix, and no blob store writes one.
        if any(segment in (".", "..") for segment in key.split("/")):
            return False
        return any(bucket == allowed and (not prefix or key.startswith(prefix + "/"))
                   for allowed, prefix in self._scopes)


class S3BlobReader:
    """Reads objects inside `scopes` with a size check first and a byte cap while reading."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None,
                 scopes: Sequence[str] = ()) -> None:
        self._endpoint_url = endpoint_url
        self._region = region
        self._scopes = S3Scopes(scopes)
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            try:
                import boto3
            except ImportError:
                raise ImageError(FETCH_FAILED, "s3:// blobs need boto3 on the worker: pip install 'imgstream[s3]'") from None
            self._client = boto3.client("s3", endpoint_url=self._endpoint_url, region_name=self._region)
        return self._client

    async def read(self, reference: str, max_bytes: int) -> bytes:
        bucket, key = split_s3_reference(reference)
        if not self._scopes.allows(bucket, key):
            log.info("blob %r refused: outside fetch.s3_buckets", reference)
            raise unreadable(reference)
        return await asyncio.to_thread(self._read, reference, bucket, key, max_bytes)

    def _read(self, reference: str, bucket: str, key: str, max_bytes: int) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError as BotoConnectionError,
            HTTPClientError,
        )

        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
            size = response.get("ContentLength")
            if size is not None and size > max_bytes:
                response["Body"].close()
                raise ImageError(TOO_LARGE, f"blob {reference!r} is {size} bytes, over the limit of {max_bytes}")
            data = response["Body"].read(max_bytes + 1)
            response["Body"].close()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "error")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or status >= 500:
                raise TransientFetchError(f"blob {reference!r} could not be read now: {code}") from None
            # NoSuchKey, NoSuchBucket, AccessDenied, ...: said the same way; the log keeps the difference.
            log.info("blob %r could not be read: %s", reference, code)
            raise unreadable(reference) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise TransientFetchError(f"blob {reference!r} could not be read now: {exc}") from None
        except BotoCoreError as exc:
            raise ImageError(FETCH_FAILED, f"blob {reference!r} could not be read: {exc}") from None
        if len(data) > max_bytes:
            raise ImageError(TOO_LARGE, f"blob {reference!r} is over the limit of {max_bytes} bytes")
        return data
