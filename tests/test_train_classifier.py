"""scripts/train_classifier.py, the old entry point (now a wrapper of `imgstream train-classifiers`), still works."""

from __future__ import annotations

import asyncio
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from PIL import ImageOps

from imgstream.analysis.classifiers import ClassifierStore
from tests.engine_helpers import by_op, photo, request

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_classifier.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def labelled_results(engine, tmp_path):
    """CLIP results for 16 real-photo variants, labelled 'has a person' (astronaut, camera) or not."""
    lines, labels = [], ["key,label"]
    variants = [lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(90)]
    for name, label in (("astronaut", 1), ("camera", 1), ("coffee", 0), ("chelsea", 0)):
        for i, variant in enumerate(variants):
            req = request(("clip", "embed_clip_vit_b_32", {}), metadata={"photo_id": f"{name}-{i}"})
            (result,) = await engine.run(req, variant(photo(name)))
            lines.append(result.model_dump_json())
            labels.append(f"{name}-{i},{label}")
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    return tmp_path


async def test_trains_registers_and_the_engine_classifies_with_it(engine, labelled_results):
    out = labelled_results / "classifiers"
    out.mkdir()
    (out / "best_models.json").write_bytes(orjson.dumps({"3": {"model_file": "keep.pkl", "derivative_type":
                                                               "whole_image", "embedding_type": "embed_dino_v2"}}))
    argv = ["--collection-id", "11", "--results", str(labelled_results / "results.jsonl"),
            "--labels", str(labelled_results / "labels.csv"), "--key", "metadata.photo_id",
            "--out", str(out), "--no-progress"]
    code = await asyncio.to_thread(_script().main, argv)  # the command runs an event loop of its own
    assert code == 0
    index = orjson.loads((out / "best_models.json").read_bytes())
    assert set(index) == {"3", "11"}  # other collections are kept
    entry = index["11"]
    assert entry["derivative_type"] == "whole_image" and entry["embedding_type"] == "embed_clip_vit_b_32"
    assert (out / entry["model_file"]).exists() and 0.0 <= entry["threshold"] <= 1.0
    # two of each class are held out (too few for a bake-off, so this first model is simply registered)
    assert entry["metrics"]["cv"]["positives"] == 6 and entry["metrics"]["cv"]["negatives"] == 6
    assert entry["version"] and (out / "collection_11" / f"{entry['version']}.json").exists()

    saved = engine.classifiers
    engine.classifiers = ClassifierStore(out)
    try:
        result = by_op(await engine.run(request(("c", "classify", {"collection_id": 11})), photo("astronaut")))["c"]
    finally:
        engine.classifiers = saved
    assert result.status == "success", result.error_message
    assert result.data["threshold"] == entry["threshold"]


def test_refuses_too_few_labels_and_bad_labels(labelled_results):
    script = _script()

    def run(*argv: str) -> int:  # in a thread: the command runs an event loop of its own
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(script.main, [*argv, "--no-progress"]).result()

    (labelled_results / "few.csv").write_text("key,label\nastronaut-0,1\ncoffee-0,0\n")
    assert run("--collection-id", "1", "--results", str(labelled_results / "results.jsonl"),
               "--labels", str(labelled_results / "few.csv"), "--key", "metadata.photo_id",
               "--out", str(labelled_results)) == 1
    (labelled_results / "bad.csv").write_text("key,label\nastronaut-0,maybe\n")
    assert run("--collection-id", "1", "--results", str(labelled_results / "results.jsonl"),
               "--labels", str(labelled_results / "bad.csv"), "--out", str(labelled_results)) == 2
