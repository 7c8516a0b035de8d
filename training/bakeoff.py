"""The bake-off: a held-out set no compared version trained on (nor on copies of), every version scored on it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgstream.analysis.classifiers import positive_class
from imgstream.training.duplicates import ImageHash, near_any
from imgstream.training.metrics import Metrics, binary_metrics
from imgstream.training.registry import Version, key_hash


@dataclass(frozen=True)
class Holdout:
    """Keys held out of this run's training, whole groups of copies at a time; `enough` when both
    classes reach the minimum."""

    keys: list[str]
    labels: np.ndarray
    excluded_trained: int  # candidate keys left out because a stored version trained on them (or on a copy)
    needed_per_class: int
    groups: int = 0  # groups of copies the keys come from
    # candidate keys left out with their group: a copy of their image was trained on, or is no candidate
    excluded_copies: int = 0

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
                "enough": self.enough, "keys": self.keys, "groups": self.groups,
                "excluded_with_copies": self.excluded_copies}


def _seen(keys: list[str], sha256: dict[str, str | None], hashes: dict[str, ImageHash], versions: list[Version],
          max_distance: int | None) -> set[str]:
    """The keys some stored version trained on: by key hash, image SHA-256, or a near-duplicate image."""
    seen = {k for k in keys if any(v.trained_on(key_hash(k), sha256.get(k)) for v in versions)}
    if max_distance is not None:
        stored = [h for v in versions for h in v.training_image_hashes]
        hashed = [k for k in keys if k in hashes and k not in seen]
        near = near_any([hashes[k] for k in hashed], stored, max_distance)
        seen.update(k for k, hit in zip(hashed, near) if hit)
    return seen


def choose_holdout(candidates: list[str], labels: dict[str, bool], sha256: dict[str, str | None],
                   versions: list[Version], class_sizes: dict[bool, int], fraction: float, needed_per_class: int,
                   seed: int, collection_id: int, groups: dict[str, str] | None = None,
                   hashes: dict[str, ImageHash] | None = None, max_distance: int | None = None,
                   training_keys: list[str] | None = None) -> Holdout:
    """A stratified random share of `candidates` that no stored version trained on, whole groups at a time.

    `groups` maps each key to its group of copies (None: every key alone). A group is drawn only
    when every one of its keys in `training_keys` (the rows the new version could train on) is a
    candidate and unseen, so no copy of a held-out image trains the new version or was trained on
    by a stored one. Each class gets about ceil(fraction x its size in `class_sizes`) keys (a group
    may overshoot), never so many that fewer than 2 of a class are left to train on.
    """
    groups = groups or {}
    group_of = {k: groups.get(k, k) for k in (training_keys or candidates)}
    for k in candidates:
        group_of.setdefault(k, groups.get(k, k))
    members: dict[str, list[str]] = {}
    for key in sorted(group_of):
        members.setdefault(group_of[key], []).append(key)
    candidate_set = set(candidates)
    seen = _seen(sorted(group_of), sha256, hashes or {}, versions, max_distance)
    eligible = sorted(g for g, keys in members.items()
                      if all(k in candidate_set and k not in seen for k in keys))
    excluded_trained = len(candidate_set & seen)
    held_possible = {k for g in eligible for k in members[g]}
    excluded_copies = len(candidate_set - seen - held_possible)
    rng = np.random.default_rng([seed, collection_id])
    limit = {label: class_sizes[label] - 2 for label in (True, False)}
    held = {True: 0, False: 0}
    chosen: list[str] = []
    n_groups = 0
    for label in (True, False):
        pool = [g for g in eligible if (2 * sum(labels[k] for k in members[g]) >= len(members[g])) is label]
        target = min(math.ceil(fraction * class_sizes[label]), limit[label])
        for i in rng.permutation(len(pool)) if pool else []:
            if held[label] >= target:
                break
            keys = members[pool[i]]
            adds = {True: sum(labels[k] for k in keys), False: sum(not labels[k] for k in keys)}
            if any(held[c] + adds[c] > limit[c] for c in (True, False)):
                continue
            chosen += keys
            n_groups += 1
            for c in (True, False):
                held[c] += adds[c]
    chosen.sort()
    return Holdout(chosen, np.array([labels[k] for k in chosen], dtype=bool), excluded_trained,
                   needed_per_class, n_groups, excluded_copies)


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
