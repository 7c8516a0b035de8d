"""Result events in PostgreSQL + pgvector: table layout, batched upserts by event_id, nearest neighbours.

Embeddings go into one table per operation type (`emb_<type>`, a `vector(dim)` column with an
HNSW cosine index); every other result (boxes, captions, classifications, skipped and error
results) into `results` with its data as JSONB. Both carry the same metadata columns.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from imgstream.schemas.events import ResultEvent

log = logging.getLogger(__name__)

RESULTS_TABLE = "results"
EMBEDDING_TABLE_PREFIX = "emb_"
EMBEDDING_TYPE_PREFIX = "embed_"
KNOWN_EMBEDDING_DIMS = {"embed_clip_vit_b_32": 512, "embed_dino_v2": 768}
HNSW_MAX_DIM = 2000  # pgvector 0.6 indexes vectors of at most 2,000 dimensions
MAX_EVENT_ID_BYTES = 1024  # request_id (512) + "/" + operation_id (256) fit; btree keys stop near 2,700
# SQLSTATE classes that blame the row, not the connection: data exception, integrity, program limit
_ROW_ERROR_CLASSES = ("22", "23", "54")
_SCHEMA_LOCK_KEY = 0x1D65_7EA3  # pg_advisory_xact_lock key: concurrent sinks create tables one at a time

COMMON_COLUMNS = (
    "event_id", "request_id", "operation_id", "type", "status", "region", "bbox", "crop_ref",
    "image_url", "image_blob", "image_sha256", "image_width", "image_height",
    "model_name", "model_weights", "model_dim", "metadata", "timings_ms", "completed_at", "replayed",
    "source_topic", "source_partition", "source_offset", "normalized",
)
RESULTS_COLUMNS = COMMON_COLUMNS + ("data", "error_code", "error_message")
EMBEDDING_COLUMNS = COMMON_COLUMNS + ("embedding",)
_CASTS = {"metadata": "jsonb", "timings_ms": "jsonb", "data": "jsonb", "embedding": "vector"}

_COMMON_DDL = """
    event_id text PRIMARY KEY,
    request_id text NOT NULL,
    operation_id text NOT NULL,
    type text NOT NULL,
    status text NOT NULL,
    region text,
    bbox integer[],
    crop_ref text,
    image_url text,
    image_blob text,
    image_sha256 text,
    image_width integer,
    image_height integer,
    model_name text,
    model_weights text,
    model_dim integer,
    metadata jsonb,
    timings_ms jsonb,
    completed_at timestamptz,
    replayed boolean NOT NULL DEFAULT false,
    source_topic text,
    source_partition integer,
    source_offset bigint,
    normalized boolean,
    written_at timestamptz NOT NULL DEFAULT now()"""


class RejectedEvent(ValueError):
    """A well-formed event that cannot be stored (e.g. an embedding that is not a finite vector)."""


@dataclass(frozen=True)
class HnswParams:
    """Build parameters of new HNSW indexes (pgvector's defaults); inserts cost grows with both."""

    m: int = 16
    ef_construction: int = 64


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


def _json(value: Any) -> str | None:
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
        _json(event.metadata), _json(event.timings_ms), event.completed_at, event.replayed,
        source.topic if source else None, source.partition if source else None, source.offset if source else None,
        event.normalized,
    )
    if is_embedding(event):
        vector = _vector(event)
        # orjson writes a JSON array of numbers, which is exactly pgvector's text form
        return Row(event.event_id, embedding_table(event.type), len(vector), common + (_json(vector),))
    return Row(event.event_id, RESULTS_TABLE, None,
               common + (_json(event.data), event.error_code, event.error_message))


def is_row_error(exc: psycopg.Error) -> bool:
    """Whether the database refused the data (retrying cannot help) rather than the connection failing."""
    if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
        return True
    return bool(exc.sqlstate) and exc.sqlstate[:2] in _ROW_ERROR_CLASSES


def _upsert_sql(table: str, columns: tuple[str, ...]) -> sql.Composed:
    placeholders = [sql.SQL("%s::" + _CASTS[c]) if c in _CASTS else sql.SQL("%s") for c in columns]
    updates = [sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns if c != "event_id"]
    return sql.SQL(
        "INSERT INTO {table} ({columns}) VALUES ({values}) "
        "ON CONFLICT (event_id) DO UPDATE SET {updates}, written_at = now()"
    ).format(
        table=sql.Identifier(table),
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        values=sql.SQL(", ").join(placeholders),
        updates=sql.SQL(", ").join(updates),
    )


def latest_per_event(rows: list[Row]) -> list[Row]:
    """One row per event_id, the last one read (a replay follows the result it replaces)."""
    return list({row.event_id: row for row in rows}.values())


class PgStore:
    """The database as the sink, search and training see it: schema, upserts, nearest neighbours, labelled reads."""

    def __init__(self, conn: psycopg.AsyncConnection, hnsw: HnswParams | None = None) -> None:
        self.conn = conn
        self.hnsw = hnsw or HnswParams()
        self.embedding_dims: dict[str, int] = {}  # table -> vector dimension

    @classmethod
    async def connect(cls, dsn: str, hnsw: HnswParams | None = None) -> PgStore:
        # autocommit: every `transaction()` block below is a real transaction, never a savepoint
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name="imgstream")
        return cls(conn, hnsw)

    async def close(self) -> None:
        await self.conn.close()

    # -- schema ---------------------------------------------------------------------------

    async def ensure_schema(self) -> None:
        """Create the vector extension, `results` and the known embedding tables (idempotent)."""
        async with self.conn.transaction():
            await self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            await self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            await self.conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, data jsonb, error_code text, "
                                            "error_message text)").format(sql.Identifier(RESULTS_TABLE),
                                                                          sql.SQL(_COMMON_DDL)))
            await self._add_new_columns(RESULTS_TABLE)
            await self._create_index(RESULTS_TABLE, "request_id", "(request_id)")
            for result_type, dim in KNOWN_EMBEDDING_DIMS.items():
                await self._create_embedding_table(embedding_table(result_type), dim)
            for table in await self.refresh_embedding_tables():
                await self._add_new_columns(table)
        await self.refresh_embedding_tables()

    async def _add_new_columns(self, table: str) -> None:
        """Columns added since the first release, on tables an older sink created (idempotent)."""
        # Looked up first: ALTER TABLE locks the table even when there is nothing to add.
        if not await self._has_column(table, "normalized"):
            await self.conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS normalized boolean").format(
                sql.Identifier(table)))

    async def _has_column(self, table: str, column: str) -> bool:
        cursor = await self.conn.execute(
            "SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace "
            "AND a.attname = %s AND NOT a.attisdropped", (table, column))
        return await cursor.fetchone() is not None

    async def _create_index(self, table: str, suffix: str, definition: str) -> None:
        await self.conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} " + definition).format(
            sql.Identifier(f"{table}_{suffix}"), sql.Identifier(table)))

    async def _create_embedding_table(self, table: str, dim: int) -> None:
        await self.conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, embedding vector({}) NOT NULL)").format(
            sql.Identifier(table), sql.SQL(_COMMON_DDL), sql.Literal(dim)))
        await self._add_new_columns(table)
        await self._create_index(table, "request_id", "(request_id)")
        await self._create_index(table, "model", "(model_name, model_weights)")
        if dim <= HNSW_MAX_DIM:
            await self._create_index(table, "hnsw", f"USING hnsw (embedding vector_cosine_ops) WITH "
                                     f"(m = {int(self.hnsw.m)}, ef_construction = {int(self.hnsw.ef_construction)})")
        else:
            log.warning("%s: %d dimensions is over pgvector's HNSW limit (%d); searches scan the table",
                        table, dim, HNSW_MAX_DIM)

    async def refresh_embedding_tables(self) -> dict[str, int]:
        """Read every `emb_*` table and its vector dimension from the catalog (other sinks may add some)."""
        cursor = await self.conn.execute(
            "SELECT c.relname, a.atttypmod FROM pg_class c "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'embedding' AND NOT a.attisdropped "
            "WHERE c.relkind = 'r' AND c.relname LIKE %s AND c.relnamespace = current_schema()::regnamespace",
            (EMBEDDING_TABLE_PREFIX.replace("_", r"\_") + "%",),
        )
        self.embedding_dims = {name: dim for name, dim in await cursor.fetchall()}
        return self.embedding_dims

    async def ensure_embedding_table(self, table: str, dim: int) -> int:
        """The dimension of `table`, creating it with `dim` when it does not exist yet."""
        if table not in self.embedding_dims:
            async with self.conn.transaction():
                await self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                await self._create_embedding_table(table, dim)
            await self.refresh_embedding_tables()
        return self.embedding_dims[table]

    # -- writes ---------------------------------------------------------------------------

    async def write(self, rows: list[Row]) -> WriteReport:
        """Upsert `rows` in one transaction; if the data breaks it, write row by row and reject the bad ones."""
        report = WriteReport()
        storable = []
        for row in latest_per_event(rows):
            if row.dim is not None:
                table_dim = await self.ensure_embedding_table(row.table, row.dim)
                if table_dim != row.dim:
                    report.rejected.append((row.event_id, f"{row.dim} values, but {row.table} holds {table_dim}"))
                    continue
            storable.append(row)
        if not storable:
            return report
        try:
            async with self.conn.transaction():
                await self._upsert(storable)
        except psycopg.Error as exc:
            if not is_row_error(exc):
                raise
            log.warning("batch of %d rows failed (%s); writing them one by one", len(storable), exc)
            storable = await self._write_one_by_one(storable, report)
        for row in storable:
            report.written[row.table] = report.written.get(row.table, 0) + 1
        return report

    async def _write_one_by_one(self, rows: list[Row], report: WriteReport) -> list[Row]:
        written = []
        for row in rows:
            try:
                async with self.conn.transaction():
                    await self._upsert([row])
            except psycopg.Error as exc:
                if not is_row_error(exc):
                    raise
                report.rejected.append((row.event_id, f"{type(exc).__name__}: {exc}".strip()))
            else:
                written.append(row)
        return written

    async def _upsert(self, rows: list[Row]) -> None:
        tables = [RESULTS_TABLE, *self.embedding_dims]
        by_table: dict[str, list[Row]] = {}
        for row in rows:
            by_table.setdefault(row.table, []).append(row)
        async with self.conn.cursor() as cursor:
            # An event_id lives in exactly one table: a replay that turns an error into an embedding
            # (or changes its type) moves the row, it never leaves the old one behind.
            for table in tables:
                elsewhere = [row.event_id for row in rows if row.table != table]
                if elsewhere:
                    await cursor.execute(sql.SQL("DELETE FROM {} WHERE event_id = ANY(%s)").format(
                        sql.Identifier(table)), (elsewhere,))
            for table, table_rows in by_table.items():
                columns = RESULTS_COLUMNS if table == RESULTS_TABLE else EMBEDDING_COLUMNS
                await cursor.executemany(_upsert_sql(table, columns), [row.values for row in table_rows])

    # -- reads ----------------------------------------------------------------------------

    async def nearest(self, result_type: str, vector: list[float], k: int, *,
                      model_name: str | None, model_weights: str | None) -> list[Match]:
        """The `k` stored embeddings of `result_type` closest to `vector` (cosine distance) from the same model."""
        table = embedding_table(result_type)
        await self.refresh_embedding_tables()
        if table not in self.embedding_dims:
            return []
        if self.embedding_dims[table] != len(vector):
            raise RejectedEvent(f"the query has {len(vector)} values but {table} holds "
                                f"{self.embedding_dims[table]}-dimensional vectors")
        query = sql.SQL(
            "SELECT embedding <=> %(q)s::vector AS distance, event_id, request_id, operation_id, region, bbox, "
            "image_url, image_blob, image_sha256, model_name, model_weights, metadata, completed_at "
            "FROM {} WHERE model_name IS NOT DISTINCT FROM %(name)s AND model_weights IS NOT DISTINCT FROM %(weights)s "
            "ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s"
        ).format(sql.Identifier(table))
        params = {"q": _json(vector), "name": model_name, "weights": model_weights, "k": k}
        async with self.conn.transaction():
            # HNSW returns ef_search candidates before the model filter: ask for enough of them.
            await self.conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
                sql.Literal(min(1000, max(40, 4 * k)))))
            rows = await (await self.conn.execute(query, params)).fetchall()
            if len(rows) < k:
                # The filter may have thrown away what the index found: check with an exact scan.
                await self.conn.execute("SET LOCAL enable_indexscan = off")
                rows = await (await self.conn.execute(query, params)).fetchall()
        return [Match(float(r[0]), *r[1:]) for r in rows]

    async def labelled_embeddings(self, result_type: str, region: str, key_path: list[str] | None,
                                  keys: list[str]) -> list[StoredEmbedding]:
        """The latest successful `result_type` embedding on `region` for each of `keys`.

        A key is the request_id (`key_path` None) or the metadata field at `key_path`, as text.
        """
        table = embedding_table(result_type)
        await self.refresh_embedding_tables()
        if table not in self.embedding_dims or not keys:
            return []
        key = sql.SQL("request_id") if key_path is None else sql.SQL("metadata #>> %(path)s")
        # A table no sink of this version has opened yet lacks the flag: its rows read as unknown.
        normalized = sql.SQL("normalized" if await self._has_column(table, "normalized") else "NULL::boolean")
        query = sql.SQL(
            "SELECT DISTINCT ON (k) k, embedding::text, model_name, model_weights, image_sha256, normalized, "
            "       image_blob "
            "FROM (SELECT {key} AS k, embedding, model_name, model_weights, image_sha256, {normalized} AS normalized, "
            "             image_blob, completed_at, written_at "
            "      FROM {table} WHERE region = %(region)s AND status = 'success') AS labelled "
            "WHERE k = ANY(%(keys)s) ORDER BY k, completed_at DESC NULLS LAST, written_at DESC"
        ).format(key=key, normalized=normalized, table=sql.Identifier(table))
        cursor = await self.conn.execute(query, {"path": key_path, "keys": keys, "region": region})
        return [StoredEmbedding(k, orjson.loads(text), name, weights, sha, normalized, blob)
                for k, text, name, weights, sha, normalized, blob in await cursor.fetchall()]
