"""Blob stores: where image and crop bytes live while events carry only references.

A room of its own below both sides: `producer` (submit uploads local files) and
`consumer` (the worker writes crops too large to inline) stand on it. Stdlib only;
boto3 is imported when an s3:// store is opened.
"""

from imgstream.blobs.store import BlobStore, DirectoryBlobStore, S3BlobStore, file_sha256, open_blob_store

__all__ = ["BlobStore", "DirectoryBlobStore", "S3BlobStore", "file_sha256", "open_blob_store"]
