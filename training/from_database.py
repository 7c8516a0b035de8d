"""Embeddings from the sink's PostgreSQL tables (`emb_<type>`), joined with the labels by key."""

from __future__ import annotations

import numpy as np

from imgstream.training.features import Embedding, Pair, model_id


async def read_database(dsn: str, key_field: str, pairs: set[Pair], keys: set[str]) -> dict[Pair, dict[str, Embedding]]:
    """The latest successful embedding of each labelled key for every (type, region) in `pairs`."""
    from imgstream.sink.pgstore import PgStore  # psycopg is imported only here

    key_path = None if key_field == "request_id" else key_field.split(".")[1:]
    found: dict[Pair, dict[str, Embedding]] = {}
    store = await PgStore.connect(dsn)
    try:
        for result_type, region in sorted(pairs):
            rows = await store.labelled_embeddings(result_type, region, key_path, sorted(keys))
            found[(result_type, region)] = {
                row.key: Embedding(np.asarray(row.vector, dtype=np.float32),
                                   model_id(row.model_name, row.model_weights), row.image_sha256,
                                   row.normalized, row.image_blob)
                for row in rows
            }
    finally:
        await store.close()
    return found
