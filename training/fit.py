"""One collection's classifier: a class-balanced logistic regression, C by cross-validation, a chosen threshold."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgstream.schemas.config import TrainingConfig
from imgstream.training.metrics import Metrics, average_precision, binary_metrics, prediction_metrics

MAX_ITER = 2000


@dataclass(frozen=True)
class ThresholdChoice:
    """The decision threshold and what it gives on the out-of-fold predictions it was chosen on."""

    threshold: float
    rule: str  # "max_f1" or "target_precision"
    expected: Metrics
    note: str | None = None


NESTED_CV, SAME_PREDICTIONS = "nested_cv", "same_predictions"


@dataclass
class Fitted:
    """The estimator fitted on every training row, with its cross-validated figures.

    `choice` is the threshold and what it gives on the out-of-fold predictions it was chosen on;
    `expected` is what the same procedure gave on folds it did not see (`evaluation` says how).
    """

    model: Any
    C: float
    choice: ThresholdChoice
    cv_average_precision_by_c: dict[float, float]
    notes: list[str] = field(default_factory=list)
    expected: Metrics | None = None
    evaluation: str = SAME_PREDICTIONS
    folds: int = 0
    groups: int = 0
    fold_thresholds: list[float] = field(default_factory=list)

    @property
    def honest(self) -> Metrics:
        return self.expected if self.expected is not None else self.choice.expected

    def evaluation_dict(self) -> dict[str, Any]:
        """How the reported precision and recall were measured, for the report and the manifest."""
        return {"method": self.evaluation, "folds": self.folds, "groups": self.groups,
                "fold_thresholds": self.fold_thresholds}


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


class TooFewGroups(ValueError):
    """Cross-validation needs at least 2 images (groups of copies) of each class."""


def grouped_folds(y: np.ndarray, groups: np.ndarray, wanted: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds that keep every group (copies of one image) on one side, as (train, test) rows.

    As many folds as asked for, but no more than there are groups holding each class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y, dtype=bool)
    with_class = [len(set(groups[y == label])) for label in (True, False)]
    n = min(wanted, *with_class)
    if n < 2:
        raise TooFewGroups(f"cross-validation needs at least 2 positive and 2 negative images (copies of one image "
                           f"count once); there are {with_class[0]} and {with_class[1]}")
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros((len(y), 1)), y, groups))


def _out_of_fold(c: float, X: np.ndarray, y: np.ndarray, folds: list, seed: int) -> np.ndarray:
    from sklearn.model_selection import cross_val_predict

    return cross_val_predict(_estimator(c, seed), X, y, cv=folds, method="predict_proba")[:, 1]


def _nested(c: float, X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: list, proba: np.ndarray,
            settings: TrainingConfig) -> tuple[np.ndarray, list[float]] | None:
    """Per outer fold, a threshold chosen on inner folds of its training rows, applied to its test rows.

    `proba` are the outer folds' out-of-fold scores (from models that never saw those rows), so each
    test row is judged by a threshold and a model chosen and fitted without it. None when some
    outer fold's training rows are too few to split again.
    """
    predicted = np.zeros(len(y), dtype=bool)
    thresholds = []
    for train, test in folds:
        try:
            inner = grouped_folds(y[train], groups[train], settings.cv_folds, settings.seed)
            inner_proba = _out_of_fold(c, X[train], y[train], inner, settings.seed)
        except ValueError:  # too few groups, or an inner fold with one class only
            return None
        threshold = choose_threshold(y[train], inner_proba, settings.target_precision).threshold
        predicted[test] = proba[test] >= threshold
        thresholds.append(threshold)
    return predicted, thresholds


def fit_classifier(X: np.ndarray, y: np.ndarray, settings: TrainingConfig,
                   groups: np.ndarray | None = None) -> Fitted:
    """Pick C by out-of-fold average precision, choose the threshold on those predictions, fit on all rows.

    Folds keep each group of `groups` (copies of one image; None: every row its own) together.
    What the threshold gives is then measured by nested cross-validation: a threshold chosen on
    inner folds, scored on the outer fold it never saw.
    """
    from sklearn.exceptions import ConvergenceWarning

    y = np.asarray(y, dtype=bool)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    folds = grouped_folds(y, groups, settings.cv_folds, settings.seed)
    notes: list[str] = []
    by_c: dict[float, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for c in sorted(set(settings.c_grid)):
            proba = _out_of_fold(c, X, y, folds, settings.seed)
            by_c[c] = average_precision(y, proba)
            if best is None or by_c[c] > best[0]:  # ties keep the smaller C: the simpler model
                best = (by_c[c], c, proba)
        assert best is not None
        _, c, proba = best
        choice = choose_threshold(y, proba, settings.target_precision)
        nested = _nested(c, X, y, groups, folds, proba, settings)
        model = _estimator(c, settings.seed).fit(X, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"logistic regression did not converge within {MAX_ITER} iterations for some C")
    if choice.note:
        notes.append(choice.note)
    fitted = Fitted(model, c, choice, by_c, notes, folds=len(folds), groups=len(set(groups.tolist())))
    if nested is None:
        notes.append("too few examples to cross-validate within the folds: the expected precision and recall "
                     "were measured on the predictions that chose the threshold (optimistic)")
    else:
        predicted, thresholds = nested
        fitted.expected = prediction_metrics(y, predicted, proba, choice.threshold)
        fitted.evaluation, fitted.fold_thresholds = NESTED_CV, thresholds
    return fitted
