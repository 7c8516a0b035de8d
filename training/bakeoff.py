"""The bake-off: a held-out set no compared version trained on, every version scored on it, ranked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.classifiers import positive_class
from training.metrics import Metrics, binary_metrics
from training.registry import Version, key_hash


@dataclass(frozen=True)
class Holdout:
    """Keys held out of this run's training; `enough` when both classes reach the minimum."""

    keys: list[str]
    labels: np.ndarray
    excluded_trained: int  # candidate keys left out because a stored version trained on them
    needed_per_class: int

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    @property
    def negatives(self) -> int:
        return int(len(self.labels) - self.labels.sum())

    @property
    def enough(self) -> bool:
        return min(self.positives, self.negatives) >= self.needed_per_class

    def describe(self) -> str:
        return f"{self.positives} positive, {self.negatives} negative"

    def as_dict(self) -> dict[str, Any]:
        return {"examples": len(self.keys), "positives": self.positives, "negatives": self.negatives,
                "excluded_trained_on": self.excluded_trained, "needed_per_class": self.needed_per_class,
                "enough": self.enough, "keys": self.keys}


def _unseen(key: str, sha256: str | None, versions: list[Version]) -> bool:
    hashed = key_hash(key)
    return not any(v.trained_on(hashed, sha256) for v in versions)


def choose_holdout(candidates: list[str], labels: dict[str, bool], sha256: dict[str, str | None],
                   versions: list[Version], class_sizes: dict[bool, int], fraction: float, needed_per_class: int,
                   seed: int, collection_id: int) -> Holdout:
    """A stratified random share of `candidates` that no stored version trained on.

    Each class gets ceil(fraction x its size in `class_sizes`) keys when that many are fresh,
    never so many that fewer than 2 of the class are left to train on.
    """
    fresh = [k for k in sorted(candidates) if _unseen(k, sha256.get(k), versions)]
    rng = np.random.default_rng([seed, collection_id])
    chosen: list[str] = []
    for label in (True, False):
        pool = [k for k in fresh if labels[k] is label]
        take = min(math.ceil(fraction * class_sizes[label]), class_sizes[label] - 2, len(pool))
        if take > 0:
            chosen += [pool[i] for i in sorted(rng.choice(len(pool), size=take, replace=False))]
    chosen.sort()
    return Holdout(chosen, np.array([labels[k] for k in chosen], dtype=bool), len(candidates) - len(fresh),
                   needed_per_class)


def positive_probability(model: Any, X: np.ndarray) -> np.ndarray:
    """P(in collection) per row from an estimator whose classes include True or 1."""
    positive = positive_class(model)
    if positive is None:
        raise ValueError("the classifier has no positive class")
    return model.predict_proba(X)[:, positive]


@dataclass(frozen=True)
class Entrant:
    """A version in the bake-off with its held-out score (at its own threshold)."""

    version: Version
    metrics: Metrics
    is_current: bool
    is_new: bool


def score(version: Version, model: Any, X: np.ndarray, y: np.ndarray) -> Metrics:
    return binary_metrics(y, positive_probability(model, X), version.threshold)


def rank(entrants: list[Entrant], metric: str) -> list[Entrant]:
    """Best first by `metric`; a tie keeps the current best, then prefers the newer version."""
    return sorted(entrants, key=lambda e: (-e.metrics.value(metric), not e.is_current, -e.version.sequence))
