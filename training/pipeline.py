"""One training run: labels and embeddings in; per collection a new version, a bake-off and the index updated."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from imgstream.analysis.classifiers import EMBEDDING_TYPES
from imgstream.schemas.config import TrainingConfig, WorkerConfig
from imgstream.schemas.operations import TARGETS
from imgstream.training.bakeoff import Entrant, Holdout, choose_holdout, rank, score
from imgstream.training.duplicates import ImageHash, duplicate_groups, group_keys
from imgstream.training.features import DataProblem, FeatureStore, Matrix, Pair, check_key_field, pairs_of
from imgstream.training.fit import MAX_ITER, TooFewGroups, fit_classifier
from imgstream.training.image_identity import ImageIdentities, identify_images
from imgstream.training.labels import CollectionLabels, LabelSet, read_labels
from imgstream.training.progress import Progress
from imgstream.training.registry import Registry, Version

log = logging.getLogger(__name__)

PROMOTED, KEPT, SKIPPED, FAILED = "promoted", "kept", "skipped", "failed"
MAX_REPORTED_GROUPS = 100  # groups of copies listed per collection in the report (all are counted)


class UsageError(ValueError):
    """The run cannot start: bad options, unreadable labels, no source of embeddings."""


@dataclass
class RunInputs:
    """What to train on and where the embeddings come from (the settings are in `TrainingConfig`)."""

    labels: list[Path]
    results: list[Path] = field(default_factory=list)
    use_database: bool = False
    key_field: str = "request_id"
    collection_ids: list[int] = field(default_factory=list)
    embedding_type: str = "embed_clip_vit_b_32"
    region: str = "whole_image"
    progress: bool = True


@dataclass
class CollectionOutcome:
    """What a run did to one collection, as the summary table and the JSON report show it."""

    collection_id: int
    status: str = FAILED
    message: str = ""
    notes: list[str] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=dict)
    image_failures: dict[str, str] = field(default_factory=dict)  # key -> why the engine gave no embedding
    new_version: dict[str, Any] | None = None
    holdout: dict[str, Any] | None = None
    bakeoff: list[dict[str, Any]] = field(default_factory=list)
    unscored: list[dict[str, str]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    pruned: list[str] = field(default_factory=list)
    input: dict[str, Any] | None = None  # what the new model reads: per part, model, dim, normalised or not
    grouping: dict[str, Any] | None = None  # copies of one image, kept on one side of every split

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunReport:
    started_at: str
    finished_at: str
    classifiers_dir: str
    inputs: dict[str, Any]
    settings: dict[str, Any]
    collections: list[CollectionOutcome]
    deleted_model_files: list[str] = field(default_factory=list)  # pruned earlier, their grace period over

    @property
    def ok(self) -> bool:
        return all(c.status in (PROMOTED, KEPT) for c in self.collections)

    def as_dict(self) -> dict[str, Any]:
        return {"started_at": self.started_at, "finished_at": self.finished_at,
                "classifiers_dir": self.classifiers_dir, "inputs": self.inputs, "settings": self.settings,
                "ok": self.ok, "collections": [c.as_dict() for c in self.collections],
                "deleted_model_files": self.deleted_model_files}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_inputs(inputs: RunInputs) -> None:
    try:
        check_key_field(inputs.key_field)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    unknown = [t for t in inputs.embedding_type.split("+") if t not in EMBEDDING_TYPES]
    if unknown:
        raise UsageError(f"unknown embedding type(s) {unknown}; known: {', '.join(EMBEDDING_TYPES)}")
    if inputs.region not in TARGETS:
        raise UsageError(f"unknown region {inputs.region!r}; known: {', '.join(TARGETS)}")


# -- embeddings -----------------------------------------------------------------------------

def _pairs_by_collection(label_set: LabelSet, inputs: RunInputs,
                         versions: dict[int, list[Version]]) -> dict[int, set[Pair]]:
    """The (type, region) embeddings each collection needs: the new setting's and its stored versions'."""
    wanted = set(pairs_of(inputs.embedding_type, inputs.region))
    return {cid: wanted | {p for v in versions.get(cid, []) for p in pairs_of(v.embedding_type, v.region)}
            for cid in label_set.collections}


async def _database_dsn(config: WorkerConfig) -> str:
    if config.sink.dsn:
        return config.sink.database_uri()
    from imgstream.sink.embedded_pg import embedded_postgres_exists, start_embedded_postgres

    if not embedded_postgres_exists(config.sink.data_dir):
        raise UsageError(f"no database in {config.sink.data_dir}; give --dsn, or --data-dir where "
                         "`imgstream sink pgvector` keeps its embedded database")
    return (await asyncio.to_thread(start_embedded_postgres, config.sink.data_dir)).uri


async def load_embeddings(config: WorkerConfig, inputs: RunInputs, label_set: LabelSet,
                          needs: dict[int, set[Pair]]) -> tuple[FeatureStore, dict[str, str]]:
    """Embeddings from the results files, then the database, then the engine for image files still lacking one.

    Returns the store and, per key the engine could not embed, the reason.
    """
    from imgstream.training.from_results import ResultsFileError, read_results_file

    store = FeatureStore()
    keys = label_set.keys
    pairs = set().union(*needs.values()) if needs else set()
    for path in inputs.results:
        try:
            found = await asyncio.to_thread(read_results_file, path, inputs.key_field, pairs, keys)
        except ResultsFileError as exc:
            raise UsageError(str(exc)) from None
        for pair, embeddings in found.items():
            store.merge(pair, embeddings)
    if inputs.use_database:
        try:
            import psycopg
        except ImportError:
            raise UsageError("reading the sink's database needs psycopg: pip install 'imgstream[sink]'") from None
        from imgstream.training.from_database import read_database

        dsn = await _database_dsn(config)
        try:
            found = await read_database(dsn, inputs.key_field, pairs, keys)
        except psycopg.OperationalError as exc:
            raise UsageError(f"cannot connect to the database: {exc}") from None
        for pair, embeddings in found.items():
            store.merge(pair, embeddings)
    wanted: dict[str, set[Pair]] = {}
    for cid, collection in label_set.collections.items():
        for key in collection.labels:
            missing = {p for p in needs[cid] if not store.has(p, key)} if key in label_set.images else set()
            if missing:
                wanted.setdefault(key, set()).update(missing)
    failed: dict[str, str] = {}
    if wanted:
        from imgstream.training.from_images import embed_images

        try:
            embedded = await embed_images(config, label_set.images, {k: sorted(v) for k, v in wanted.items()},
                                          inputs.progress)
        except Exception as exc:  # noqa: BLE001 - e.g. weights missing: a message, not a traceback
            raise UsageError(f"cannot embed the labelled images with the {config.models.weights} weights: "
                             f"{type(exc).__name__}: {exc}") from None
        for pair, embeddings in embedded.found.items():
            store.merge(pair, embeddings)
        failed = embedded.failed
    return store, failed


# -- one collection -------------------------------------------------------------------------

@dataclass
class _Comparable:
    version: Version
    matrix: Matrix
    rows: dict[str, int]


def _comparable(versions: list[Version], store: FeatureStore, keys: list[str],
                outcome: CollectionOutcome) -> list[_Comparable]:
    """The stored versions this data can score; the others are listed in `outcome.unscored` with why."""
    out = []
    for version in versions:
        try:
            matrix = store.assemble(keys, version.embedding_type, version.region, version.normalized)
        except DataProblem as exc:
            outcome.unscored.append({"version": version.version, "reason": str(exc)})
            continue
        why = None
        if not matrix.keys:
            why = f"the data has no {version.embedding_type} embeddings on {version.region} for this collection"
        elif matrix.X.shape[1] != version.dim:
            why = f"it takes {version.dim} features, the data gives {matrix.X.shape[1]}"
        else:
            other = {t: m for t, m in matrix.models.items() if version.embedding_models.get(t, m) != m}
            if other:
                why = (f"it was trained on embeddings from {version.embedding_models}, "
                       f"the data holds embeddings from {matrix.models}")
        if why:
            outcome.unscored.append({"version": version.version, "reason": why})
            continue
        out.append(_Comparable(version, matrix, {k: i for i, k in enumerate(matrix.keys)}))
    return out


def _current(index: dict[str, Any], collection_id: int, versions: list[Version]) -> tuple[Version | None, str | None]:
    """The version best_models.json points at, or (None, model file) for an entry no version describes."""
    entry = index.get(str(collection_id))
    if entry is None:
        return None, None
    model_file = entry if isinstance(entry, str) else entry.get("model_file") if isinstance(entry, dict) else None
    for version in versions:
        if version.model_file == model_file:
            return version, model_file
    return None, str(model_file)


def _input_record(inputs: RunInputs, matrix: Matrix) -> dict[str, Any]:
    """What a model reads, as its manifest and index entry record it and the worker rebuilds it."""
    return {"embedding_type": inputs.embedding_type, "region": inputs.region, "dim": int(matrix.X.shape[1]),
            "parts": [part.as_dict() for part in matrix.parts]}


def _manifest(inputs: RunInputs, settings: TrainingConfig, matrix: Matrix, fitted: Any, y: np.ndarray,
              sources: list[str]) -> dict[str, Any]:
    return {
        "embedding_type": inputs.embedding_type, "derivative_type": inputs.region,
        "threshold": fitted.choice.threshold, "dim": int(matrix.X.shape[1]),
        "embedding_models": matrix.models,
        "input": _input_record(inputs, matrix),
        "classifier": {"kind": "logistic_regression", "class_weight": "balanced", "C": fitted.C,
                       "max_iter": MAX_ITER},
        "settings": {"c_grid": sorted(set(settings.c_grid)), "cv_folds": settings.cv_folds, "seed": settings.seed,
                     "threshold_rule": fitted.choice.rule, "target_precision": settings.target_precision,
                     "holdout_fraction": settings.holdout_fraction, "key": inputs.key_field, "sources": sources,
                     "near_duplicate_distance": settings.near_duplicate_distance},
        "training": {"examples": int(len(y)), "positives": int(y.sum()), "negatives": int((~y).sum())},
        "metrics": {"cv": fitted.choice.expected.as_dict(), "expected": fitted.honest.as_dict(),
                    "threshold_evaluation": fitted.evaluation_dict(),
                    "cv_average_precision_by_c": {str(c): ap for c, ap in fitted.cv_average_precision_by_c.items()}},
        "notes": fitted.notes,
    }


def _training_data(collection: CollectionLabels, store: FeatureStore, failed_images: dict[str, str],
                   settings: TrainingConfig, inputs: RunInputs,
                   outcome: CollectionOutcome) -> tuple[Matrix, np.ndarray]:
    """The collection's feature matrix and labels; raises DataProblem when they cannot train a model."""
    labels = collection.labels
    keys = sorted(labels)
    matrix = store.assemble(keys, inputs.embedding_type, inputs.region)
    y = np.array([labels[k] for k in matrix.keys], dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    outcome.examples = {"labelled": len(keys), "with_embeddings": len(matrix.keys), "positives": positives,
                        "negatives": negatives, "lacking_embeddings": matrix.lacking,
                        "conflicting_labels": len(collection.conflicting)}
    if collection.conflicting:
        outcome.notes.append(f"{len(collection.conflicting)} keys labelled both ways were left out "
                             f"(e.g. {', '.join(collection.conflicting[:3])})")
    outcome.image_failures = {k: failed_images[k] for k in keys if k in failed_images}
    if outcome.image_failures:
        first = next(iter(outcome.image_failures.items()))
        outcome.notes.append(f"{len(outcome.image_failures)} images gave no embedding (e.g. {first[0]}: {first[1]})")
    if matrix.lacking and matrix.keys and "+" in inputs.embedding_type:
        outcome.notes.append(f"{matrix.lacking} labelled keys lack some part of {inputs.embedding_type} and were "
                             "left out")
    outcome.input = {**_input_record(inputs, matrix), "normalized_here": matrix.normalized_here}
    for t, count in matrix.normalized_here.items():
        outcome.notes.append(f"{count} raw {t} vectors were L2-normalised to match the "
                             f"{len(matrix.keys) - count} normalised ones: the model reads normalised vectors")
    if not keys:
        raise DataProblem("no labelled rows for this collection")
    if not matrix.keys:
        raise DataProblem(f"none of its {len(keys)} labelled keys has a {inputs.embedding_type} embedding "
                          f"on {inputs.region}")
    if positives == 0 or negatives == 0:
        raise DataProblem(f"only one class: {positives} positive and {negatives} negative examples with embeddings")
    need = settings.min_examples_per_class
    if positives < need or negatives < need:
        raise DataProblem(f"too few examples: {positives} positive and {negatives} negative with embeddings; "
                          f"at least {need} of each needed")
    return matrix, y


@dataclass
class _NewModel:
    """This run's model before it is stored: what it was fitted on and how."""

    fitted: Any
    matrix: Matrix
    train_rows: list[int]
    y_train: np.ndarray
    hashes: dict[str, ImageHash] = field(default_factory=dict)

    def store(self, registry: Registry, cid: int, inputs: RunInputs, settings: TrainingConfig,
              sources: list[str], versions: list[Version], outcome: CollectionOutcome) -> Version:
        manifest = _manifest(inputs, settings, self.matrix, self.fitted, self.y_train, sources)
        keys = [self.matrix.keys[i] for i in self.train_rows]
        version = registry.add(cid, self.fitted.model, manifest, keys, [self.matrix.sha256[i] for i in self.train_rows],
                               versions, [self.hashes[k] for k in keys if k in self.hashes])
        assert outcome.new_version is not None
        outcome.new_version.update(version=version.version, stored=True, model_file=version.model_file)
        return version


def _fit_new(matrix: Matrix, y: np.ndarray, holdout: Holdout, settings: TrainingConfig,
             outcome: CollectionOutcome, groups: dict[str, str], hashes: dict[str, ImageHash]) -> _NewModel:
    held = set(holdout.keys)
    train_rows = [i for i, k in enumerate(matrix.keys) if k not in held]
    try:
        fitted = fit_classifier(matrix.X[train_rows], y[train_rows], settings,
                                np.array([groups.get(matrix.keys[i], matrix.keys[i]) for i in train_rows]))
    except TooFewGroups as exc:
        raise DataProblem(str(exc)) from None
    outcome.notes += fitted.notes
    expected = fitted.honest
    outcome.new_version = {
        "version": None, "stored": False, "threshold": fitted.choice.threshold,
        "threshold_rule": fitted.choice.rule, "expected_precision": expected.precision,
        "expected_recall": expected.recall, "C": fitted.C, "training_examples": len(train_rows),
        "cv": fitted.choice.expected.as_dict(), "expected": expected.as_dict(),
        "threshold_evaluation": fitted.evaluation,
        "folds": {"count": fitted.folds, "groups": fitted.groups, "fold_thresholds": fitted.fold_thresholds},
    }
    return _NewModel(fitted, matrix, train_rows, y[train_rows], hashes)


def _bake_off(new: Version, new_model: _NewModel, comparable: list[_Comparable], current: Version | None,
              holdout: Holdout, registry: Registry, metric: str, outcome: CollectionOutcome) -> list[Entrant]:
    """Every comparable version and the new one scored on the held-out keys, best first."""
    row_of = {k: i for i, k in enumerate(new_model.matrix.keys)}
    X_new = new_model.matrix.X[[row_of[k] for k in holdout.keys]]
    entrants = [Entrant(new, score(new, new_model.fitted.model, X_new, holdout.labels), False, True)]
    for c in comparable:
        try:
            model = registry.load_model(c.version)
            X = c.matrix.X[[c.rows[k] for k in holdout.keys]]
            entrants.append(Entrant(c.version, score(c.version, model, X, holdout.labels),
                                    c.version is current, False))
        except Exception as exc:  # noqa: BLE001 - a broken stored model must not stop the others
            outcome.unscored.append({"version": c.version.version, "reason": f"cannot score it: {exc}"})
    ranked = rank(entrants, metric)
    outcome.bakeoff = [{"rank": i, "version": e.version.version, "score": e.metrics.value(metric),
                        "current": e.is_current, "new": e.is_new, "metrics": e.metrics.as_dict()}
                       for i, e in enumerate(ranked, 1)]
    return ranked


def _grouping(matrix: Matrix, groups: dict[str, str], identities: ImageIdentities,
              settings: TrainingConfig) -> dict[str, Any]:
    """How the collection's keys were grouped into images, for the report."""
    mine = {k: groups.get(k, k) for k in matrix.keys}
    copies = duplicate_groups(mine)
    return {"by": ["sha256"] + (["perceptual_hash"] if settings.near_duplicate_distance is not None else []),
            "near_duplicate_distance": settings.near_duplicate_distance, **identities.as_dict(matrix.keys),
            "groups": len(set(mine.values())), "keys_with_copies": sum(len(c) for c in copies),
            "duplicates": copies[:MAX_REPORTED_GROUPS], "duplicate_groups": len(copies)}


def train_collection(collection: CollectionLabels, store: FeatureStore, failed_images: dict[str, str],
                     registry: Registry, settings: TrainingConfig, inputs: RunInputs,
                     sources: list[str], identities: ImageIdentities | None = None,
                     groups: dict[str, str] | None = None) -> CollectionOutcome:
    """Train a new version, run the bake-off, update the index and prune; data problems end in `skipped`.

    `groups` maps each key to its group of copies of one image (see training.duplicates); folds
    and the held-out set never split a group.
    """
    identities = identities or ImageIdentities()
    groups = groups or {}
    cid = collection.collection_id
    outcome = CollectionOutcome(cid)
    versions, broken = registry.versions(cid)
    outcome.notes += broken
    try:
        matrix, y = _training_data(collection, store, failed_images, settings, inputs, outcome)
    except DataProblem as exc:
        outcome.status, outcome.message = SKIPPED, str(exc)
        return outcome

    outcome.grouping = _grouping(matrix, groups, identities, settings)
    comparable = _comparable(versions, store, sorted(collection.labels), outcome)
    candidates = set(matrix.keys).intersection(*(set(c.matrix.keys) for c in comparable))
    holdout = choose_holdout(sorted(candidates), collection.labels, dict(zip(matrix.keys, matrix.sha256)), versions,
                             {True: int(y.sum()), False: int((~y).sum())}, settings.holdout_fraction,
                             settings.min_holdout_per_class, settings.seed, cid, groups, identities.hashes,
                             settings.near_duplicate_distance, matrix.keys)
    outcome.holdout = holdout.as_dict()
    try:
        new_model = _fit_new(matrix, y, holdout, settings, outcome, groups, identities.hashes)
    except DataProblem as exc:
        outcome.status, outcome.message = SKIPPED, str(exc)
        return outcome
    current, current_file = _current(registry.index(), cid, versions)

    if not holdout.enough:
        too_few = (f"held-out set too small to compare versions ({holdout.describe()}; "
                   f"{settings.min_holdout_per_class} of each needed)")
        if current_file is not None:
            outcome.status = KEPT
            outcome.message = f"{too_few}: kept {current.version if current else current_file}; new model discarded"
            outcome.best = _best_summary(current, current_file, changed=False)
            return outcome
        new = new_model.store(registry, cid, inputs, settings, sources, versions, outcome)
        cv = new_model.fitted.choice.expected.as_dict()
        registry.set_best(cid, new.index_entry(rank_metric=settings.rank_metric,
                                               metrics={"cv": cv, "holdout": None, "expected": new.expected}))
        outcome.status = PROMOTED
        outcome.message = f"first model of this collection: {new.version} (no bake-off: {too_few})"
        outcome.best = _best_summary(new, new.model_file, changed=True)
        return outcome

    new = new_model.store(registry, cid, inputs, settings, sources, versions, outcome)
    metric = settings.rank_metric
    ranked = _bake_off(new, new_model, comparable, current, holdout, registry, metric, outcome)
    winner = ranked[0]
    if current is not None and all(e.version is not current for e in ranked):
        # The model in service could not be judged on this data (e.g. other embedding weights): leave it there.
        why = next((u["reason"] for u in outcome.unscored if u["version"] == current.version), "not scored")
        outcome.status = KEPT
        outcome.message = (f"{current.version} stays best: it cannot be scored on this data ({why}); "
                           f"best of the others: {winner.version.version}")
        outcome.best = _best_summary(current, current.model_file, changed=False)
        _prune(registry, current, ranked, versions, settings, outcome)
        return outcome

    changed = winner.version is not current
    summary = f"{winner.version.version} {metric} {winner.metrics.value(metric):.3f} on {holdout.describe()} held out"
    if changed:
        cv = winner.version.manifest.get("metrics", {}).get("cv")
        registry.set_best(cid, winner.version.index_entry(rank_metric=metric, selected_at=_now(),
                                                          metrics={"cv": cv, "holdout": winner.metrics.as_dict(),
                                                                   "expected": winner.version.expected}))
        outcome.status = PROMOTED
        replaced = current.version if current else current_file
        if replaced:
            outcome.message = f"new best {summary} (was {replaced})"
        else:
            outcome.message = f"first model of this collection: {summary}"
        if current is None and current_file is not None:
            outcome.notes.append(f"replaced {current_file}, a model without a version record (not compared)")
    else:
        new_rank = next(i for i, e in enumerate(ranked, 1) if e.is_new)
        outcome.status = KEPT
        outcome.message = f"{summary} stays best; {new.version} ranked {new_rank} of {len(ranked)}"
    outcome.best = _best_summary(winner.version, winner.version.model_file, changed)
    _prune(registry, winner.version, ranked, versions, settings, outcome)
    return outcome


def _prune(registry: Registry, best: Version, ranked: list[Entrant], stored: list[Version],
           settings: TrainingConfig, outcome: CollectionOutcome) -> None:
    """Keep `keep_versions`: the best, the others this run ranked (best first), then those it could not
    score (newest first); retire the rest (after the index no longer names them)."""
    order = [best] + [e.version for e in ranked if e.version.version != best.version]
    scored = {v.version for v in order}
    order += sorted((v for v in stored if v.version not in scored), key=lambda v: -v.sequence)
    for version in order[settings.keep_versions:]:
        registry.delete(version, settings.prune_grace_s)
        outcome.pruned.append(version.version)


def _best_summary(version: Version | None, model_file: str | None, changed: bool) -> dict[str, Any]:
    if version is None:
        return {"version": None, "model_file": model_file, "changed": changed}
    expected = version.expected
    return {"version": version.version, "model_file": version.model_file, "threshold": version.threshold,
            "embedding_type": version.embedding_type, "derivative_type": version.region,
            "expected_precision": expected.get("precision"), "expected_recall": expected.get("recall"),
            "changed": changed}


# -- the run --------------------------------------------------------------------------------

def run_training(config: WorkerConfig, inputs: RunInputs) -> RunReport:
    """Train every labelled collection; one collection's failure never stops the others."""
    started = _now()
    check_inputs(inputs)
    if not inputs.labels:
        raise UsageError("give at least one --labels file")
    from imgstream.training.labels import LabelsError

    try:
        label_set = read_labels(inputs.labels, inputs.collection_ids)
    except LabelsError as exc:
        raise UsageError(str(exc)) from None
    if not label_set.collections:
        raise UsageError("the labels files hold no rows" + (" for the given --collection-id" if inputs.collection_ids
                                                           else ""))
    if not inputs.results and not inputs.use_database and not label_set.images:
        raise UsageError("no embeddings to train on: give --results FILE, --dsn/--db (the sink's database), "
                         "or an image column in the labels")
    settings = config.training
    registry = Registry(config.models.classifiers_dir)
    sources = [f"results:{p}" for p in inputs.results] + (["database"] if inputs.use_database else [])
    if label_set.images:
        sources.append("images")
    outcomes: list[CollectionOutcome] = []
    with registry.locked():
        deleted = registry.sweep_retired()
        versions = {cid: registry.versions(cid)[0] for cid in label_set.collections}
        needs = _pairs_by_collection(label_set, inputs, versions)
        store, failed_images, identities = asyncio.run(_load(config, inputs, label_set, needs))
        groups = group_keys(sorted(label_set.keys), identities.sha256, identities.hashes,
                            settings.near_duplicate_distance)
        bar = Progress("training", len(label_set.collections), inputs.progress, unit="collection")
        try:
            for cid in sorted(label_set.collections):
                bar.note(f"collection {cid}")
                try:
                    outcome = train_collection(label_set.collections[cid], store, failed_images, registry, settings,
                                               inputs, sources, identities, groups)
                except Exception as exc:  # noqa: BLE001 - reported as this collection's failure
                    log.exception("collection %d failed", cid)
                    outcome = CollectionOutcome(cid, FAILED, f"{type(exc).__name__}: {exc}")
                outcomes.append(outcome)
                bar.advance()
        finally:
            bar.close()
    return RunReport(
        started_at=started, finished_at=_now(), classifiers_dir=str(registry.directory),
        inputs={"labels": [str(p) for p in inputs.labels], "results": [str(p) for p in inputs.results],
                "database": inputs.use_database, "key": inputs.key_field, "embedding_type": inputs.embedding_type,
                "region": inputs.region, "collection_ids": inputs.collection_ids},
        settings=settings.model_dump(), collections=outcomes, deleted_model_files=deleted,
    )


async def _load(config: WorkerConfig, inputs: RunInputs, label_set: LabelSet,
                needs: dict[int, set[Pair]]) -> tuple[FeatureStore, dict[str, str], ImageIdentities]:
    """The embeddings, then what is known of each key's image (for grouping copies)."""
    store, failed = await load_embeddings(config, inputs, label_set, needs)
    identities = await identify_images(config, label_set.images, store, label_set.keys, inputs.progress)
    return store, failed, identities
