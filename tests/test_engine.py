"""The task engine without Kafka: `await engine.run(request, image)` on real photos.

Random weights (seeded) for CLIP, DINOv2, Faster R-CNN and BLIP; MTCNN's real bundled weights.
"""

from __future__ import annotations

import asyncio
import base64
import io

import joblib
import numpy as np
import orjson
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from imgstream.analysis.classifiers import ClassifierStore
from imgstream.schemas.codec import decode_result, encode
from tests.engine_helpers import by_op, photo, request

ASTRONAUT_FACE = (170, 40, 290, 200)  # generous box around the astronaut's face (512x512 photo)


def _inside(box, outer) -> bool:
    return box[0] >= outer[0] and box[1] >= outer[1] and box[2] <= outer[2] and box[3] <= outer[3]


async def test_face_box_lies_around_the_astronauts_face(engine):
    results = by_op(await engine.run(request(("face", "detect_bounding_box", {"target": "prominent_face"})),
                                     photo("astronaut")))
    face = results["face"]
    assert face.status == "success"
    box = face.data
    assert all(isinstance(v, int) for v in box) and box[0] < box[2] and box[1] < box[3]
    assert _inside(box, ASTRONAUT_FACE), box
    assert face.model.name == "MTCNN" or "mtcnn" in face.model.name.lower()
    assert face.image.width == 512 and face.image.height == 512


@pytest.mark.parametrize("op_type, dim", [("embed_clip_vit_b_32", 512), ("embed_dino_v2", 768)])
@pytest.mark.parametrize("target", ["whole_image", "prominent_person", "prominent_face"])
async def test_embeddings_for_every_target(engine, op_type, dim, target):
    results = by_op(await engine.run(request(("e", op_type, {"target": target})), photo("astronaut")))
    result = results["e"]
    assert result.status == "success", result.error_message
    # In process an embedding is a float32 array; on the wire, a list of floats.
    assert isinstance(result.data, np.ndarray) and result.data.shape == (dim,) and result.data.dtype == np.float32
    wire = decode_result(encode(result))
    assert len(wire.data) == dim and all(isinstance(v, float) for v in wire.data)
    assert np.array_equal(np.asarray(wire.data, dtype=np.float32), result.data)  # float32 text reads back exactly
    assert result.model.weights == "random" and result.model.dim == dim
    if target == "prominent_face":
        assert result.region == "prominent_face"
        assert _inside(result.cropped_image_bbox, ASTRONAUT_FACE)
        png = base64.b64decode(result.cropped_image_base64)
        crop = Image.open(io.BytesIO(png))
        x0, y0, x1, y1 = result.cropped_image_bbox
        assert crop.size == (x1 - x0, y1 - y0)
    elif target == "whole_image" or result.region == "whole_image":
        assert result.cropped_image_bbox is None and result.cropped_image_base64 is None


@pytest.fixture
async def person_prone_detector(engine):
    """Random Faster R-CNN weights never say "person"; bias its class head so they do, then restore.

    Boxes still come from the real (random) RPN and box regressor, so the whole
    detect -> clamp -> crop -> embed path runs for real.
    """
    import torch

    head = (await engine.model("person"))._model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        head.bias[1] += 12.0
    yield
    with torch.no_grad():
        head.bias[1] -= 12.0


async def test_person_crop_when_a_person_is_found(engine, person_prone_detector):
    results = by_op(await engine.run(request(
        ("box", "detect_bounding_box", {"target": "prominent_person", "min_score": 0.0}),
        ("emb", "embed_clip_vit_b_32", {"target": "prominent_person", "min_score": 0.0, "return_crop": False}),
    ), photo("astronaut")))
    box = results["box"].data
    assert box is not None and 0 <= box[0] < box[2] <= 512 and 0 <= box[1] < box[3] <= 512
    assert results["emb"].region == "prominent_person"
    assert results["emb"].cropped_image_bbox == box
    assert results["emb"].cropped_image_base64 is None  # return_crop: false


async def test_person_fallback_to_whole_image(engine):
    results = by_op(await engine.run(request(
        ("box", "detect_bounding_box", {"target": "prominent_person", "min_score": 1.0}),
        ("emb", "embed_clip_vit_b_32", {"target": "prominent_person", "min_score": 1.0}),
        ("whole", "embed_clip_vit_b_32", {"target": "whole_image"}),
    ), photo("astronaut")))
    assert results["box"].status == "success" and results["box"].data is None
    emb = results["emb"]
    assert emb.status == "success" and emb.region == "whole_image"
    assert emb.cropped_image_bbox is None and emb.cropped_image_base64 is None
    # Exact: the fallback and the whole-image task share one embedding stage (one computation).
    assert np.array_equal(emb.data, results["whole"].data)


async def test_no_face_is_skipped_with_the_spec_message(engine):
    blank = Image.new("RGB", (320, 240), "white")
    results = by_op(await engine.run(request(
        ("clip_face", "embed_clip_vit_b_32", {"target": "prominent_face"}),
        ("face_box", "detect_bounding_box", {"target": "prominent_face"}),
        ("whole", "embed_clip_vit_b_32", {}),
    ), blank))
    skipped = results["clip_face"]
    assert skipped.status == "skipped" and skipped.error_code == "no_face_found"
    assert skipped.error_message == "No prominent face found for operation 'clip_face'."
    assert results["face_box"].status == "success" and results["face_box"].data is None
    assert results["whole"].status == "success"


async def test_unknown_operation_and_bad_params_are_skipped_while_siblings_succeed(engine):
    results = by_op(await engine.run(request(
        ("nope", "embed_dino_v9", {}),
        ("bad_target", "embed_clip_vit_b_32", {"target": "prominent_cat"}),
        ("bad_context", "embed_clip_vit_b_32", {"target": "prominent_face", "face_context": "nowhere"}),
        ("bad_len", "describe_image", {"max_length": 1000}),
        ("ok", "embed_clip_vit_b_32", {}),
    ), photo("astronaut")))
    assert (results["nope"].status, results["nope"].error_code) == ("skipped", "unsupported_operation")
    for op in ("bad_target", "bad_context", "bad_len"):
        assert (results[op].status, results[op].error_code) == ("skipped", "invalid_params"), op
    assert results["ok"].status == "success"


async def test_both_face_contexts_in_one_request_are_detected_separately(engine):
    before = engine.stage_counts["face"]
    results = by_op(await engine.run(request(
        ("in_person", "detect_bounding_box", {"target": "prominent_face", "face_context": "prominent_person"}),
        ("in_whole", "detect_bounding_box", {"target": "prominent_face", "face_context": "whole_image"}),
        ("in_whole_again", "embed_clip_vit_b_32", {"target": "prominent_face", "face_context": "whole_image"}),
    ), photo("astronaut")))
    assert engine.stage_counts["face"] - before == 2
    # Exact: both tasks read the one face detection of the whole-image context.
    assert results["in_whole"].data == results["in_whole_again"].cropped_image_bbox
    assert _inside(results["in_person"].data, ASTRONAUT_FACE)


async def test_detections_and_crops_run_once_per_request(engine, person_prone_detector):
    before = dict(engine.stage_counts)
    face = {"target": "prominent_face", "face_context": "whole_image"}
    results = by_op(await engine.run(request(
        ("clip", "embed_clip_vit_b_32", face),
        ("clip_norm", "embed_clip_vit_b_32", {**face, "normalize": True}),
        ("dino", "embed_dino_v2", face),
        ("box", "detect_bounding_box", face),
        ("caption", "describe_image", {**face, "max_length": 5}),
        ("person_box", "detect_bounding_box", {"target": "prominent_person", "min_score": 0.0}),
        ("person_clip", "embed_clip_vit_b_32", {"target": "prominent_person", "min_score": 0.0}),
    ), photo("astronaut")))
    assert all(r.status == "success" for r in results.values()), [r.error_message for r in results.values()]
    assert results["person_box"].data is not None
    delta = {k: engine.stage_counts[k] - before.get(k, 0) for k in engine.stage_counts}
    assert delta["person"] == 1 and delta["face"] == 1
    distinct_boxes = {tuple(results["box"].data), tuple(results["person_box"].data)}
    assert delta["crop"] == len(distinct_boxes)  # one crop per distinct box, shared by every task
    assert delta["png"] == len(distinct_boxes)
    assert delta["embed"] == 3  # face CLIP once (plain and normalised share it), face DINOv2, person CLIP
    plain, unit = np.array(results["clip"].data), np.array(results["clip_norm"].data)
    assert np.allclose(unit, plain / np.linalg.norm(plain), atol=1e-5)
    assert (results["clip"].normalized, results["clip_norm"].normalized, results["dino"].normalized) == (
        False, True, False)  # every embedding says which it is; other results say nothing
    assert results["box"].normalized is None and results["caption"].normalized is None
    assert results["clip"].cropped_image_base64 == results["dino"].cropped_image_base64


def _train_classifier(directory, collection_id, dim, region, embedding_type, threshold=0.5, input=None):
    rng = np.random.default_rng(collection_id)
    X = rng.normal(size=(40, dim))
    y = np.array([True, False] * 20)
    model = LogisticRegression(max_iter=200).fit(X, y)
    name = f"collection_{collection_id}_classifier_2026-11-25_120000.pkl"
    joblib.dump(model, directory / name)
    index_path = directory / "best_models.json"
    index = orjson.loads(index_path.read_bytes()) if index_path.exists() else {}
    index[str(collection_id)] = {"model_file": name, "derivative_type": region, "embedding_type": embedding_type,
                                 "threshold": threshold, **({"input": input} if input is not None else {})}
    index_path.write_bytes(orjson.dumps(index))
    return model


@pytest.fixture
def classifier_dir(engine, tmp_path):
    saved = engine.classifiers
    engine.classifiers = ClassifierStore(tmp_path)
    yield tmp_path
    engine.classifiers = saved


async def test_classify_uses_the_classifiers_region_and_shares_the_embedding(engine, classifier_dir):
    tmp_path = classifier_dir
    model = _train_classifier(tmp_path, 7, 512, "prominent_face", "embed_clip_vit_b_32", threshold=0.3)
    _train_classifier(tmp_path, 8, 512 + 768, "whole_image", "embed_clip_vit_b_32+embed_dino_v2")
    clip_calls = engine.stage_counts["embed"]
    results = by_op(await engine.run(request(
        ("cls", "classify", {"collection_id": 7}),
        ("emb", "embed_clip_vit_b_32", {"target": "prominent_face"}),
        ("combo", "classify", {"collection_id": "8"}),
        ("contradicts", "classify", {"collection_id": 7, "target": "whole_image"}),
        ("missing", "classify", {"collection_id": 999}),
    ), photo("astronaut")))
    cls = results["cls"]
    assert cls.status == "success", cls.error_message
    assert set(cls.data) == {"is_in_collection", "probability", "threshold"}
    assert cls.region == "prominent_face" and cls.data["threshold"] == 0.3
    expected = model.predict_proba(np.array([results["emb"].data]))[0][1]
    assert cls.data["probability"] == pytest.approx(expected, abs=1e-6)
    assert cls.data["is_in_collection"] == (expected >= 0.3)
    assert results["combo"].status == "success" and results["combo"].region == "whole_image"
    assert results["combo"].model.dim == 512 + 768
    # face CLIP shared by classify 7 and the embed task; whole-image CLIP and DINOv2 for collection 8
    assert engine.stage_counts["embed"] - clip_calls == 3
    assert (results["contradicts"].status, results["contradicts"].error_code) == ("skipped", "invalid_params")
    assert (results["missing"].status, results["missing"].error_code) == ("skipped", "classifier_not_found")


async def test_classify_builds_the_input_the_classifier_records_part_by_part(engine, classifier_dir):
    clip, dino = "embed_clip_vit_b_32", "embed_dino_v2"

    def part(type_, dim, normalized, weights="random"):
        name = "ViT-B-32-quickgelu" if type_ == clip else "dinov2-base-random"
        return {"embedding_type": type_, "model": f"{name}/{weights}", "dim": dim, "normalized": normalized}

    both = f"{clip}+{dino}"
    model = _train_classifier(classifier_dir, 31, 1280, "whole_image", both,
                              input={"parts": [part(clip, 512, False), part(dino, 768, True)]})
    _train_classifier(classifier_dir, 32, 512, "whole_image", clip, input={"parts": [part(clip, 512, True, "openai")]})
    _train_classifier(classifier_dir, 33, 512, "whole_image", clip, input={"parts": [part(dino, 768, True)]})
    results = by_op(await engine.run(request(
        ("mixed", "classify", {"collection_id": 31, "normalize": True}),
        ("pretrained", "classify", {"collection_id": 32}),
        ("garbled", "classify", {"collection_id": 33}),
        ("clip", clip, {}), ("dino", dino, {"normalize": True}),
    ), photo("astronaut")))
    assert results["mixed"].status == "success", results["mixed"].error_message
    features = np.concatenate([results["clip"].data, results["dino"].data])[None].astype(np.float64)
    assert results["mixed"].data["probability"] == pytest.approx(model.predict_proba(features)[0][1], abs=1e-5)
    # Served vectors from random weights, it learnt pretrained ones: an error, not a wrong probability.
    assert (results["pretrained"].status, results["pretrained"].error_code) == ("error", "classifier_invalid")
    assert "openai" in results["pretrained"].error_message
    assert (results["garbled"].status, results["garbled"].error_code) == ("error", "classifier_invalid")


async def test_classifier_changes_are_picked_up_without_restart(engine, classifier_dir):
    tmp_path = classifier_dir
    _train_classifier(tmp_path, 3, 512, "whole_image", "embed_clip_vit_b_32", threshold=0.0)
    first = by_op(await engine.run(request(("c", "classify", {"collection_id": 3})), photo("astronaut")))["c"]
    assert first.data["is_in_collection"] is True
    _train_classifier(tmp_path, 3, 512, "whole_image", "embed_clip_vit_b_32", threshold=1.01)
    second = by_op(await engine.run(request(("c", "classify", {"collection_id": 3})), photo("astronaut")))["c"]
    assert second.data["threshold"] == 1.01 and second.data["is_in_collection"] is False


async def test_describe_image_respects_max_length(engine):
    results = by_op(await engine.run(request(
        ("short", "describe_image", {"max_length": 3}),
        ("longer", "describe_image", {"max_length": 12}),
        ("face", "describe_image", {"target": "prominent_face", "max_length": 4}),
    ), photo("astronaut")))
    for op in ("short", "longer", "face"):
        assert results[op].status == "success", results[op].error_message
        assert isinstance(results[op].data, str)
    tokenizer = (await engine.model("caption"))._processor.tokenizer
    assert len(tokenizer(results["short"].data, add_special_tokens=False)["input_ids"]) <= 3
    assert len(tokenizer(results["longer"].data, add_special_tokens=False)["input_ids"]) <= 12
    assert results["face"].region == "prominent_face" and results["face"].cropped_image_bbox is not None


async def test_concurrent_requests_are_batched_across_requests(engine):
    before = engine.batch_stats().get("clip", {"calls": 0, "items": 0})
    image = photo("astronaut")
    requests = [request(("e", "embed_clip_vit_b_32", {})) for _ in range(32)]
    outs = await asyncio.gather(*(engine.run(r, image) for r in requests))
    assert all(o[0].status == "success" for o in outs)
    after = engine.batch_stats()["clip"]
    calls, items = after["calls"] - before["calls"], after["items"] - before["items"]
    assert items == 32
    assert calls < 32, f"{calls} model calls for 32 requests"


async def test_results_echo_metadata_and_name_the_request(engine):
    req = request(("e", "embed_clip_vit_b_32", {}), metadata={"photo_id": 123})
    (result,) = await engine.run(req, photo("astronaut"))
    assert result.metadata == {"photo_id": 123}
    assert result.event_id == f"{req.request_id}/e" and result.request_id == req.request_id
    assert {"queue", "compute"} <= set(result.timings_ms)


async def test_person_region_for_classify_and_describe(engine, classifier_dir, person_prone_detector):
    _train_classifier(classifier_dir, 21, 768, "prominent_person", "embed_dino_v2")
    results = by_op(await engine.run(request(
        ("box", "detect_bounding_box", {"target": "prominent_person"}),
        ("cls", "classify", {"collection_id": 21, "target": "prominent_person"}),
        ("caption", "describe_image", {"target": "prominent_person", "max_length": 4}),
        ("dino", "embed_dino_v2", {"target": "prominent_person"}),
    ), photo("astronaut")))
    box = results["box"].data
    assert box is not None
    for op in ("cls", "caption", "dino"):
        assert results[op].status == "success", results[op].error_message
        assert results[op].region == "prominent_person" and results[op].cropped_image_bbox == box
    model_file = orjson.loads((classifier_dir / "best_models.json").read_bytes())["21"]["model_file"]
    expected = joblib.load(classifier_dir / model_file).predict_proba(np.array([results["dino"].data]))[0][1]
    assert results["cls"].data["probability"] == pytest.approx(expected, abs=1e-6)


async def test_person_region_falls_back_to_the_whole_image_for_classify_and_describe(engine, classifier_dir):
    _train_classifier(classifier_dir, 22, 512, "prominent_person", "embed_clip_vit_b_32")
    results = by_op(await engine.run(request(
        ("cls", "classify", {"collection_id": 22}),
        ("caption", "describe_image", {"target": "prominent_person", "max_length": 3}),
    ), photo("coffee")))
    for op in ("cls", "caption"):
        assert results[op].status == "success", results[op].error_message
        assert results[op].region == "whole_image"
        assert results[op].cropped_image_bbox is None and results[op].cropped_image_base64 is None
