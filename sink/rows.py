"""Result events as rows: the table layout (one `emb_<type>` table per embedding type, `results` for the
rest), which columns each row has, and how an event becomes one (or is rejected before the database sees it)."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from imgstream.schemas.events import ResultEvent

RESULTS_TABLE = "results"
EMBEDDING_TABLE_PREFIX = "emb_"
EMBEDDING_TYPE_PREFIX = "embed_"
KNOWN_EMBEDDING_DIMS = {"embed_clip_vit_b_32": 512, "embed_dino_v2": 768}
HNSW_MAX_DIM = 2000  # pgvector 0.6 indexes vectors of at most 2,000 dimensions
MAX_EVENT_ID_BYTES = 1024  # request_id (512) + "/" + operation_id (256) fit; btree keys stop near 2,700
# SQLSTATE classes that blame the row, not the connection: data exception, integrity, program limit
_ROW_ERROR_CLASSES = ("22", "23", "54")

COMMON_COLUMNS = (
    "event_id", "request_id", "operation_id", "type", "status", "region", "bbox", "crop_ref",
    "image_url", "image_blob", "image_sha256", "image_width", "image_height",
    "model_name", "model_weights", "model_dim", "metadata", "timings_ms", "completed_at", "replayed",
    "source_topic", "source_partition", "source_offset", "normalized",
)
RESULTS_COLUMNS = COMMON_COLUMNS + ("data", "error_code", "error_message")
EMBEDDING_COLUMNS = COMMON_COLUMNS + ("embedding",)
CASTS = {"metadata": "jsonb", "timings_ms": "jsonb", "data": "jsonb", "embedding": "vector"}



class RejectedEvent(ValueError):
    """A well-formed event that cannot be stored (e.g. an embedding that is not a finite vector)."""


@dataclass(frozen=True)
class SourcePosition:
    """Where a result was read: kept on its row so a row can be traced back to the log."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Row:
    """One result ready to upsert: its table, its vector size (embeddings) and its column values."""

    event_id: str
    table: str
    dim: int | None
    values: tuple[Any, ...]


@dataclass
class WriteReport:
    """What one batch did to the database."""

    written: dict[str, int] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (event_id, why)

    @property
    def rows(self) -> int:
        return sum(self.written.values())


@dataclass(frozen=True)
class StoredEmbedding:
    """A stored embedding found by its labels key (request_id or a metadata field), for training."""

    key: str
    vector: list[float]
    model_name: str | None
    model_weights: str | None
    image_sha256: str | None
    normalized: bool | None = None  # None: a row from before the flag
    image_blob: str | None = None


@dataclass(frozen=True)
class Match:
    """A stored embedding near the query, with what is known of its image."""

    distance: float
    event_id: str
    request_id: str
    operation_id: str
    region: str | None
    bbox: list[int] | None
    image_url: str | None
    image_blob: str | None
    image_sha256: str | None
    model_name: str | None
    model_weights: str | None
    metadata: dict[str, Any] | None
    completed_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "distance": self.distance, "event_id": self.event_id, "request_id": self.request_id,
            "operation_id": self.operation_id, "region": self.region, "bbox": self.bbox,
            "image": {"url": self.image_url, "blob": self.image_blob, "sha256": self.image_sha256},
            "model": {"name": self.model_name, "weights": self.model_weights},
            "metadata": self.metadata,
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
        }


def embedding_table(result_type: str) -> str:
    """`emb_<type>`, made a safe lower-case identifier (with a hash suffix when that changed it)."""
    name = EMBEDDING_TABLE_PREFIX + result_type
    safe = re.sub(r"[^a-z0-9_]", "_", name.lower())
    if safe != name or len(safe) > 63:
        safe = f"{safe[:52]}_{hashlib.sha256(result_type.encode()).hexdigest()[:10]}"
    return safe


def is_embedding(event: ResultEvent) -> bool:
    """Successful results of `embed_*` operations are vectors; everything else is stored as JSONB."""
    return event.status == "success" and event.type.startswith(EMBEDDING_TYPE_PREFIX)


def _vector(event: ResultEvent) -> list[float]:
    data = event.data
    if hasattr(data, "tolist") and getattr(data, "ndim", None) == 1:  # an engine result in process: a numpy array
        data = data.tolist()
    if not isinstance(data, list) or not data:
        raise RejectedEvent(f"{event.type} success without a vector (data is {type(data).__name__})")
    if not all(type(x) in (float, int) and math.isfinite(x) for x in data):
        raise RejectedEvent(f"{event.type} vector holds values that are not finite numbers")
    if event.model is not None and event.model.dim is not None and event.model.dim != len(data):
        raise RejectedEvent(f"{event.type} vector has {len(data)} values but model.dim says {event.model.dim}")
    return data


def json_text(value: Any) -> str | None:
    # numpy arrays too: the engine's embeddings in process (search's query vector)
    return None if value is None else orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def row_from_event(event: ResultEvent, source: SourcePosition | None = None) -> Row:
    """The row a result event becomes; raises RejectedEvent for results that cannot be stored."""
    if len(event.event_id.encode()) > MAX_EVENT_ID_BYTES:
        raise RejectedEvent(f"event_id is longer than {MAX_EVENT_ID_BYTES} bytes")
    image, model = event.image, event.model
    common = (
        event.event_id, event.request_id, event.operation_id, event.type, event.status, event.region,
        event.cropped_image_bbox, event.cropped_image_ref,
        image.url if image else None, image.blob if image else None, image.sha256 if image else None,
        image.width if image else None, image.height if image else None,
        model.name if model else None, model.weights if model else None, model.dim if model else None,
        json_text(event.metadata), json_text(event.timings_ms), event.completed_at, event.replayed,
        source.topic if source else None, source.partition if source else None, source.offset if source else None,
        event.normalized,
    )
    if is_embedding(event):
        vector = _vector(event)
        # orjson writes a JSON array of numbers, which is exactly pgvector's text form
        return Row(event.event_id, embedding_table(event.type), len(vector), common + (json_text(vector),))
    return Row(event.event_id, RESULTS_TABLE, None,
               common + (json_text(event.data), event.error_code, event.error_message))


def is_row_error(exc: psycopg.Error) -> bool:
    """Whether the database refused the data (retrying cannot help) rather than the connection failing."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return True
    return bool(exc.sqlstate) and exc.sqlstate[:2] in _ROW_ERROR_CLASSES


def latest_per_event(rows: list[Row]) -> list[Row]:
    """One row per event_id, the last one read (a replay follows the result it replaces)."""
    return list({row.event_id: row for row in rows}.values())
