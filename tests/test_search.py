"""`imgstream search`: real photos embedded by the engine, stored in pgvector, searched by image."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import psycopg
import pytest

from imgstream.sink.pgstore import PgStore, row_from_event
from imgstream.sink.search import embed_file, search_image
from tests.engine_helpers import photo

REPO = Path(__file__).resolve().parents[1]
CLIP = "embed_clip_vit_b_32"
PHOTOS = ("astronaut", "camera", "coffee", "chelsea")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    files = {}
    for name in PHOTOS:
        files[name] = folder / f"{name}.png"
        photo(name).save(files[name])
    return files


@pytest.fixture(scope="module")
async def gallery(pg: str, engine, photo_files) -> str:
    """A fresh database holding the CLIP embeddings of the four photos, plus a decoy from other weights."""
    name = f"search_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    dsn = psycopg.conninfo.make_conninfo(pg, dbname=name)
    store = await PgStore.connect(dsn)
    await store.ensure_schema()
    rows = []
    for photo_name, path in photo_files.items():
        result = await embed_file(engine, path, CLIP, "whole_image")
        result = result.model_copy(update={"request_id": photo_name, "event_id": f"{photo_name}/clip",
                                           "metadata": {"photo": photo_name}})
        rows.append(row_from_event(result))
        if photo_name == "astronaut":
            # Same vector, other weights: must never be compared with a random-weights query.
            decoy = result.model_copy(update={
                "request_id": "decoy", "event_id": "decoy/clip",
                "model": result.model.model_copy(update={"weights": "openai"})})
            rows.append(row_from_event(decoy))
    report = await store.write(rows)
    assert report.rows == len(PHOTOS) + 1
    await store.close()
    yield dsn
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_the_astronaut_finds_itself_first_at_distance_zero(gallery, engine, photo_files):
    store = await PgStore.connect(gallery)
    try:
        found = await search_image(store, engine, photo_files["astronaut"], CLIP, "whole_image", k=10)
    finally:
        await store.close()
    assert found.query.model.weights == "random"
    assert [m.request_id for m in found.matches][0] == "astronaut"
    assert sorted(m.request_id for m in found.matches) == sorted(PHOTOS)  # no decoy from other weights
    assert found.matches[0].distance == pytest.approx(0.0, abs=1e-4)
    distances = [m.distance for m in found.matches]
    assert distances == sorted(distances) and distances[1] > 1e-3
    first = found.matches[0]
    assert first.metadata == {"photo": "astronaut"} and first.region == "whole_image"
    assert first.image_blob == photo_files["astronaut"].resolve().as_uri()


async def test_k_limits_the_matches(gallery, engine, photo_files):
    store = await PgStore.connect(gallery)
    try:
        found = await search_image(store, engine, photo_files["coffee"], CLIP, "whole_image", k=2)
    finally:
        await store.close()
    assert [m.request_id for m in found.matches][0] == "coffee" and len(found.matches) == 2


async def test_an_empty_database_gives_no_matches(pg, engine, photo_files):
    name = f"empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    store = await PgStore.connect(psycopg.conninfo.make_conninfo(pg, dbname=name))
    try:
        found = await search_image(store, engine, photo_files["camera"], CLIP, "whole_image", k=5)
    finally:
        await store.close()
    assert found.matches == []


def _search_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgstream", "search", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_command_prints_the_nearest_images_as_json(gallery, photo_files):
    done = _search_cli(str(photo_files["astronaut"]), "--type", CLIP, "-k", "3", "--dsn", gallery,
                       "--weights", "random", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    matches = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [m["rank"] for m in matches] == [1, 2, 3]
    assert matches[0]["request_id"] == "astronaut" and matches[0]["distance"] == pytest.approx(0.0, abs=1e-4)
    assert matches[0]["model"] == {"name": "ViT-B-32-quickgelu", "weights": "random"}
    assert matches[0]["metadata"] == {"photo": "astronaut"}


def test_usage_errors_exit_2(gallery, tmp_path):
    assert _search_cli(str(tmp_path / "missing.png"), "--type", CLIP, "--dsn", gallery).returncode == 2
    assert _search_cli("x.png", "--type", "detect_bounding_box", "--dsn", gallery).returncode == 2
