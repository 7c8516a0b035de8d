"""The model loaders, run for real on the CPU with seeded random weights (MTCNN: its bundled ones)."""

from __future__ import annotations

import os

# Model hubs are unreachable here; nothing below may try them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data

import open_clip
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor, Dinov2Model

from imgstream.analysis.models import MODEL_KEYS, Detection, Model, load_model, select_device
from imgstream.analysis.models.base import seeded
from imgstream.analysis.models.caption import base_config as blip_config
from imgstream.analysis.models.caption import placeholder_tokenizer
from imgstream.analysis.models.dino import base_config as dino_config
from imgstream.analysis.models.dino import base_processor as dino_processor
from imgstream.analysis.models.person import DetectorInput, person_detections
from imgstream.schemas.config import ModelsConfig

CPU = torch.device("cpu")
RANDOM = ModelsConfig(weights="random", seed=0)


@pytest.fixture(scope="module")
def astronaut() -> PIL.Image.Image:
    return PIL.Image.fromarray(data.astronaut())  # 512x512 RGB, one face


@pytest.fixture(scope="module")
def small(astronaut: PIL.Image.Image) -> PIL.Image.Image:
    return astronaut.resize((160, 120))


def blank(width: int, height: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (width, height), "white")


@pytest.fixture(scope="module")
def clip() -> Model:
    return load_model("clip", RANDOM, CPU)


@pytest.fixture(scope="module")
def dino() -> Model:
    return load_model("dino", RANDOM, CPU)


@pytest.fixture(scope="module")
def person() -> Model:
    return load_model("person", RANDOM, CPU)


@pytest.fixture(scope="module")
def face() -> Model:
    return load_model("face", RANDOM, CPU)


@pytest.fixture(scope="module")
def caption() -> Model:
    return load_model("caption", RANDOM, CPU)


# --- select_device (this machine has no CUDA) ---------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="pins the CPU-only behaviour")
class TestSelectDeviceWithoutCuda:
    def test_auto_falls_back_to_cpu(self) -> None:
        assert select_device(ModelsConfig(device="auto")) == CPU

    def test_cpu_is_cpu(self) -> None:
        assert select_device(ModelsConfig(device=" CPU ")) == CPU

    @pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
    def test_cuda_requested_but_missing_is_refused(self, device: str) -> None:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device(ModelsConfig(device=device))

    @pytest.mark.parametrize("device", ["auto", "cpu"])
    def test_require_gpu_is_refused(self, device: str) -> None:
        with pytest.raises(RuntimeError, match="require_gpu"):
            select_device(ModelsConfig(device=device, require_gpu=True))

    @pytest.mark.parametrize("device", ["tpu", "mps", "gpu0"])
    def test_unknown_device_is_refused(self, device: str) -> None:
        with pytest.raises(RuntimeError, match="use auto, cpu, cuda, cuda:N"):
            select_device(ModelsConfig(device=device))


# --- load_model ----------------------------------------------------------------------------


def test_unknown_model_key_is_refused() -> None:
    with pytest.raises(ValueError, match="known models: clip, dino, person, face, caption"):
        load_model("yolo", RANDOM, CPU)


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_every_model_follows_the_protocol(key: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(key)
    assert isinstance(model, Model)
    assert model.key == key
    assert model.device == CPU


def test_model_info_names_random_weights(
    clip: Model, dino: Model, person: Model, face: Model, caption: Model
) -> None:
    assert (clip.info.name, clip.info.weights, clip.info.dim) == ("ViT-B-32-quickgelu", "random", 512)
    assert (dino.info.name, dino.info.weights, dino.info.dim) == ("facebook/dinov2-base", "random", 768)
    assert (person.info.name, person.info.weights) == ("fasterrcnn_resnet50_fpn", "random")
    assert (caption.info.name, caption.info.weights) == ("Salesforce/blip-image-captioning-base", "random")
    # MTCNN's real weights ship inside facenet-pytorch; models.weights=random does not touch them.
    assert (face.info.name, face.info.weights) == ("MTCNN", "facenet-pytorch-bundled")


def test_loading_random_weights_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_model("person", RANDOM, CPU)
    assert torch.equal(torch.rand(3), expected)


# --- embeddings ------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "dim"), [("clip", 512), ("dino", 768)])
def test_embedding_batch_gives_one_float32_vector_per_image(
    key: str, dim: int, request: pytest.FixtureRequest, astronaut: PIL.Image.Image, small: PIL.Image.Image
) -> None:
    model = request.getfixturevalue(key)
    items = [model.preprocess(image) for image in (astronaut, small, blank(50, 300))]
    batch = model.collate(items)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    embeddings = model.forward(batch)
    assert len(embeddings) == 3
    assert all(e.shape == (dim,) and e.dtype == np.float32 and np.isfinite(e).all() for e in embeddings)
    assert not np.allclose(embeddings[0], embeddings[1])


@pytest.mark.parametrize("key", ["clip", "dino"])
def test_embedding_does_not_depend_on_the_batch(
    key: str, request: pytest.FixtureRequest, astronaut: PIL.Image.Image, small: PIL.Image.Image
) -> None:
    model = request.getfixturevalue(key)
    alone = model.run_batch([model.preprocess(small)])[0]
    batched = model.run_batch([model.preprocess(astronaut), model.preprocess(small)])[1]
    np.testing.assert_allclose(alone, batched, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", ["clip", "dino"])
def test_same_seed_gives_identical_embeddings(
    key: str, request: pytest.FixtureRequest, small: PIL.Image.Image
) -> None:
    def embed(model: Model) -> np.ndarray:
        return model.run_batch([model.preprocess(small)])[0]

    first = request.getfixturevalue(key)
    # The same weights give the same vector (up to the last bits a kernel choice may change);
    # another seed gives a different one.
    np.testing.assert_allclose(embed(load_model(key, RANDOM, CPU)), embed(first), rtol=0, atol=1e-5)
    assert not np.allclose(embed(load_model(key, ModelsConfig(weights="random", seed=1), CPU)), embed(first))


# --- faces -----------------------------------------------------------------------------------


def test_mtcnn_finds_the_astronauts_face(face: Model, astronaut: PIL.Image.Image) -> None:
    [faces] = face.run_batch([face.preprocess(astronaut)])
    assert len(faces) == 1
    prob, (x0, y0, x1, y1) = faces[0]
    assert isinstance(prob, float) and prob > 0.99
    assert all(isinstance(v, float) for v in (x0, y0, x1, y1))
    # Measured: about [181, 62, 268, 172].
    assert 170 <= x0 < x1 <= 280 and 50 <= y0 < y1 <= 190


def test_mtcnn_batch_mixes_sizes_and_keeps_the_order(face: Model, astronaut: PIL.Image.Image) -> None:
    images = [astronaut, blank(64, 48), blank(8, 8), astronaut, astronaut.resize((256, 256)), blank(600, 15)]
    results = face.run_batch([face.preprocess(image) for image in images])
    assert [len(faces) for faces in results] == [1, 0, 0, 1, 1, 0]
    assert results[0] == results[3]
    assert 85 <= results[4][0].box[0] <= 140  # the half-size astronaut's face, half as far right


def test_mtcnn_accepts_greyscale(face: Model, astronaut: PIL.Image.Image) -> None:
    [faces] = face.run_batch([face.preprocess(astronaut.convert("L"))])
    assert len(faces) == 1 and faces[0].score > 0.9


def test_mtcnn_faces_are_sorted_and_inside_the_image(face: Model, astronaut: PIL.Image.Image) -> None:
    # Four astronauts side by side: several faces, one per tile.
    tiled = PIL.Image.new("RGB", (1024, 1024))
    for x, y in [(0, 0), (512, 0), (0, 512), (512, 512)]:
        tiled.paste(astronaut, (x, y))
    [faces] = face.run_batch([face.preprocess(tiled.resize((512, 512)))])
    assert len(faces) == 4
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    assert all(0 <= f.box[0] < f.box[2] <= 512 and 0 <= f.box[1] < f.box[3] <= 512 for f in faces)


# --- persons ---------------------------------------------------------------------------------


def test_person_detector_returns_a_sorted_list_per_image(person: Model, small: PIL.Image.Image) -> None:
    images = [small, blank(90, 200)]
    results = person.run_batch([person.preprocess(image) for image in images])
    assert len(results) == 2
    for image, detections in zip(images, results):
        assert isinstance(detections, list)
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
        width, height = image.size
        assert all(0 <= d.box[0] <= d.box[2] <= width and 0 <= d.box[1] <= d.box[3] <= height for d in detections)


def test_person_backbone_runs_channels_last_with_torchvisions_outputs(person: Model, small: PIL.Image.Image) -> None:
    stock = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                    box_score_thresh=person._model.roi_heads.score_thresh)
    stock.load_state_dict(person._model.state_dict())  # the same weights in torchvision's default layout
    stock.eval()
    conv = person._model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    (item,) = person.collate([person.preprocess(small)])
    with torch.inference_mode():
        ours, reference = person._model([item.pixels])[0], stock([item.pixels])[0]
    np.testing.assert_allclose(ours["scores"][:20].numpy(), reference["scores"][:20].numpy(), atol=1e-4)
    for box in ours["boxes"][:5]:  # each of our best boxes is one of torchvision's (order may swap on ties)
        assert (reference["boxes"] - box).abs().max(dim=1).values.min() < 0.5


def test_person_collate_shrinks_large_images_only(person: Model) -> None:
    large, kept = person.collate([person.preprocess(blank(2666, 1000)), person.preprocess(blank(160, 120))])
    assert (large.width, large.height) == (2666, 1000)
    assert tuple(large.pixels.shape) == (3, 500, 1333)  # torchvision's rule: longer side <= 1333
    assert tuple(kept.pixels.shape) == (3, 120, 160)  # the model upsamples small images itself
    assert kept.pixels.dtype == torch.float32 and 0.99 <= kept.pixels.max() <= 1.0


def test_person_detections_keep_persons_sorted_in_input_pixels() -> None:
    # What torchvision returns for a 1333x500 input that stands for a 2666x1000 image.
    item = DetectorInput(pixels=torch.zeros(3, 500, 1333), width=2666, height=1000)
    output = {
        "labels": torch.tensor([3, 1, 1, 1]),
        "scores": torch.tensor([0.99, 0.40, 0.80, 0.60]),
        "boxes": torch.tensor(
            [[0.0, 0.0, 10.0, 10.0], [10.0, 20.0, 30.0, 40.0], [100.0, 50.0, 1333.0, 500.0], [-2.0, 1.0, 5.0, 600.0]]
        ),
    }
    detections = person_detections(output, item)
    assert [d.score for d in detections] == pytest.approx([0.80, 0.60, 0.40])
    assert detections[0].box == pytest.approx([200.0, 100.0, 2666.0, 1000.0])
    assert detections[1].box == pytest.approx([0.0, 2.0, 10.0, 1000.0])  # clamped to the image
    assert detections[2].box == pytest.approx([20.0, 40.0, 60.0, 80.0])
    assert all(isinstance(d, Detection) and isinstance(d.score, float) for d in detections)


# --- captions --------------------------------------------------------------------------------


def words(text: str) -> int:
    """Tokens of a placeholder-vocabulary caption: each placeholder word is one token."""
    return len(placeholder_tokenizer()(text, add_special_tokens=False)["input_ids"])


def test_caption_batch_gives_one_string_per_image(
    caption: Model, astronaut: PIL.Image.Image, small: PIL.Image.Image
) -> None:
    images = [caption.preprocess(image) for image in (astronaut, small, blank(30, 500))]
    [(indices, pixel_values, budgets)] = caption.collate([(p, 4) for p in images])
    assert indices == [0, 1, 2] and budgets == [4, 4, 4] and pixel_values.shape == (3, 3, 384, 384)
    captions = caption.run_batch([(p, 4) for p in images])
    assert len(captions) == 3
    assert all(isinstance(c, str) and c == " ".join(c.split()) and 1 <= words(c) <= 4 for c in captions)


def test_caption_respects_each_items_max_new_tokens(caption: Model, small: PIL.Image.Image) -> None:
    pixels = caption.preprocess(small)
    budgets = [1, 6, 3]
    mixed = caption.run_batch([(pixels, budget) for budget in budgets])
    # Random weights essentially never pick [SEP], so each caption uses its whole budget.
    assert [words(c) for c in mixed] == budgets
    # Greedy decoding: a shorter budget is a prefix of a longer one, as if run alone.
    assert mixed[1].startswith(mixed[2]) and mixed[2].startswith(mixed[0])
    assert caption.run_batch([(pixels, 3)]) == [mixed[2]]


def test_caption_is_deterministic_across_loads(caption: Model, small: PIL.Image.Image) -> None:
    again = load_model("caption", RANDOM, CPU)
    assert again.run_batch([(again.preprocess(small), 5)]) == caption.run_batch([(caption.preprocess(small), 5)])


# --- pretrained loading from local files (the code path real weights take) ----------------
# The files hold the same seeded random weights, built with the loaders' public pieces, so a
# model loaded from them must compute what the fixture computes (within float noise; a caption,
# greedy over the same logits, is the same text).


def test_dino_loads_from_a_local_directory(tmp_path: Path, dino: Model, small: PIL.Image.Image) -> None:
    with seeded(RANDOM.seed):
        Dinov2Model(dino_config()).save_pretrained(tmp_path)
    dino_processor().save_pretrained(tmp_path)

    local = load_model("dino", ModelsConfig(dino_model=str(tmp_path)), CPU)
    assert (local.info.name, local.info.weights, local.info.dim) == (str(tmp_path), "pretrained", 768)
    expected = dino.run_batch([dino.preprocess(small)])[0]
    np.testing.assert_allclose(local.run_batch([local.preprocess(small)])[0], expected, rtol=0, atol=1e-5)


def test_caption_loads_from_a_local_directory(tmp_path: Path, caption: Model, small: PIL.Image.Image) -> None:
    with seeded(RANDOM.seed):
        BlipForConditionalGeneration(blip_config()).save_pretrained(tmp_path)
    BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=placeholder_tokenizer()).save_pretrained(tmp_path)

    # The Auto classes resolve the directory to BLIP again.
    local = load_model("caption", ModelsConfig(caption_model=str(tmp_path)), CPU)
    assert (local.info.name, local.info.weights) == (str(tmp_path), "pretrained")
    expected = caption.run_batch([(caption.preprocess(small), 4)])
    assert local.run_batch([(local.preprocess(small), 4)]) == expected


def test_clip_loads_a_local_checkpoint(tmp_path: Path, clip: Model, small: PIL.Image.Image) -> None:
    with seeded(RANDOM.seed):
        torch.save(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).state_dict(), tmp_path / "clip.pt")

    local = load_model("clip", ModelsConfig(clip_weights_path=str(tmp_path / "clip.pt")), CPU)
    assert (local.info.name, local.info.weights) == ("ViT-B-32-quickgelu", str(tmp_path / "clip.pt"))
    expected = clip.run_batch([clip.preprocess(small)])[0]
    np.testing.assert_allclose(local.run_batch([local.preprocess(small)])[0], expected, rtol=0, atol=1e-5)


def test_person_loads_a_local_state_dict(tmp_path: Path) -> None:
    with seeded(RANDOM.seed):
        torch.save(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), tmp_path / "frcnn.pt")

    local = load_model("person", ModelsConfig(person_weights_path=str(tmp_path / "frcnn.pt")), CPU)
    assert (local.info.name, local.info.weights) == ("fasterrcnn_resnet50_fpn", str(tmp_path / "frcnn.pt"))
