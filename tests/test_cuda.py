"""The CUDA path on a real GPU: nvJPEG decoding, fp16, device-side preprocessing, every GPU.

Skipped where there is no GPU (CI); scripts/gpu_check.sh runs them on a GPU machine. The same
logic is tested on the CPU in test_fast_path.py and test_batcher.py.
"""

from __future__ import annotations

import asyncio

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data

from imgstream.analysis.engine import Engine
from imgstream.analysis.imaging import ImageError, decode_image, pixels_of
from imgstream.analysis.models.clip import ClipModel
from imgstream.analysis.models.dino import DinoModel
from imgstream.analysis.models.face import FaceDetector
from imgstream.schemas.config import DecodeConfig, ModelsConfig
from tests.engine_helpers import by_op, cosine, jpeg_with_orientation, request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


def _photos() -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea")]


async def test_nvjpeg_decodes_in_batches_like_pillow_with_exif_applied():
    engine = Engine(ModelsConfig(weights="random", device="cuda:0", preload=[]))
    assert engine.device_decode
    await engine.start()
    try:
        photos = _photos()
        jpegs = [jpeg_with_orientation(p) for p in photos] + [jpeg_with_orientation(photos[1], orientation=6)]
        decoded = await asyncio.gather(*(engine.decode(raw, DecodeConfig()) for raw in jpegs))
        for raw, image in zip(jpegs, decoded):
            assert image.pixels.device.type == "cuda"
            reference = decode_image(raw, DecodeConfig())
            assert image.pixels.shape == reference.pixels.shape
            assert (image.pixels.cpu().int() - reference.pixels.int()).abs().float().mean() < 2.0
        assert engine.batch_stats()["decode"]["calls"] < len(jpegs)  # batched across requests
        with pytest.raises(ImageError) as info:  # cut in half: nvJPEG might decode what is there, Pillow refuses it
            await engine.decode(jpegs[0][:len(jpegs[0]) // 2], DecodeConfig())
        assert info.value.code == "image_undecodable"
    finally:
        await engine.close()


@pytest.mark.parametrize("loader", [ClipModel, DinoModel], ids=["clip", "dino"])
def test_gpu_fp16_vectors_match_cpu_fp32(loader):
    config = ModelsConfig(weights="random")
    on_gpu, on_cpu = loader(config, GPU), loader(config, CPU)
    assert on_gpu.dtype == torch.float16
    photos = _photos()
    gpu_vectors = on_gpu.run_batch([pixels_of(p).to(GPU) for p in photos])
    cpu_vectors = on_cpu.run_batch([pixels_of(p) for p in photos])
    for fast, reference in zip(gpu_vectors, cpu_vectors):
        assert cosine(fast, reference) >= 0.999


def test_mtcnn_on_the_gpu_batches_mixed_sizes_and_finds_the_cpus_faces():
    on_gpu, on_cpu = FaceDetector(ModelsConfig(), GPU), FaceDetector(ModelsConfig(), CPU)
    astronaut = PIL.Image.fromarray(data.astronaut())
    images = [astronaut, astronaut.resize((400, 400)), PIL.Image.fromarray(data.coffee())]
    batch = on_gpu.collate([pixels_of(i) for i in images])
    assert all(t.device.type == "cuda" for t in batch.tables)  # every resize and crop is read off these
    gpu = on_gpu.forward(batch)
    cpu = on_cpu.run_batch([pixels_of(i) for i in images])
    assert [len(f) for f in gpu] == [len(f) for f in cpu] == [1, 1, 0]
    for a, b in zip(gpu[:2], cpu[:2]):
        assert np.allclose(a[0].box, b[0].box, atol=4.0)


async def test_engine_on_every_gpu_runs_a_request_end_to_end():
    engine = Engine(ModelsConfig(weights="random", device="cuda", preload=["clip", "face", "person"]))
    await engine.start()
    try:
        assert len(engine.devices) == torch.cuda.device_count()
        photo = jpeg_with_orientation(PIL.Image.fromarray(data.astronaut()))
        image = await engine.decode(photo, DecodeConfig())
        before = engine.device_stats()
        runs = [engine.run(request(
            ("clip", "embed_clip_vit_b_32", {}),
            ("face", "detect_bounding_box", {"target": "prominent_face", "face_context": "whole_image"}),
            ("face_clip", "embed_clip_vit_b_32", {"target": "prominent_face", "face_context": "prominent_person"}),
        ), image) for _ in range(64)]
        for results in await asyncio.gather(*runs):
            results = by_op(results)
            assert all(r.status == "success" for r in results.values()), [r.error_message for r in results.values()]
            assert results["face"].data is not None
        after = engine.device_stats()
        assert all(after[name]["batches"] > before[name]["batches"] for name in after)  # every GPU took work
    finally:
        await engine.close()
