"""Embeddings by (type, region) and key, from whichever source had them, and the matrices built from them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgstream.analysis.vectors import l2_normalize, looks_normalized
from imgstream.schemas.events import ResultEvent

Pair = tuple[str, str]  # (embedding operation type, region)
UNKNOWN_MODEL = "unknown"


class DataProblem(Exception):
    """The data cannot train (or score) a collection: too few examples, one class, mixed embeddings."""


@dataclass(frozen=True)
class Embedding:
    vector: np.ndarray
    model: str  # "name/weights" of the embedding model
    sha256: str | None  # of the image, when the source knows it
    normalized: bool | None = None  # as the source says; None: a result from before the flag
    blob: str | None = None  # the image's blob reference, when the source knows it

    @property
    def is_normalized(self) -> bool:
        """The source's flag; for older results without one, whether the vector has unit length."""
        return self.normalized if self.normalized is not None else looks_normalized(self.vector)


@dataclass(frozen=True)
class Part:
    """One embedding of a model's input, as the model was trained on it (recorded with the model)."""

    embedding_type: str
    model: str
    dim: int
    normalized: bool

    def as_dict(self) -> dict[str, Any]:
        return {"embedding_type": self.embedding_type, "model": self.model, "dim": self.dim,
                "normalized": self.normalized}


@dataclass(frozen=True)
class Matrix:
    """The rows of `keys` that have every part of an embedding type, concatenated in order."""

    keys: list[str]
    X: np.ndarray
    models: dict[str, str]  # embedding type -> model that produced it
    sha256: list[str | None]
    lacking: int  # keys asked for that miss some part
    parts: list[Part] = field(default_factory=list)
    normalized_here: dict[str, int] = field(default_factory=dict)  # type -> raw vectors normalised to match


def check_key_field(key_field: str) -> str:
    if key_field == "request_id" or (key_field.startswith("metadata.") and len(key_field) > len("metadata.")):
        return key_field
    raise ValueError(f"--key must be request_id or metadata.<field>, got {key_field!r}")


def metadata_key(metadata: dict[str, Any] | None, path: list[str]) -> str | None:
    value: Any = metadata or {}
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value)


def key_of(result: ResultEvent, key_field: str) -> str | None:
    """The labels key of a result: its request_id or a metadata field (as text)."""
    if key_field == "request_id":
        return result.request_id
    return metadata_key(result.metadata, key_field.split(".")[1:])


def model_id(name: str | None, weights: str | None) -> str:
    return f"{name}/{weights}" if name or weights else UNKNOWN_MODEL


def pairs_of(embedding_type: str, region: str) -> list[Pair]:
    """The (type, region) parts of `a` or `a+b` on a region."""
    return [(t, region) for t in embedding_type.split("+")]


class FeatureStore:
    """key -> Embedding per (type, region); the first source to provide an embedding keeps it."""

    def __init__(self) -> None:
        self._by_pair: dict[Pair, dict[str, Embedding]] = {}

    def merge(self, pair: Pair, found: dict[str, Embedding]) -> int:
        """Add the embeddings of keys this store lacks; returns how many were added."""
        table = self._by_pair.setdefault(pair, {})
        before = len(table)
        for key, embedding in found.items():
            table.setdefault(key, embedding)
        return len(table) - before

    def has(self, pair: Pair, key: str) -> bool:
        return key in self._by_pair.get(pair, {})

    def count(self, pair: Pair) -> int:
        return len(self._by_pair.get(pair, {}))

    def image_refs(self, keys: set[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
        """What the sources know of each key's image: its SHA-256 digests, and a blob reference."""
        sha256: dict[str, set[str]] = {}
        blobs: dict[str, str] = {}
        for table in self._by_pair.values():
            for key, embedding in table.items():
                if key not in keys:
                    continue
                if embedding.sha256:
                    sha256.setdefault(key, set()).add(embedding.sha256)
                if embedding.blob:
                    blobs.setdefault(key, embedding.blob)
        return sha256, blobs

    def assemble(self, keys: list[str], embedding_type: str, region: str,
                 normalized: list[bool] | None = None) -> Matrix:
        """The feature matrix of `keys` for `a` or `a+b` on `region`; raises DataProblem for mixed embeddings.

        `normalized` (per part) is the input a stored model reads: normalised parts get every raw
        vector L2-normalised, and a raw part cannot take normalised vectors (DataProblem). None, for
        a new model: a part whose vectors are all raw stays raw; a part with any normalised vector is
        normalised throughout (`normalized_here` counts the raw vectors that were).
        """
        types = embedding_type.split("+")
        tables = [self._by_pair.get((t, region), {}) for t in types]
        present = [k for k in keys if all(k in table for table in tables)]
        models: dict[str, str] = {}
        parts: list[Part] = []
        normalized_here: dict[str, int] = {}
        columns = []
        for i, (t, table) in enumerate(zip(types, tables)):
            dims = Counter(table[k].vector.shape[0] for k in present)
            if len(dims) > 1:
                raise DataProblem(f"{t} on {region}: embeddings of mixed dimensions "
                                  f"({', '.join(f'{d} values x{n}' for d, n in sorted(dims.items()))})")
            used = Counter(table[k].model for k in present)
            if len(used) > 1:
                raise DataProblem(f"{t} on {region}: embeddings from more than one model would be mixed "
                                  f"({', '.join(f'{m} x{n}' for m, n in sorted(used.items()))})")
            models[t] = next(iter(used), UNKNOWN_MODEL)
            unit = [table[k].is_normalized for k in present]
            want = any(unit) if normalized is None else normalized[i]
            if not want and any(unit):
                raise DataProblem(f"{t} on {region}: it reads raw vectors, but {sum(unit)} of the data's "
                                  f"{len(unit)} are L2-normalised (the raw vectors cannot be recovered)")
            if want and not all(unit):
                normalized_here[t] = len(unit) - sum(unit)
            # A raw vector is normalised in float32, exactly as serving does it.
            columns.append([l2_normalize(table[k].vector) if want and not u else table[k].vector
                            for k, u in zip(present, unit)])
            parts.append(Part(t, models[t], next(iter(dims), 0), want))
        if present:
            X = np.stack([np.concatenate(row) for row in zip(*columns)]).astype(np.float64)
        else:
            X = np.zeros((0, 0))
        sha256 = [next((table[k].sha256 for table in tables if table[k].sha256), None) for k in present]
        return Matrix(present, X, models, sha256, len(keys) - len(present), parts, normalized_here)
