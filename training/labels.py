"""Labels files: one row per (collection_id, key, label), optionally an image path; CSV, JSON lines or Parquet."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

TRUE_LABELS = {"1", "true", "yes", "y", "t"}
FALSE_LABELS = {"0", "false", "no", "n", "f"}
CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class LabelsError(ValueError):
    """A labels file that cannot be read as a whole (unknown format, bad row, missing column)."""


@dataclass(frozen=True)
class LabelRow:
    collection_id: int
    key: str
    label: bool
    image: str | None  # absolute path when the file names one


@dataclass
class CollectionLabels:
    """One collection's labels by key; keys labelled both ways are dropped and listed."""

    collection_id: int
    labels: dict[str, bool] = field(default_factory=dict)
    conflicting: list[str] = field(default_factory=list)


@dataclass
class LabelSet:
    collections: dict[int, CollectionLabels]
    images: dict[str, str]  # key -> image path, for keys whose rows name one

    @property
    def keys(self) -> set[str]:
        return {k for c in self.collections.values() for k in c.labels}


def parse_label(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    text = str(raw).strip().lower() if raw is not None else ""
    if text in TRUE_LABELS:
        return True
    if text in FALSE_LABELS:
        return False
    raise ValueError(f"label {raw!r} is not 1/0/true/false/yes/no")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) of a labels file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, {k.strip(): v for k, v in row.items() if k is not None}
    elif suffix in JSONL_SUFFIXES:
        with path.open("rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        record = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise LabelsError(f"{path}:{number}: not JSON ({exc})") from None
                    if not isinstance(record, dict):
                        raise LabelsError(f"{path}:{number}: a row must be a JSON object")
                    yield number, record
    elif suffix in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LabelsError(f"{path}: reading Parquet needs pyarrow (pip install 'imgstream[train]')") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors (ArrowInvalid, ...) share no useful base
            raise LabelsError(f"{path}: not a readable Parquet file ({exc})") from None
        yield from enumerate(rows, 1)
    else:
        raise LabelsError(f"{path}: unknown labels format {suffix or '(no suffix)'!r}; "
                          "use .csv, .jsonl or .parquet")


def _row(path: Path, record: dict[str, Any], default_collection: int | None) -> LabelRow:
    raw_cid = record.get("collection_id")
    if raw_cid is None or str(raw_cid).strip() == "":
        if default_collection is None:
            raise ValueError("no collection_id (add the column, or give one --collection-id for this file)")
        collection_id = default_collection
    else:
        try:
            collection_id = int(str(raw_cid).strip())
        except ValueError:
            raise ValueError(f"collection_id {raw_cid!r} is not an integer") from None
    image = record.get("image")
    image = str(image).strip() if image is not None and str(image).strip() else None
    key = record.get("key")
    key = str(key).strip() if key is not None else ""
    if not key:
        if image is None:
            raise ValueError("no key (and no image to use as the key)")
        key = image
    if "label" not in record:
        raise ValueError("no label column")
    resolved = str((path.parent / image).resolve()) if image is not None else None
    return LabelRow(collection_id, key, parse_label(record["label"]), resolved)


def read_labels(paths: list[Path], collection_ids: list[int] | None = None) -> LabelSet:
    """Every row of every file, grouped by collection; `collection_ids` keeps only those collections.

    A file without a collection_id column belongs to the one collection in `collection_ids`.
    """
    wanted = set(collection_ids or [])
    default = collection_ids[0] if collection_ids and len(collection_ids) == 1 else None
    collections: dict[int, CollectionLabels] = {}
    conflicting: set[tuple[int, str]] = set()
    images: dict[str, str] = {}
    for path in paths:
        try:
            for number, record in _records(path):
                try:
                    row = _row(path, record, default)
                except ValueError as exc:
                    raise LabelsError(f"{path}:{number}: {exc}") from None
                if wanted and row.collection_id not in wanted:
                    continue
                if row.image is not None:
                    known = images.setdefault(row.key, row.image)
                    if known != row.image:
                        raise LabelsError(f"{path}:{number}: key {row.key!r} names image {row.image}, "
                                          f"but an earlier row names {known}")
                labels = collections.setdefault(row.collection_id, CollectionLabels(row.collection_id))
                previous = labels.labels.get(row.key)
                if (row.collection_id, row.key) in conflicting:
                    continue
                if previous is not None and previous != row.label:
                    del labels.labels[row.key]
                    labels.conflicting.append(row.key)
                    conflicting.add((row.collection_id, row.key))
                else:
                    labels.labels[row.key] = row.label
        except OSError as exc:
            raise LabelsError(f"{path}: {exc.strerror or exc}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise LabelsError(f"{path}: {exc}") from None
    for cid in wanted - set(collections):
        collections[cid] = CollectionLabels(cid)  # asked for, but no rows: reported as such
    return LabelSet(collections, images)
