"""One collection's classifier: a class-balanced logistic regression, C by cross-validation, a chosen threshold."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.config import TrainingConfig
from training.metrics import Metrics, average_precision, binary_metrics

MAX_ITER = 2000


@dataclass(frozen=True)
class ThresholdChoice:
    """The decision threshold and what it gives on the out-of-fold predictions it was chosen on."""

    threshold: float
    rule: str  # "max_f1" or "target_precision"
    expected: Metrics
    note: str | None = None


@dataclass
class Fitted:
    """The estimator fitted on every training row, with its cross-validated figures."""

    model: Any
    C: float
    choice: ThresholdChoice
    cv_average_precision_by_c: dict[float, float]
    notes: list[str] = field(default_factory=list)


def _operating_points(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct scores, highest first; precision and recall of `proba >= score` at each)."""
    order = np.argsort(-proba, kind="stable")
    scores, labels = proba[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp = np.cumsum(labels)[last_of_group]
    predicted = last_of_group + 1
    precision = tp / predicted
    recall = tp / max(1, int(y.sum()))
    return scores[last_of_group], precision, recall


def choose_threshold(y: np.ndarray, proba: np.ndarray, target_precision: float | None = None) -> ThresholdChoice:
    """Max F1, or the highest recall whose precision reaches `target_precision`, on out-of-fold scores.

    The threshold sits halfway between the chosen score and the next lower one: the same
    predictions on these scores, with a margin for new images near the boundary.
    """
    y = np.asarray(y, dtype=bool)
    proba = np.asarray(proba, dtype=np.float64)
    scores, precision, recall = _operating_points(y, proba)
    note = None
    if target_precision is None:
        rule = "max_f1"
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        i = int(np.argmax(f1))
    else:
        rule = "target_precision"
        reached = np.nonzero(precision >= target_precision)[0]
        if len(reached):
            i = int(reached[np.argmax(recall[reached])])
        else:
            best = precision.max()
            i = int(np.nonzero(precision == best)[0][np.argmax(recall[precision == best])])
            note = (f"target precision {target_precision:g} is not reached on out-of-fold predictions; "
                    f"the threshold gives the highest reachable precision, {best:.3f}")
    threshold = float(scores[i] if i + 1 == len(scores) else (scores[i] + scores[i + 1]) / 2)
    return ThresholdChoice(threshold, rule, binary_metrics(y, proba, threshold), note)


def _estimator(c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER, random_state=seed)


def fit_classifier(X: np.ndarray, y: np.ndarray, settings: TrainingConfig) -> Fitted:
    """Pick C by out-of-fold average precision, choose the threshold on those predictions, fit on all rows."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.asarray(y, dtype=bool)
    smallest_class = int(min(y.sum(), (~y).sum()))
    if smallest_class < 2:
        raise ValueError("cross-validation needs at least 2 positive and 2 negative training examples")
    folds = StratifiedKFold(n_splits=min(settings.cv_folds, smallest_class), shuffle=True,
                            random_state=settings.seed)
    notes: list[str] = []
    by_c: dict[float, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for c in sorted(set(settings.c_grid)):
            proba = cross_val_predict(_estimator(c, settings.seed), X, y, cv=folds, method="predict_proba")[:, 1]
            by_c[c] = average_precision(y, proba)
            if best is None or by_c[c] > best[0]:  # ties keep the smaller C: the simpler model
                best = (by_c[c], c, proba)
        assert best is not None
        _, c, proba = best
        choice = choose_threshold(y, proba, settings.target_precision)
        model = _estimator(c, settings.seed).fit(X, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"logistic regression did not converge within {MAX_ITER} iterations for some C")
    if choice.note:
        notes.append(choice.note)
    return Fitted(model, c, choice, by_c, notes)
