"""Embeddings from result events stored as JSON lines (`imgstream submit ... --wait --json > results.jsonl`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
from pydantic import ValidationError

from imgstream.schemas.events import ResultEvent
from imgstream.training.features import Embedding, Pair, key_of, model_id


class ResultsFileError(ValueError):
    """A results file that cannot be read (missing, a line that is not a result event)."""


def read_results_file(path: Path, key_field: str, pairs: set[Pair],
                      keys: set[str]) -> dict[Pair, dict[str, Embedding]]:
    """Successful embeddings of `pairs` for labelled `keys`; a later event for the same key replaces an earlier one."""
    found: dict[Pair, dict[str, Embedding]] = {pair: {} for pair in pairs}
    types = {t for t, _ in pairs}
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ResultsFileError(f"{path}: {exc.strerror or exc}") from None
    with fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                result = ResultEvent.model_validate(orjson.loads(line))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                first = str(exc).splitlines()[0]
                raise ResultsFileError(f"{path}:{number}: not a result event ({first})") from None
            if result.status != "success" or result.type not in types:
                continue
            pair = (result.type, result.region or "whole_image")
            if pair not in found:
                continue
            key = key_of(result, key_field)
            if key is None or key not in keys:
                continue
            data = result.data
            if not isinstance(data, list) or not data or not all(isinstance(x, (int, float)) for x in data):
                raise ResultsFileError(f"{path}:{number}: {result.type} success without a vector of numbers")
            model = model_id(result.model.name, result.model.weights) if result.model else model_id(None, None)
            image = result.image
            found[pair][key] = Embedding(np.asarray(data, dtype=np.float32), model, image.sha256 if image else None,
                                         result.normalized, image.blob if image else None)
    return found
