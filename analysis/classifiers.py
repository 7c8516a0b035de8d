"""Collection classifiers indexed by `best_models.json`, reloaded when their files change.

`best_models.json` maps collection_id -> {model_file, derivative_type, embedding_type,
threshold, input}. `embedding_type` is one operation type or `a+b` (concatenated in that order);
`input` records what each part was when the model was trained (embedding model, dimension,
L2-normalised or not), and serving rebuilds exactly that. An entry without it gets raw vectors.
Classifier files are scikit-learn estimators saved with joblib: treat the directory as
trusted code (pickle), exactly like a model checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from imgstream.analysis.vectors import l2_normalize
from imgstream.schemas.operations import TARGETS

log = logging.getLogger(__name__)

INDEX_FILE = "best_models.json"
EMBEDDING_TYPES = ("embed_clip_vit_b_32", "embed_dino_v2")
DEFAULT_THRESHOLD = 0.5


class ClassifierNotFound(Exception):
    """No classifier (index entry or model file) for a collection."""


class ClassifierInvalid(Exception):
    """The index entry or the classifier file cannot be used."""


@dataclass(frozen=True)
class InputPart:
    """One embedding the classifier reads, as it was when the classifier was trained."""

    embedding_type: str
    normalized: bool = False  # the old default: raw vectors, as classify always served them
    dim: int | None = None
    model: str | None = None  # "name/weights" of the embedding model

    @property
    def weights(self) -> str | None:
        """The weights part of `model` ("random", "openai", ...); None when the record does not know it."""
        if self.model is None or "/" not in self.model:
            return None
        return self.model.rpartition("/")[2]


@dataclass(frozen=True)
class ClassifierEntry:
    collection_id: int
    model_file: str
    region: str
    embedding_types: tuple[str, ...]
    threshold: float
    parts: tuple[InputPart, ...] = ()

    def __post_init__(self) -> None:
        if not self.parts:
            object.__setattr__(self, "parts", tuple(InputPart(t) for t in self.embedding_types))

    @property
    def embedding_type(self) -> str:
        return "+".join(self.embedding_types)

    def features(self, vectors: list[np.ndarray], weights: list[str]) -> np.ndarray:
        """The classifier's input from the raw embedding of each part (computed with `weights`).

        Each part is L2-normalised exactly when the classifier was trained on normalised vectors;
        a part of another size, or from random weights where it learnt pretrained ones (or the
        reverse), raises ClassifierInvalid rather than giving a wrong probability.
        """
        out = []
        for part, vector, used in zip(self.parts, vectors, weights, strict=True):
            vector = np.asarray(vector, dtype=np.float32)
            if part.dim is not None and vector.shape[-1] != part.dim:
                raise ClassifierInvalid(
                    f"classifier for collection {self.collection_id} was trained on {part.dim}-value "
                    f"{part.embedding_type} vectors; this worker computes {vector.shape[-1]}")
            if part.weights is not None and (part.weights == "random") != (used == "random"):
                raise ClassifierInvalid(
                    f"classifier for collection {self.collection_id} was trained on {part.model} "
                    f"{part.embedding_type} vectors; this worker computes them with {used} weights")
            out.append(l2_normalize(vector) if part.normalized else vector)
        return np.concatenate(out)


@dataclass(frozen=True)
class Prediction:
    is_in_collection: bool
    probability: float
    threshold: float

    def as_data(self) -> dict[str, Any]:
        return {"is_in_collection": self.is_in_collection, "probability": self.probability, "threshold": self.threshold}


def positive_class(model: Any) -> int | None:
    """The column of predict_proba that means "in the collection" (class True or 1), or None."""
    classes = [bool(c) if isinstance(c, (bool, np.bool_)) else c for c in model.classes_]
    return next((i for i, c in enumerate(classes) if c is True or c == 1), None)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten; the inode catches an atomic replace within one mtime tick."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _parse_entry(cid: int, raw: Any) -> ClassifierEntry:
    if isinstance(raw, str):  # the old format: a bare file name, CLIP on the whole image
        raw = {"model_file": raw, "derivative_type": "whole_image", "embedding_type": "embed_clip_vit_b_32"}
    if not isinstance(raw, dict):
        raise ClassifierInvalid(f"index entry for collection {cid} is not an object")
    missing = [k for k in ("model_file", "derivative_type", "embedding_type") if k not in raw]
    if missing:
        raise ClassifierInvalid(f"index entry for collection {cid} lacks {missing}")
    region = raw["derivative_type"]
    if region not in TARGETS:
        raise ClassifierInvalid(f"collection {cid}: invalid derivative_type {region!r}")
    types = tuple(str(raw["embedding_type"]).split("+"))
    bad = [t for t in types if t not in EMBEDDING_TYPES]
    if bad:
        raise ClassifierInvalid(
            f"collection {cid}: unsupported embedding_type {bad}; supported {list(EMBEDDING_TYPES)}")
    threshold = float(raw.get("threshold", DEFAULT_THRESHOLD))
    return ClassifierEntry(cid, str(raw["model_file"]), region, types, threshold, _parse_input(cid, types, raw))


def _parse_input(cid: int, types: tuple[str, ...], raw: dict[str, Any]) -> tuple[InputPart, ...]:
    """The recorded input of each part; an entry written before the record exists reads as raw vectors."""
    record = raw.get("input")
    if record is None:
        return ()
    parts = record.get("parts") if isinstance(record, dict) else None
    if not isinstance(parts, list) or [p.get("embedding_type") if isinstance(p, dict) else None
                                       for p in parts] != list(types):
        raise ClassifierInvalid(f"collection {cid}: the index entry's input does not describe {'+'.join(types)} "
                                "part by part")
    try:
        return tuple(InputPart(str(p["embedding_type"]), bool(p.get("normalized", False)),
                               None if p.get("dim") is None else int(p["dim"]),
                               None if p.get("model") is None else str(p["model"])) for p in parts)
    except (TypeError, ValueError) as exc:
        raise ClassifierInvalid(f"collection {cid}: invalid input record ({exc})") from None


class ClassifierStore:
    """Reads the index and classifier files on demand; a changed file is re-read on next use."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._index: dict[int, Any] = {}
        self._index_stamp: tuple[int, int, int] | None = None
        self._models: dict[Path, tuple[tuple[int, int, int], Any]] = {}

    def _load_index(self) -> dict[int, Any]:
        path = self.directory / INDEX_FILE
        stamp = _stamp(path)
        if stamp != self._index_stamp:
            if stamp is None:
                self._index = {}
            else:
                try:
                    raw = orjson.loads(path.read_bytes())
                    self._index = {int(k): v for k, v in raw.items()}
                except (ValueError, AttributeError) as exc:
                    raise ClassifierInvalid(f"{path} is not a valid index: {exc}") from None
                log.info("classifier index loaded: %d collections from %s", len(self._index), path)
            self._index_stamp = stamp
        return self._index

    def entry(self, collection_id: int) -> ClassifierEntry:
        with self._lock:
            index = self._load_index()
        if collection_id not in index:
            raise ClassifierNotFound(f"Classifier not found for collection_id {collection_id}.")
        return _parse_entry(collection_id, index[collection_id])

    def _model(self, entry: ClassifierEntry) -> Any:
        path = (self.directory / entry.model_file).resolve()
        stamp = _stamp(path)
        if stamp is None:
            raise ClassifierNotFound(f"Classifier not found for collection_id {entry.collection_id}.")
        with self._lock:
            cached = self._models.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        import joblib  # imported here: only classify needs it

        model = joblib.load(path)
        if not hasattr(model, "predict_proba"):
            raise ClassifierInvalid(f"{entry.model_file} has no predict_proba")
        with self._lock:
            self._models[path] = (stamp, model)
        log.info("classifier loaded for collection %d from %s", entry.collection_id, path.name)
        return model

    def version(self, entry: ClassifierEntry) -> tuple:
        """What identifies the classifier behind `entry` now: its file's identity, the threshold and its input."""
        path = (self.directory / entry.model_file).resolve()
        return ("classifier", str(path), _stamp(path), entry.threshold, entry.parts)

    def predict(self, entry: ClassifierEntry, features: np.ndarray) -> Prediction:
        """P(in collection) for one feature vector, compared with the entry's threshold."""
        model = self._model(entry)
        positive = positive_class(model)
        if positive is None:
            raise ClassifierInvalid(f"classifier for collection {entry.collection_id} has no positive class")
        expected = getattr(model, "n_features_in_", None)
        if expected is not None and expected != features.shape[-1]:
            raise ClassifierInvalid(
                f"classifier for collection {entry.collection_id} expects {expected} features, "
                f"got {features.shape[-1]} ({entry.embedding_type})"
            )
        probability = float(model.predict_proba(features.reshape(1, -1).astype(np.float64))[0][positive])
        return Prediction(probability >= entry.threshold, probability, entry.threshold)
