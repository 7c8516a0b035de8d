"""Train a collection classifier from imgstream results and register it in best_models.json.

Input: result events as JSON lines (e.g. `imgstream submit ... --wait --json > results.jsonl`)
and a CSV of labels (`key,label`, label 1/0/true/false), where key is the request_id or a
metadata field (`--key metadata.photo_id`). The features are the embeddings named by
`--embedding-type` (one type, or `a+b` concatenated in that order) on `--region`.

The classifier is a class-balanced logistic regression; C is chosen by stratified
cross-validation, and the decision threshold is the one that maximises F1 on the
out-of-fold probabilities (recorded in best_models.json, which the worker honours). The
index is rewritten atomically and keeps every other collection.

    python scripts/train_classifier.py --collection-id 7 --results results.jsonl \\
        --labels labels.csv --key metadata.photo_id --embedding-type embed_clip_vit_b_32 \\
        --region prominent_face
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.classifiers import EMBEDDING_TYPES, INDEX_FILE  # noqa: E402
from schemas.events import ResultEvent  # noqa: E402
from schemas.operations import TARGETS  # noqa: E402

C_GRID = (0.01, 0.1, 1.0, 10.0)
TRUE_LABELS = {"1", "true", "yes", "y", "t"}
FALSE_LABELS = {"0", "false", "no", "n", "f"}


def _key_of(result: ResultEvent, key: str) -> str | None:
    if key == "request_id":
        return result.request_id
    if key.startswith("metadata."):
        value: Any = result.metadata or {}
        for part in key.split(".")[1:]:
            value = value.get(part) if isinstance(value, dict) else None
        return None if value is None else str(value)
    raise ValueError(f"--key must be request_id or metadata.<field>, got {key!r}")


def load_labels(path: Path) -> dict[str, bool]:
    labels: dict[str, bool] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            raw = str(row.get("label", "")).strip().lower()
            if raw not in TRUE_LABELS | FALSE_LABELS:
                raise ValueError(f"{path}: label {row.get('label')!r} for key {row.get('key')!r} is not 1/0/true/false")
            labels[str(row["key"]).strip()] = raw in TRUE_LABELS
    return labels


def load_features(path: Path, key: str, types: list[str], region: str) -> dict[str, np.ndarray]:
    """key -> concatenated embeddings, for keys that have every type on the region."""
    found: dict[str, dict[str, list[float]]] = {}
    models: dict[str, set[str]] = {t: set() for t in types}
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            result = ResultEvent.model_validate(orjson.loads(line))
            if result.status != "success" or result.type not in types or result.region != region:
                continue
            k = _key_of(result, key)
            if k is not None:
                found.setdefault(k, {})[result.type] = result.data
                if result.model:
                    models[result.type].add(f"{result.model.name}/{result.model.weights}")
    mixed = {t: m for t, m in models.items() if len(m) > 1}
    if mixed:
        raise ValueError(f"embeddings from different models/weights would be mixed: {mixed}")
    return {k: np.concatenate([np.asarray(v[t], dtype=np.float64) for t in types])
            for k, v in found.items() if all(t in v for t in types)}


def train(X: np.ndarray, y: np.ndarray, seed: int = 42) -> tuple[Any, float, dict[str, float]]:
    """Pick C by stratified CV, then the F1-best threshold on out-of-fold probabilities; fit on all."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(n_splits=min(5, int(min(y.sum(), (~y).sum()))), shuffle=True, random_state=seed)

    def model(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)

    best: tuple[float, float, np.ndarray] | None = None
    for c in C_GRID:
        proba = cross_val_predict(model(c), X, y, cv=folds, method="predict_proba")[:, 1]
        auc = roc_auc_score(y, proba)
        if best is None or auc > best[0]:
            best = (auc, c, proba)
    assert best is not None
    auc, c, proba = best
    thresholds = np.unique(np.round(proba, 4))
    f1s = [f1_score(y, proba >= t, zero_division=0) for t in thresholds]
    threshold = float(thresholds[int(np.argmax(f1s))])
    predicted = proba >= threshold
    metrics = {
        "C": c, "cv_roc_auc": float(auc), "cv_f1": float(max(f1s)),
        "cv_precision": float(precision_score(y, predicted, zero_division=0)),
        "cv_recall": float(recall_score(y, predicted, zero_division=0)),
        "positives": int(y.sum()), "negatives": int((~y).sum()),
    }
    return model(c).fit(X, y), threshold, metrics


def register(directory: Path, collection_id: int, model_file: str, region: str, embedding_type: str,
             threshold: float, metrics: dict[str, float]) -> None:
    """Update the index atomically, keeping every other collection's entry."""
    index_path = directory / INDEX_FILE
    index = orjson.loads(index_path.read_bytes()) if index_path.exists() else {}
    index[str(collection_id)] = {
        "model_file": model_file, "derivative_type": region, "embedding_type": embedding_type,
        "threshold": round(threshold, 4), "metrics": metrics,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(index, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(index_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection-id", type=int, required=True)
    parser.add_argument("--results", type=Path, required=True, help="Result events, one JSON per line.")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with columns key,label.")
    parser.add_argument("--key", default="request_id", help="request_id (default) or metadata.<field>.")
    parser.add_argument("--embedding-type", default="embed_clip_vit_b_32", help="A type or a+b.")
    parser.add_argument("--region", default="whole_image", choices=TARGETS)
    parser.add_argument("--out", type=Path, default=ROOT / "trained_classifiers", help="Classifier folder.")
    args = parser.parse_args(argv)

    types = args.embedding_type.split("+")
    unknown = [t for t in types if t not in EMBEDDING_TYPES]
    if unknown:
        print(f"train_classifier: unknown embedding type(s) {unknown}; known {list(EMBEDDING_TYPES)}", file=sys.stderr)
        return 2
    try:
        labels = load_labels(args.labels)
        features = load_features(args.results, args.key, types, args.region)
    except (ValueError, KeyError, OSError) as exc:
        print(f"train_classifier: {exc}", file=sys.stderr)
        return 2
    keys = sorted(set(labels) & set(features))
    y = np.array([labels[k] for k in keys], dtype=bool)
    if len(keys) < 4 or y.sum() < 2 or (~y).sum() < 2:
        print(f"train_classifier: need at least 2 positive and 2 negative labelled examples with embeddings; "
              f"have {int(y.sum())} positive, {int((~y).sum())} negative ({len(labels)} labels, "
              f"{len(features)} embedded)", file=sys.stderr)
        return 1
    X = np.stack([features[k] for k in keys])
    model, threshold, metrics = train(X, y)
    import joblib

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H%M%S")
    model_file = f"collection_{args.collection_id}_classifier_{stamp}.pkl"
    args.out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, args.out / model_file)
    register(args.out, args.collection_id, model_file, args.region, args.embedding_type, threshold, metrics)
    print(f"collection {args.collection_id}: {model_file} on {args.embedding_type} ({args.region}), "
          f"{X.shape[1]} features, threshold {threshold:.4f}; " +
          ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
