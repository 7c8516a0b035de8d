"""Stored classifier versions and the `best_models.json` index the worker reads.

Each version of collection C lives in `collection_C/` as `<version>.pkl` (the joblib estimator)
and `<version>.json` (its manifest: its input, settings, training keys as hashes, metrics).
Manifests are written once and never changed; the index is replaced atomically. A pruned
version's manifest goes at once; its model file stays readable for a grace period (a
`<version>.retired` note says since when), for workers that still read an older index.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from imgstream.analysis.classifiers import INDEX_FILE
from imgstream.training.duplicates import ImageHash, decode_hash, encode_hash

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
LOCK_FILE = ".training.lock"
RETIRED_SUFFIX = ".retired"
KEY_HASH = "sha256-64"  # the first 64 bits of SHA-256 of the key's UTF-8 bytes, as hex


class RegistryLocked(Exception):
    """Another training run holds the classifier folder."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def collection_folder(collection_id: int) -> str:
    return f"collection_{collection_id}"


@dataclass(frozen=True)
class Version:
    """One trained model of a collection, as its manifest describes it."""

    collection_id: int
    version: str
    sequence: int
    created_at: str
    model_file: str  # relative to the classifier folder, as best_models.json names it
    embedding_type: str
    region: str
    threshold: float
    dim: int
    embedding_models: dict[str, str]  # embedding type -> "name/weights" it was trained on
    training_key_hashes: frozenset[str]
    training_image_sha256: frozenset[str]
    manifest: dict[str, Any]

    @property
    def training_image_hashes(self) -> list[ImageHash]:
        """Perceptual hashes of the images it trained on (manifests from before them: none)."""
        hashes = []
        for text in self.manifest.get("training", {}).get("image_phash", []):
            try:
                hashes.append(decode_hash(str(text)))
            except ValueError:
                continue
        return hashes

    @property
    def input_parts(self) -> list[dict[str, Any]]:
        """What the model reads, part by part; a manifest from before the record: raw vectors."""
        parts = (self.manifest.get("input") or {}).get("parts")
        if parts:
            return list(parts)
        return [{"embedding_type": t, "model": self.embedding_models.get(t), "dim": None, "normalized": False}
                for t in self.embedding_type.split("+")]

    @property
    def normalized(self) -> list[bool]:
        return [bool(p.get("normalized", False)) for p in self.input_parts]

    @property
    def expected(self) -> dict[str, Any]:
        """The precision and recall to expect at the threshold: nested-CV figures, or the older `cv` ones."""
        metrics = self.manifest.get("metrics", {})
        return metrics.get("expected") or metrics.get("cv") or {}

    def trained_on(self, hashed_key: str, sha256: str | None) -> bool:
        """Whether this version saw the key (by `key_hash`) or the same image under another key."""
        return hashed_key in self.training_key_hashes or (sha256 is not None and sha256 in self.training_image_sha256)

    def index_entry(self, **extra: Any) -> dict[str, Any]:
        """The best_models.json entry pointing at this version (the format the engine reads, plus details)."""
        expected = self.expected
        entry = {
            "model_file": self.model_file, "derivative_type": self.region, "embedding_type": self.embedding_type,
            "threshold": self.threshold, "version": self.version, "trained_at": self.created_at,
            "expected_precision": expected.get("precision"), "expected_recall": expected.get("recall"),
            **extra,
        }
        if self.manifest.get("input"):  # the worker builds exactly this input; without it, raw vectors
            entry["input"] = self.manifest["input"]
        return entry


def _version_from_manifest(raw: dict[str, Any]) -> Version:
    training = raw.get("training", {})
    return Version(
        collection_id=int(raw["collection_id"]), version=str(raw["version"]), sequence=int(raw["sequence"]),
        created_at=str(raw["created_at"]), model_file=str(raw["model_file"]),
        embedding_type=str(raw["embedding_type"]), region=str(raw["derivative_type"]),
        threshold=float(raw["threshold"]), dim=int(raw["dim"]),
        embedding_models=dict(raw.get("embedding_models", {})),
        training_key_hashes=frozenset(training.get("key_hashes", [])),
        training_image_sha256=frozenset(training.get("image_sha256", [])),
        manifest=raw,
    )


class Registry:
    """The classifier folder: versions per collection, the index, and the run lock."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder for one training run; a second concurrent run fails fast instead of racing the index."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / LOCK_FILE, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RegistryLocked(f"another training run is using {self.directory} "
                                     f"(it holds {self.directory / LOCK_FILE})") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- versions -------------------------------------------------------------------------

    def versions(self, collection_id: int) -> tuple[list[Version], list[str]]:
        """The collection's versions, oldest first, and a note for each manifest that cannot be used."""
        folder = self.directory / collection_folder(collection_id)
        versions, broken = [], []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                version = _version_from_manifest(orjson.loads(path.read_bytes()))
            except (ValueError, KeyError, TypeError) as exc:
                broken.append(f"{path.name}: unreadable manifest ({exc})")
                continue
            if not (self.directory / version.model_file).is_file():
                broken.append(f"{version.version}: model file {version.model_file} is missing")
                continue
            versions.append(version)
        return sorted(versions, key=lambda v: v.sequence), broken

    def add(self, collection_id: int, model: Any, manifest: dict[str, Any], training_keys: Iterable[str],
            training_sha256: Iterable[str | None], after: list[Version],
            training_hashes: Iterable[ImageHash] = ()) -> Version:
        """Save a new version (model file first, then its manifest) numbered after `after`."""
        import joblib

        folder = self.directory / collection_folder(collection_id)
        # Numbered after retired versions too: a new version never takes a file name awaiting deletion.
        retired = [_sequence_of(p.name) for p in folder.glob(f"*{RETIRED_SUFFIX}")] if folder.is_dir() else []
        sequence = max([v.sequence for v in after] + retired, default=0) + 1
        now = datetime.now(timezone.utc)
        version_id = f"v{sequence:04d}-{now.strftime('%Y%m%dT%H%M%SZ')}"
        folder.mkdir(parents=True, exist_ok=True)
        model_file = f"{collection_folder(collection_id)}/{version_id}.pkl"
        pickled = io.BytesIO()  # a classifier is small: written whole, so a crash leaves no half file
        joblib.dump(model, pickled)
        _write_atomically(self.directory / model_file, pickled.getvalue())
        raw = {
            "format": MANIFEST_FORMAT, "collection_id": collection_id, "version": version_id, "sequence": sequence,
            "created_at": now.isoformat(timespec="seconds"), "model_file": model_file, **manifest,
            "training": {
                **manifest.get("training", {}),
                "key_hash": KEY_HASH,
                "key_hashes": sorted({key_hash(k) for k in training_keys}),
                "image_sha256": sorted({s for s in training_sha256 if s}),
                "image_phash": sorted({encode_hash(h) for h in training_hashes}),
            },
        }
        _write_atomically(folder / f"{version_id}.json", orjson.dumps(raw, option=orjson.OPT_INDENT_2))
        return _version_from_manifest(raw)

    def delete(self, version: Version, grace_s: float = 0.0) -> None:
        """Remove a version's manifest, then its model file: now, or after `grace_s` (see `sweep_retired`)."""
        folder = self.directory / collection_folder(version.collection_id)
        (folder / f"{version.version}.json").unlink(missing_ok=True)
        if grace_s <= 0:
            (self.directory / version.model_file).unlink(missing_ok=True)
            return
        note = {"version": version.version, "model_file": version.model_file, "retired_at": time.time(),
                "delete_after": time.time() + grace_s}
        _write_atomically(folder / f"{version.version}{RETIRED_SUFFIX}", orjson.dumps(note))

    def sweep_retired(self, now: float | None = None) -> list[str]:
        """Delete the model files of pruned versions whose grace period is over; returns their files."""
        now = time.time() if now is None else now
        index = self.index()
        serving = {e.get("model_file") if isinstance(e, dict) else e for e in index.values()}
        swept = []
        for note_path in sorted(self.directory.glob(f"collection_*/*{RETIRED_SUFFIX}")):
            try:
                note = orjson.loads(note_path.read_bytes())
                model_file, due = str(note["model_file"]), float(note["delete_after"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("%s: unreadable retirement note; left alone", note_path)
                continue
            if due > now:
                continue
            manifest = (self.directory / model_file).with_suffix(".json")
            if model_file not in serving and not manifest.exists():  # in use again since: keep it
                (self.directory / model_file).unlink(missing_ok=True)
                swept.append(model_file)
            note_path.unlink(missing_ok=True)
        return swept

    def load_model(self, version: Version) -> Any:
        import joblib

        return joblib.load(self.directory / version.model_file)

    # -- the index ------------------------------------------------------------------------

    def index(self) -> dict[str, Any]:
        path = self.directory / INDEX_FILE
        if not path.exists():
            return {}
        index = orjson.loads(path.read_bytes())
        if not isinstance(index, dict):
            raise ValueError(f"{path} is not a JSON object")
        return index

    def set_best(self, collection_id: int, entry: dict[str, Any]) -> None:
        """Point the index at `entry` for one collection, keeping every other collection's entry."""
        index = self.index()
        index[str(collection_id)] = entry
        _write_atomically(self.directory / INDEX_FILE,
                          orjson.dumps(index, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def _sequence_of(name: str) -> int:
    """The sequence number in a version file's name (`v0012-...`), 0 when it has none."""
    digits = name[1:].split("-", 1)[0]
    return int(digits) if name.startswith("v") and digits.isdigit() else 0


def _write_atomically(path: Path, data: bytes) -> None:
    """Write beside `path`, flush to disk, then rename over it: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
