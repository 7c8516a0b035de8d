"""Our MTCNN cascade against facenet-pytorch's own `MTCNN.detect`, on real photos with the real
(bundled) weights, and the integral-image area resampling against torch's `mode="area"`."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import MTCNN
from skimage import data

from imgstream.analysis.area_resample import AreaTables
from imgstream.analysis.imaging import pixels_of
from imgstream.analysis.models.face import FaceDetector
from imgstream.analysis.models.mtcnn import Cascade, HalvingMaxPool, pyramid_scales
from imgstream.schemas.config import ModelsConfig

CPU = torch.device("cpu")


def _astronaut() -> PIL.Image.Image:
    return PIL.Image.fromarray(data.astronaut())


def _four_astronauts() -> PIL.Image.Image:
    tiled = PIL.Image.new("RGB", (1024, 1024))
    for x, y in [(0, 0), (512, 0), (0, 512), (512, 512)]:
        tiled.paste(_astronaut(), (x, y))
    return tiled


PHOTOS = {
    "astronaut": _astronaut,
    "four astronauts": _four_astronauts,
    "four astronauts, 512 px": lambda: _four_astronauts().resize((512, 512)),
    "coffee": lambda: PIL.Image.fromarray(data.coffee()),
    "chelsea": lambda: PIL.Image.fromarray(data.chelsea()),
    "camera, grey": lambda: PIL.Image.fromarray(data.camera()).convert("RGB"),
    "astronaut, turned and resized": lambda: _astronaut().rotate(25, expand=True).resize((700, 610)),
    "astronaut, 1024 px": lambda: _astronaut().resize((1024, 1024)),
    "a 600x40 strip": lambda: _four_astronauts().crop((0, 90, 600, 130)),
}


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(ModelsConfig(), CPU)


@pytest.fixture(scope="module")
def stock() -> MTCNN:
    """facenet-pytorch as it ships: its own nets, contiguous layout, its own detect."""
    return MTCNN(keep_all=True).eval()


def _stock_faces(stock: MTCNN, image: PIL.Image.Image) -> tuple[np.ndarray, np.ndarray]:
    boxes, probs = stock.detect(image)
    if boxes is None:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    return np.asarray(boxes, dtype=np.float32), np.asarray(probs, dtype=np.float32)


def _matched(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """For each reference box the index of our nearest box (facenet orders by area, we by score)."""
    nearest = [int(np.abs(ours - box).max(axis=1).argmin()) for box in reference]
    assert len(set(nearest)) == len(nearest)
    return np.array(nearest, dtype=np.int64)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_cascade_finds_the_faces_facenet_finds(name: str, detector: FaceDetector, stock: MTCNN) -> None:
    """Same faces, boxes and probabilities as facenet-pytorch's `detect`, with our channels-last nets.

    Measured on these photos (CPU, 2026-12-03): boxes at most 6.1e-5 px apart, probabilities equal
    in float32; only the area-resampled pixels differ from facenet's, in their last bits.
    """
    image = PHOTOS[name]()
    boxes, probs = _stock_faces(stock, image)
    [faces] = detector._cascade.detect(AreaTables.build([pixels_of(image)]))
    assert len(faces.boxes) == len(boxes)
    order = _matched(boxes, faces.boxes)
    np.testing.assert_allclose(faces.boxes[order], boxes, atol=1.0)
    np.testing.assert_allclose(faces.probs[order], probs, atol=1e-3)
    assert list(faces.probs) == sorted(faces.probs, reverse=True)


def test_the_photos_cover_several_faces_and_none(stock: MTCNN) -> None:
    counts = {name: len(_stock_faces(stock, make())[0]) for name, make in PHOTOS.items()}
    assert counts["four astronauts"] == 4 and counts["astronaut"] == 1
    assert counts["coffee"] == 0


def test_face_detector_reports_facenets_faces_clamped_and_by_score(detector: FaceDetector, stock: MTCNN) -> None:
    image = _four_astronauts().resize((512, 512))
    boxes, probs = _stock_faces(stock, image)
    [faces] = detector.run_batch([detector.preprocess(image)])
    by_score = np.argsort(-probs, kind="stable")
    assert len(faces) == 4
    np.testing.assert_allclose([f.score for f in faces], probs[by_score], atol=1e-3)
    np.testing.assert_allclose([f.box for f in faces], np.clip(boxes[by_score], 0, 512), atol=1.0)


@pytest.mark.parametrize("size", [(16, 16), (600, 15), (15, 600)])
def test_images_below_the_smallest_face_have_no_faces(size: tuple[int, int], detector: FaceDetector,
                                                      stock: MTCNN) -> None:
    image = _astronaut().resize(size)
    assert pyramid_scales(size[1], size[0], 20, 0.709) == []
    assert detector.run_batch([detector.preprocess(image)]) == [[]]
    with pytest.raises(ValueError):  # facenet-pytorch cannot run an empty pyramid at all
        stock.detect(image)


def test_mixed_sizes_in_one_call_match_one_image_at_a_time(detector: FaceDetector) -> None:
    astronaut = pixels_of(_astronaut())
    images = [astronaut, pixels_of(PHOTOS["coffee"]()), pixels_of(_four_astronauts().resize((700, 700))),
              astronaut[:, 40:300, 100:400],  # a crop (a view) holding the face
              pixels_of(_astronaut().resize((600, 15))), pixels_of(PHOTOS["camera, grey"]())]
    together = detector._cascade.detect(AreaTables.build(images))
    alone = [detector._cascade.detect(AreaTables.build([image]))[0] for image in images]
    assert [len(f.boxes) for f in together] == [len(f.boxes) for f in alone] == [1, 0, 4, 1, 0, 1]
    for mine, reference in zip(together, alone):
        np.testing.assert_allclose(mine.boxes, reference.boxes, atol=1e-3)
        np.testing.assert_allclose(mine.probs, reference.probs, atol=1e-5)


def test_p_net_takes_images_of_one_size_together_and_r_and_o_net_all_candidates_at_once(
        detector: FaceDetector) -> None:
    calls = {"pnet": 0, "rnet": 0, "onet": 0}
    nets = {"pnet": detector._mtcnn.pnet, "rnet": detector._mtcnn.rnet, "onet": detector._mtcnn.onet}
    hooks = [net.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, net in nets.items()]
    images = [_astronaut(), PIL.Image.fromarray(data.chelsea()), _astronaut().resize((256, 256)),
              PHOTOS["camera, grey"]()]  # 512x512, as the astronaut
    tables = AreaTables.build([pixels_of(image) for image in images])
    try:
        as_on_a_gpu = Cascade(detector._mtcnn, chunks={"pnet": 4096, "rnet": 4096, "onet": 4096}).detect(tables)
    finally:
        for hook in hooks:
            hook.remove()
    assert [len(faces.boxes) for faces in as_on_a_gpu] == [1, 0, 1, 1]
    assert calls["pnet"] == sum(len(pyramid_scales(*size, 20, 0.709)) for size in set(tables.sizes))
    assert len(set(tables.sizes)) < len(images)  # one P-Net call per size and scale, not per image
    assert (calls["rnet"], calls["onet"]) == (1, 1)
    # The CPU's small calls give the same faces.
    for chunked, whole in zip(detector._cascade.detect(tables), as_on_a_gpu):
        np.testing.assert_allclose(chunked.boxes, whole.boxes, atol=1e-3)
        np.testing.assert_allclose(chunked.probs, whole.probs, atol=1e-5)


def test_face_detector_runs_p_net_with_the_halving_pool(detector: FaceDetector) -> None:
    assert isinstance(detector._mtcnn.pnet.pool1, HalvingMaxPool)


@pytest.mark.parametrize("shape", [(1, 10, 613, 613), (1, 10, 612, 611), (2, 3, 5, 4), (1, 10, 1, 1)])
def test_halving_max_pool_equals_torchs_ceil_mode_max_pool(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        assert torch.equal(HalvingMaxPool()(x), F.max_pool2d(x, 2, 2, ceil_mode=True))


def test_a_cascade_takes_facenets_settings() -> None:
    mtcnn = MTCNN(keep_all=True, min_face_size=40, thresholds=[0.5, 0.6, 0.9], factor=0.6)
    cascade = Cascade(mtcnn)
    assert (cascade.min_face_size, cascade.factor, cascade.thresholds) == (40, 0.6, (0.5, 0.6, 0.9))


# --- area resampling ---------------------------------------------------------------------------


def _random_image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


# (image height, width) -> (output height, width): MTCNN's own pyramid levels (int(h*s+1)),
# non-integer ratios both ways, exact halving, and upsampling (crops smaller than 24 or 48).
RESIZES = [
    ((512, 512), (308, 308)), ((683, 1024), (410, 615)), ((451, 300), (21, 14)), ((100, 100), (50, 50)),
    ((37, 53), (24, 24)), ((13, 7), (48, 48)), ((1, 1), (24, 24)), ((15, 600), (9, 361)), ((30, 40), (29, 41)),
]


@pytest.mark.parametrize(("shape", "size"), RESIZES, ids=[f"{s}->{o}" for s, o in RESIZES])
def test_area_resample_equals_torch_area_interpolation(shape: tuple[int, int], size: tuple[int, int]) -> None:
    image = _random_image(*shape, seed=shape[0] * 1000 + shape[1])
    expected = F.interpolate(image[None].float(), size=size, mode="area")
    assert torch.allclose(AreaTables.build([image]).resize(0, *size), expected, atol=1e-4)


def test_area_crops_equal_torch_area_interpolation_of_each_crop() -> None:
    images = [_random_image(120, 90, seed=1), _random_image(41, 300, seed=2),
              _random_image(64, 64, seed=3).permute(0, 2, 1)]  # a strided view
    tables = AreaTables.build(images)
    # [image, x0, y0, x1, y1): whole images, large and small crops, one-pixel crops, edges.
    crops = [(0, 0, 0, 90, 120), (0, 17, 33, 89, 77), (1, 5, 0, 300, 41), (1, 299, 40, 300, 41),
             (2, 3, 9, 20, 15), (0, 10, 10, 12, 11), (2, 0, 0, 64, 64)]
    for size in (24, 48):
        for index in range(len(images)):
            regions = [c[1:] for c in crops if c[0] == index]
            ours = tables.crops(index, torch.tensor(regions), size)
            assert ours.shape == (len(regions), 3, size, size)
            for k, (x0, y0, x1, y1) in enumerate(regions):
                crop = images[index][:, y0:y1, x0:x1][None].float()
                assert torch.allclose(ours[k], F.interpolate(crop, size=(size, size), mode="area")[0], atol=1e-4)


def test_area_tables_of_large_images_switch_to_64_bit_sums() -> None:
    small = AreaTables.build([_random_image(20, 30, seed=4)])
    assert small.tables[0].dtype == torch.int32
    # 255 * 2100 * 4100 overflows int32: such an image's sums need 64 bits (white is the worst case).
    white = torch.full((3, 2100, 4100), 255, dtype=torch.uint8)
    tables = AreaTables.build([white])
    assert tables.tables[0].dtype == torch.int64
    assert torch.equal(tables.resize(0, 3, 2), torch.full((1, 3, 3, 2), 255.0))
