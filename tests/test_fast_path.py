"""The GPU fast path's logic, run on the CPU: tensor preprocessing against each library's own,
fp16 against fp32, MTCNN on a batch of mixed sizes, and JPEG decoding on the device."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data

from imgstream.analysis.engine import Engine
from imgstream.analysis.imaging import ImageError, decode_image, pixels_of
from imgstream.analysis.models.base import Detection
from imgstream.analysis.models.caption import Captioner
from imgstream.analysis.models.clip import ClipModel
from imgstream.analysis.models.dino import DinoModel
from imgstream.analysis.models.face import FaceDetector
from imgstream.schemas.config import DecodeConfig, ModelsConfig
from tests.engine_helpers import cosine, jpeg_with_orientation

CPU = torch.device("cpu")
RANDOM = ModelsConfig(weights="random")


@pytest.fixture(scope="module")
def photos() -> list[PIL.Image.Image]:
    names = ("astronaut", "coffee", "chelsea", "camera")
    return [PIL.Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]


@pytest.mark.parametrize("loader", [ClipModel, DinoModel], ids=["clip", "dino"])
def test_tensor_preprocessing_gives_the_librarys_own_embeddings(loader, photos):
    model = loader(RANDOM, CPU)
    crops = [photos[0], photos[1].crop((30, 20, 400, 300)), photos[2].resize((90, 300))]
    ours = model.run_batch([model.preprocess(image) for image in crops])
    for image, vector in zip(crops, ours):
        if isinstance(model, ClipModel):  # open_clip's own PIL transform
            reference_input = model._transform(image)[None]
        else:  # the Hugging Face image processor
            reference_input = model._processor(images=image, return_tensors="pt")["pixel_values"]
        reference = model.forward(reference_input)[0]
        assert cosine(vector, reference) >= 0.999


def test_tensor_preprocessing_gives_the_caption_processors_pixels(photos):
    captioner = Captioner(RANDOM, CPU)
    assert captioner.transform is not None  # BLIP's processor only resizes and normalises
    [(_, ours, _)] = captioner.collate([(captioner.preprocess(image), 5) for image in photos[:2]])
    for image, pixels in zip(photos[:2], ours):
        reference = captioner._processor(images=image, return_tensors="pt")["pixel_values"][0]
        # uint8 rounding of two bicubic implementations: a few levels of 255 at most.
        assert (pixels - reference).abs().max() < 0.1
        assert cosine(pixels.flatten(), reference.flatten()) >= 0.9999


@pytest.mark.parametrize("loader", [ClipModel, DinoModel], ids=["clip", "dino"])
def test_fp16_vectors_keep_cosine_to_fp32(loader, photos):
    fp32, fp16 = loader(RANDOM, CPU), loader(RANDOM, CPU, half=True)
    assert fp16.dtype == torch.float16
    items = [fp32.preprocess(image) for image in photos]
    for full, half in zip(fp32.run_batch(items), fp16.run_batch(items)):
        assert half.dtype == np.float32  # results stay float32 whatever the compute precision
        assert cosine(full, half) >= 0.999


def test_mtcnn_batch_of_mixed_sizes_finds_each_images_faces_as_alone(photos):
    # What replaced zero-padded canvases: one batch of any sizes, P-Net per image, R-/O-Net once.
    detector = FaceDetector(RANDOM, CPU)
    items = [pixels_of(photos[0]), pixels_of(photos[0].resize((400, 400))), pixels_of(photos[1])]
    alone = [detector.run_batch([item])[0] for item in items]
    together = detector.forward(detector.collate(items))
    assert [len(faces) for faces in together] == [len(faces) for faces in alone] == [1, 1, 0]
    for mine, reference in zip(together[:2], alone[:2]):
        assert isinstance(mine[0], Detection) and mine[0].score > 0.99
        assert abs(mine[0].score - reference[0].score) < 1e-5
        assert np.allclose(mine[0].box, reference[0].box, atol=1e-3)


async def test_device_decode_batches_jpegs_and_falls_back_to_pillow(photos):
    engine = Engine(ModelsConfig(weights="random", device="cpu", jpeg_decoder="device", preload=[]))
    await engine.start()
    config = DecodeConfig()
    try:
        turned = jpeg_with_orientation(photos[1], orientation=6)
        png = io.BytesIO()
        photos[2].save(png, "PNG")
        jpegs = [jpeg_with_orientation(photo) for photo in photos] + [turned]
        decoded = await asyncio.gather(*(engine.decode(raw, config) for raw in jpegs),
                                       engine.decode(png.getvalue(), config))
        for raw, image in zip(jpegs + [png.getvalue()], decoded):
            reference = decode_image(raw, config)
            assert (image.width, image.height, image.sha256) == (reference.width, reference.height, reference.sha256)
            assert (image.pixels.int() - reference.pixels.int()).abs().float().mean() < 1.0
        assert (decoded[-2].width, decoded[-2].height) == (photos[1].height, photos[1].width)  # EXIF applied
        stats = engine.batch_stats()["decode"]
        assert stats["items"] == len(jpegs)  # the PNG went to Pillow
        with pytest.raises(ImageError) as info:  # cut short: no end marker, so Pillow decodes it and says why
            await engine.decode(jpegs[0][:2000], config)
        assert info.value.code == "image_undecodable"
        assert engine.batch_stats()["decode"]["items"] == len(jpegs)  # never handed to the device decoder
        with pytest.raises(ImageError) as info:  # the pixel limit holds before any decoding
            await engine.decode(jpegs[0], DecodeConfig(max_pixels=1000))
        assert info.value.code == "image_too_large"
    finally:
        await engine.close()
