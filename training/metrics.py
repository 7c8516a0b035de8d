"""Precision, recall, F1 and average precision of P(in collection) scores, with the counts behind them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

METRICS = ("average_precision", "f1", "precision", "recall")


@dataclass(frozen=True)
class Metrics:
    """Scores of `probability >= threshold` against the labels; AP does not depend on the threshold."""

    precision: float
    recall: float
    f1: float
    average_precision: float
    threshold: float
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.fp + self.tn

    def value(self, metric: str) -> float:
        return float(getattr(self, metric))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "positives": self.positives, "negatives": self.negatives,
                "examples": self.positives + self.negatives}


def average_precision(y: np.ndarray, proba: np.ndarray) -> float:
    """Area under the precision-recall curve as scikit-learn computes it (0.0 without positives)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, proba)) if y.any() else 0.0


def binary_metrics(y: np.ndarray, proba: np.ndarray, threshold: float) -> Metrics:
    """The metrics of predicting `proba >= threshold` for boolean labels `y`."""
    return prediction_metrics(y, np.asarray(proba) >= threshold, proba, threshold)


def prediction_metrics(y: np.ndarray, predicted: np.ndarray, proba: np.ndarray, threshold: float) -> Metrics:
    """The metrics of yes/no `predicted` for boolean labels `y` (`proba` for the average precision)."""
    y = np.asarray(y, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    tp = int(np.sum(predicted & y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    tn = int(np.sum(~predicted & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Metrics(precision, recall, f1, average_precision(y, proba), float(threshold), tp, fp, fn, tn)
