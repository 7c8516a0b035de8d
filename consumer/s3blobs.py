"""s3:// blob references, read with boto3 (any S3-compatible store)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from analysis.imaging import FETCH_FAILED, TOO_LARGE, ImageError


def split_s3_reference(reference: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    parts = urlsplit(reference)
    key = parts.path.lstrip("/")
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise ImageError(FETCH_FAILED, f"blob {reference!r} is not an s3://bucket/key reference")
    return parts.netloc, key


class S3BlobReader:
    """Reads objects with a size check first and a byte cap while reading."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None) -> None:
        self._endpoint_url = endpoint_url
        self._region = region
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
        return await asyncio.to_thread(self._read, reference, bucket, key, max_bytes)

    def _read(self, reference: str, bucket: str, key: str, max_bytes: int) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
            size = response.get("ContentLength")
            if size is not None and size > max_bytes:
                response["Body"].close()
                raise ImageError(TOO_LARGE, f"blob {reference!r} is {size} bytes, over the limit of {max_bytes}")
            data = response["Body"].read(max_bytes + 1)
            response["Body"].close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise ImageError(FETCH_FAILED, f"blob {reference!r} could not be read: {code}") from None
        except BotoCoreError as exc:
            raise ImageError(FETCH_FAILED, f"blob {reference!r} could not be read: {exc}") from None
        if len(data) > max_bytes:
            raise ImageError(TOO_LARGE, f"blob {reference!r} is over the limit of {max_bytes} bytes")
        return data
