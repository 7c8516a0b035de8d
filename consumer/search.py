"""`imgstream search`: embed an image with the engine and list the nearest stored embeddings."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg

from imgstream.analysis.engine import EMBEDDING_MODELS, Engine
from imgstream.analysis.imaging import ImageError, decode_image
from imgstream.sink.pgstore import Match, PgStore, RejectedEvent
from imgstream.schemas.config import DecodeConfig, WorkerConfig
from imgstream.schemas.events import AnalysisRequest, ResultEvent

QUERY_OPERATION_ID = "query"
EXIT_OK, EXIT_FAILED = 0, 1


class SearchError(Exception):
    """The query image gave no embedding (a skipped or error result, e.g. no face for a face target)."""


@dataclass(frozen=True)
class SearchResult:
    """The query's own result (model, region) and the matches, nearest first."""

    query: ResultEvent
    matches: list[Match]


async def embed_file(engine: Engine, path: Path, result_type: str, target: str,
                     decode: DecodeConfig | None = None) -> ResultEvent:
    """Run one `result_type` task on the image file at `path`; raises SearchError unless it succeeds."""
    decoded = decode_image(path.read_bytes(), decode or DecodeConfig())
    request = AnalysisRequest(
        request_id=f"search:{path.name}", image={"blob": path.resolve().as_uri()},
        tasks=[{"operation_id": QUERY_OPERATION_ID, "type": result_type, "params": {"target": target}}],
    )
    (result,) = await engine.run(request, decoded)
    if result.status != "success":
        raise SearchError(f"{result_type} on {target} of {path}: {result.status} "
                          f"({result.error_code}: {result.error_message})")
    return result


async def search_image(store: PgStore, engine: Engine, path: Path, result_type: str, target: str, k: int,
                       decode: DecodeConfig | None = None) -> SearchResult:
    """The `k` stored embeddings nearest the image's, from the same model name and weights only."""
    query = await embed_file(engine, path, result_type, target, decode)
    model = query.model
    matches = await store.nearest(result_type, query.data, k, model_name=model.name if model else None,
                                  model_weights=model.weights if model else None)
    return SearchResult(query, matches)


def format_match(rank: int, match: Match) -> str:
    """One readable line per match."""
    where = match.image_url or match.image_blob or "-"
    region = match.region or "-"
    if match.bbox:
        region += " [" + ",".join(map(str, match.bbox)) + "]"
    metadata = orjson.dumps(match.metadata).decode() if match.metadata else "{}"
    return (f"{rank:>3}  {match.distance:.4f}  {match.request_id}  {where}  region={region}  "
            f"metadata={metadata}")


def match_json(rank: int, match: Match) -> str:
    return orjson.dumps({"rank": rank, **match.as_json()}).decode()


def run_search(config: WorkerConfig, image: str, result_type: str, target: str, k: int, as_json: bool) -> int:
    """The `imgstream search` command; returns its exit code (0 matches, 1 none or an error)."""
    from imgstream.service.logs import setup_logging

    setup_logging("WARNING")  # stdout carries the matches; model-loading chatter stays out of the way
    return asyncio.run(_search_command(config, Path(image), result_type, target, k, as_json))


async def _search_command(config: WorkerConfig, path: Path, result_type: str, target: str, k: int,
                          as_json: bool) -> int:
    dsn = config.sink.database_uri()
    if dsn is None:
        from imgstream.sink.embedded_pg import embedded_postgres_exists, start_embedded_postgres

        if not embedded_postgres_exists(config.sink.data_dir):
            print(f"imgstream search: no database in {config.sink.data_dir}; run `imgstream sink pgvector` "
                  "first or give --dsn", file=sys.stderr)
            return EXIT_FAILED
        dsn = (await asyncio.to_thread(start_embedded_postgres, config.sink.data_dir)).uri
    try:
        store = await PgStore.connect(dsn)
    except psycopg.OperationalError as exc:
        print(f"imgstream search: cannot connect to the database: {exc}", file=sys.stderr)
        return EXIT_FAILED
    # Only the query's embedding model loads up front (detectors follow lazily for crop targets).
    engine = Engine(config.models.model_copy(update={"preload": [EMBEDDING_MODELS[result_type]]}))
    try:
        await engine.start()
        found = await search_image(store, engine, path, result_type, target, k, config.decode)
    except (SearchError, ImageError, RejectedEvent, OSError) as exc:
        print(f"imgstream search: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - e.g. weights missing: a message, not a traceback
        print(f"imgstream search: cannot load the {result_type} model ({config.models.weights} weights): "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await engine.close()
        await store.close()
    model = found.query.model
    described = f"{model.name} ({model.weights} weights)" if model else "an unnamed model"
    if not found.matches:
        print(f"imgstream search: no stored {result_type} embeddings from {described}", file=sys.stderr)
        return EXIT_FAILED
    if not as_json:
        print(f"{result_type} of {path.name} ({found.query.region}) by {described}; "
              f"nearest first, cosine distance:", file=sys.stderr)
    for rank, match in enumerate(found.matches, 1):
        print(match_json(rank, match) if as_json else format_match(rank, match))
    return EXIT_OK
