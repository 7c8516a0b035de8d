"""The same image costs once: identical work on the same bytes is shared in flight and reused
from recent outcomes, and near misses (another context, other weights, a replaced classifier)
compute anew."""

from __future__ import annotations

import asyncio
import io
import uuid

import joblib
import numpy as np
import orjson
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from imgstream.analysis.batcher import Timed
from imgstream.analysis.engine import Engine
from imgstream.analysis.models import load_model
from imgstream.analysis.reuse import ENTRY_OVERHEAD_BYTES, ReuseStore
from imgstream.schemas.config import DecodeConfig, KafkaConfig, ModelsConfig
from tests.engine_helpers import by_op, photo, request
from tests.kafka_helpers import consume_all
from tests.test_request_failures import committed_offsets, running_worker
from tests.worker_procs import produce_paced, request_bytes

CLIP_AND_FACE = [
    ("clip", "embed_clip_vit_b_32", {}),
    ("face", "detect_bounding_box", {"target": "prominent_face", "face_context": "whole_image"}),
]


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def variants(count: int, size: int = 160) -> list[bytes]:
    """`count` different JPEGs of the astronaut (one pixel changed each)."""
    base = photo("astronaut").resize((size, size))
    out = []
    for i in range(count):
        image = base.copy()
        image.putpixel((i % size, 0), (i % 256, 255 - i % 256, 7))
        out.append(jpeg(image))
    return out


@pytest.fixture
async def fresh(engine, tmp_path):
    """An engine with its own reuse store over the session engine's loaded models (no reloading)."""
    made: list[Engine] = []

    async def make(**config) -> Engine:
        models = {key: (await engine.model(key)) for key in ("clip", "face", "dino", "person")}
        base = {"weights": "random", "device": "cpu", "preload": [], "classifiers_dir": str(tmp_path)}
        new = Engine(ModelsConfig(**{**base, **config}), models=models)
        await new.start()
        made.append(new)
        return new

    yield make
    for e in made:
        await e.close()


async def run_on_bytes(engine: Engine, data: bytes, *tasks):
    decoded = await engine.decode(data, DecodeConfig())
    return by_op(await engine.run(request(*tasks), decoded))


async def test_concurrent_requests_for_the_same_bytes_share_decode_and_model_work(fresh):
    engine = await fresh()
    images = variants(2)
    runs = [run_on_bytes(engine, images[i % 2], *CLIP_AND_FACE) for i in range(10)]
    results = await asyncio.gather(*runs)
    stats = engine.batch_stats()
    assert stats["clip"]["items"] == 2 and stats["face"]["items"] == 2  # two images, not ten
    reused = [r for result in results for r in result.values() if r.reused]
    assert len(reused) == 16  # every task of the eight requests that found the work under way or done
    assert all(r.timings_ms["compute"] == 0 for r in reused)
    assert {r["clip"].reused for r in results} == {True, False}
    for i in range(2):
        same = [r["clip"].data for j, r in enumerate(results) if j % 2 == i]
        assert all(np.array_equal(v, same[0]) for v in same)  # exactly the computed embedding
    assert sum(engine.reused.values()) == 16


async def test_a_later_request_is_answered_from_the_cache_and_near_misses_compute_anew(fresh):
    engine = await fresh()
    data = variants(1)[0]
    first = await run_on_bytes(engine, data, *CLIP_AND_FACE)
    again = await run_on_bytes(engine, data, *CLIP_AND_FACE)
    assert not first["clip"].reused and again["clip"].reused and again["face"].reused
    assert engine.reused["cached"] == 2
    assert np.array_equal(first["clip"].data, again["clip"].data) and first["face"].data == again["face"].data
    before = engine.batch_stats()["face"]["items"]
    other_context = await run_on_bytes(engine, data, (
        "face", "detect_bounding_box", {"target": "prominent_face", "face_context": "prominent_person"}))
    assert not other_context["face"].reused
    assert engine.batch_stats()["face"]["items"] > before  # another context is other work
    # Params that only shape the answer reuse the model work: a normalised vector of the same embedding.
    unit = (await run_on_bytes(engine, data, ("clip", "embed_clip_vit_b_32", {"normalize": True})))["clip"]
    assert unit.reused and np.allclose(unit.data, first["clip"].data / np.linalg.norm(first["clip"].data))
    # Other bytes of the same picture are another image.
    reencoded = jpeg(Image.open(io.BytesIO(data)), quality=80)
    assert not (await run_on_bytes(engine, reencoded, *CLIP_AND_FACE))["clip"].reused


async def test_other_weights_never_share_an_outcome(fresh, engine):
    seed0 = await fresh()
    other = load_model("clip", ModelsConfig(weights="random", seed=1), seed0.device)
    seed1 = Engine(ModelsConfig(weights="random", seed=1, device="cpu", preload=[]), models={"clip": other})
    seed1.reuse = seed0.reuse  # one store, as several workers could share: the weights are in the key
    await seed1.start()
    try:
        data = variants(1)[0]
        a = (await run_on_bytes(seed0, data, ("clip", "embed_clip_vit_b_32", {})))["clip"]
        b = (await run_on_bytes(seed1, data, ("clip", "embed_clip_vit_b_32", {})))["clip"]
        assert not b.reused and not np.allclose(a.data, b.data)
        assert seed1.batch_stats()["clip"]["items"] == 1
    finally:
        await seed1.close()


def _classifier(directory, threshold: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = LogisticRegression(max_iter=200).fit(rng.normal(size=(40, 512)), np.array([True, False] * 20))
    joblib.dump(model, directory / "c.pkl")
    (directory / "best_models.json").write_bytes(orjson.dumps({"5": {
        "model_file": "c.pkl", "derivative_type": "whole_image", "embedding_type": "embed_clip_vit_b_32",
        "threshold": threshold}}))


async def test_a_replaced_classifier_file_is_a_new_answer_over_the_reused_embedding(fresh, tmp_path):
    engine = await fresh()
    data = variants(1)[0]
    _classifier(tmp_path, 0.5, seed=1)
    first = (await run_on_bytes(engine, data, ("c", "classify", {"collection_id": 5})))["c"]
    same = (await run_on_bytes(engine, data, ("c", "classify", {"collection_id": 5})))["c"]
    assert same.reused and same.data == first.data
    _classifier(tmp_path, 0.5, seed=2)  # another model in the same file name
    replaced = (await run_on_bytes(engine, data, ("c", "classify", {"collection_id": 5})))["c"]
    assert not replaced.reused and replaced.data["probability"] != first.data["probability"]
    assert engine.batch_stats()["clip"]["items"] == 1  # the embedding itself was reused all along


async def test_the_cache_is_bounded_by_bytes_and_zero_keeps_nothing(fresh):
    tiny = await fresh(reuse_cache_bytes=5000)  # about two 512-float embeddings with their overhead
    for data in variants(4):
        await run_on_bytes(tiny, data, ("clip", "embed_clip_vit_b_32", {}))
    assert tiny.reuse.bytes <= 5000 and 1 <= tiny.reuse.entries < 4
    off = await fresh(reuse_cache_bytes=0)
    data = variants(1)[0]
    await run_on_bytes(off, data, ("clip", "embed_clip_vit_b_32", {}))
    assert not (await run_on_bytes(off, data, ("clip", "embed_clip_vit_b_32", {})))["clip"].reused
    # identical work in flight is still shared
    together = await asyncio.gather(*(run_on_bytes(off, data, ("clip", "embed_clip_vit_b_32", {})) for _ in range(3)))
    assert sum(r["clip"].reused for r in together) == 2


async def test_reuse_off_computes_everything(fresh):
    engine = await fresh(reuse=False)
    assert engine.reuse is None
    data = variants(1)[0]
    results = await asyncio.gather(*(run_on_bytes(engine, data, *CLIP_AND_FACE) for _ in range(3)))
    assert not any(r.reused for result in results for r in result.values())
    assert engine.batch_stats()["clip"]["items"] == 3


async def test_an_error_is_never_kept():
    store = ReuseStore(1 << 20)
    calls = 0

    async def flaky():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("transient")
        return "ok"

    with pytest.raises(RuntimeError):
        await store.share("k", flaky)
    assert await store.share("k", flaky) == ("ok", "computed")
    assert await store.share("k", flaky) == ("ok", "cached")


async def test_a_kept_embedding_owns_its_row_not_its_whole_batch():
    batch = np.arange(64 * 512, dtype=np.float32).reshape(64, 512)  # a model's output for 64 images
    store = ReuseStore(1 << 20)

    async def embed():
        return Timed(batch[3], queue_ms=1.0, compute_ms=2.0)  # a row: a view into the batch

    first, _ = await store.share("k", embed)
    kept, kind = await store.share("k", embed)
    assert kind == "cached" and np.array_equal(kept.value, first.value)
    assert kept.value.base is None  # the 128 KiB batch is not held alive by the cache
    assert store.bytes == batch[3].nbytes + ENTRY_OVERHEAD_BYTES


async def test_fifty_requests_for_five_images_do_the_model_work_of_five(broker, topics, fresh, tmp_path):
    engine = await fresh()
    images = variants(5)
    paths = []
    for i, data in enumerate(images):
        path = tmp_path / f"img{i}.jpg"
        path.write_bytes(data)
        paths.append(path)
    tasks = [{"operation_id": op, "type": typ, "params": params} for op, typ, params in CLIP_AND_FACE]
    group = f"g-{uuid.uuid4().hex[:8]}"
    kafka = KafkaConfig(bootstrap=broker, group=group, topics=topics, session_timeout_ms=3000)
    async with running_worker(broker, topics, engine, kafka=kafka, fetch={"blob_roots": [str(tmp_path)]}):
        messages = [(f"dup-{i}".encode(), request_bytes(f"dup-{i}", {"blob": paths[i % 5].as_uri()}, tasks))
                    for i in range(50)]
        await produce_paced(broker, topics.requests, messages)
        records = await consume_all(broker, topics.results, 100, timeout_s=120)
        results = [orjson.loads(r.value) for r in records]
        assert len({(r["request_id"], r["operation_id"]) for r in results}) == 100
        assert all(r["status"] == "success" for r in results)
        stats = engine.batch_stats()
        assert stats["clip"]["items"] == 5 and stats["face"]["items"] == 5  # five images, not fifty
        assert sum(r["reused"] for r in results) == 90
        by_image: dict[str, list] = {}
        for r in results:
            if r["operation_id"] == "clip":
                by_image.setdefault(r["image"]["sha256"], []).append(r["data"])
        # Exactly equal, not merely close: a reused embedding is the computed one, written again.
        assert len(by_image) == 5 and all(all(v == vs[0] for v in vs) for vs in by_image.values())

        # A near miss through the same worker: the same bytes, the face searched in another context.
        near = [{"operation_id": "face", "type": "detect_bounding_box",
                 "params": {"target": "prominent_face", "face_context": "prominent_person"}}]
        await produce_paced(broker, topics.requests, [(b"near", request_bytes("near", {"blob": paths[0].as_uri()},
                                                                              near))])
        (record,) = [r for r in await consume_all(broker, topics.results, 101, timeout_s=120) if r.key == b"near"]
        assert orjson.loads(record.value)["reused"] is False
        assert engine.batch_stats()["face"]["items"] == 6  # computed anew
    assert await committed_offsets(broker, group, topics.requests) == 51
