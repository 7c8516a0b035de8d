"""The producing side's commands against the real broker and a real (in-process) worker."""

from __future__ import annotations

import asyncio
import os
import sys

import orjson
import pytest

from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.events import ResultEvent
from tests.engine_helpers import cosine, photo
from tests.test_worker import worker  # noqa: F401 - fixture: a worker on this test's topics

pytestmark = pytest.mark.usefixtures("worker")


async def imgstream(broker, topics, *args, stdin: bytes | None = None, timeout: float = 240):
    """Run the `imgstream` CLI as a subprocess without blocking the loop the worker runs on."""
    env = dict(os.environ, IMGSTREAM_KAFKA__BOOTSTRAP=broker, HF_HUB_OFFLINE="1",
               IMGSTREAM_KAFKA__TOPICS__REQUESTS=topics.requests, IMGSTREAM_KAFKA__TOPICS__RESULTS=topics.results,
               IMGSTREAM_KAFKA__TOPICS__REPLAY=topics.replay, IMGSTREAM_KAFKA__TOPICS__DLQ=topics.dlq,
               IMGSTREAM_KAFKA__TOPICS__RETRY=topics.retry)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imgstream", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    photo("astronaut").save(root / "A.JPG")
    photo("coffee").save(root / "b.png")
    photo("camera").save(root / "sub" / "c.Jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


async def test_submit_folder_waits_and_prints_one_json_result_per_line(broker, topics, folder, tmp_path):
    blobs = tmp_path / "blobs"
    code, out, err = await imgstream(broker, topics, "submit", str(folder), "--task", "embed_clip_vit_b_32",
                                     "--task", "detect_bounding_box:prominent_face", "--wait", "--json",
                                     "--blob-dir", str(blobs))
    assert code == 0, err
    results = [ResultEvent.model_validate_json(line) for line in out.splitlines()]
    assert len(results) == 6  # 3 images x 2 tasks; nothing else on stdout
    assert {r.operation_id for r in results} == {"embed_clip_vit_b_32", "detect_bounding_box:prominent_face"}
    assert len({r.request_id for r in results}) == 3
    assert all(r.image.blob.startswith(blobs.resolve().as_uri()) for r in results)
    assert len(list(blobs.rglob("*.*"))) == 3  # the images were copied into the blob store


async def test_submit_reads_a_list_from_stdin_and_prints_a_table(broker, topics, folder):
    listing = f"# my list\n{folder / 'A.JPG'}\n\n{folder / 'b.png'}\n".encode()
    code, out, err = await imgstream(broker, topics, "submit", "-", "--task", "embed_clip_vit_b_32", "--wait",
                                     "--in-place", stdin=listing)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["image", "operation", "status", "result", "region", "weights"]
    assert len(lines) == 4 and "A.JPG" in out and "512-d embedding" in out


async def test_submit_exits_non_zero_when_a_result_is_an_error(broker, topics):
    url = f"http://127.0.0.1:{find_free_port()}/gone.jpg"
    code, out, err = await imgstream(broker, topics, "submit", url, "--task", "embed_clip_vit_b_32", "--wait",
                                     "--json")
    assert code == 1
    (result,) = [orjson.loads(line) for line in out.splitlines()]
    assert result["status"] == "error" and result["error_code"] == "image_fetch_failed"


async def test_submit_usage_errors(broker, topics, tmp_path):
    code, _, err = await imgstream(broker, topics, "submit", str(tmp_path / "missing.jpg"), "--task", "x")
    assert code == 2 and "no such file" in err
    code, _, err = await imgstream(broker, topics, "submit", str(tmp_path))
    assert code == 2 and "--task" in err


async def test_caption_folder_writes_captions_and_leaves_existing_ones(broker, topics, folder):
    (folder / "b.txt").write_text("my own caption\n")
    code, out, err = await imgstream(broker, topics, "caption-folder", str(folder), "--max-length", "4",
                                     "--in-place")
    assert code == 0, err
    assert (folder / "A.txt").read_text().strip()
    assert (folder / "b.txt").read_text() == "my own caption\n"
    assert not (folder / "sub" / "c.txt").exists()  # not recursive unless asked
    assert "captions written: 1, skipped (existing): 1" in out
    code, out, err = await imgstream(broker, topics, "caption-folder", str(folder), "--force", "--recursive",
                                     "--max-length", "3", "--in-place")
    assert code == 0, err
    assert (folder / "b.txt").read_text() != "my own caption\n"
    assert (folder / "sub" / "c.txt").exists()
    assert "captions written: 3, skipped (existing): 0" in out


async def test_replay_republishes_selected_requests_with_new_tasks(broker, topics, folder):
    code, out, err = await imgstream(broker, topics, "submit", str(folder / "A.JPG"), str(folder / "b.png"),
                                     "--task", "embed_clip_vit_b_32", "--wait", "--json", "--in-place")
    assert code == 0, err
    originals = [ResultEvent.model_validate_json(line) for line in out.splitlines()]
    first_id = originals[0].request_id
    code, out, err = await imgstream(broker, topics, "replay", "--request-id-prefix", first_id, "--dry-run")
    assert code == 0, err
    assert "would publish 1" in err
    assert out.split("\t")[0] == first_id

    code, out, err = await imgstream(broker, topics, "replay", "--request-id-prefix", first_id,
                                     "--task", "embed_dino_v2", "--task", "embed_clip_vit_b_32")
    assert code == 0, err
    assert "published 1" in err
    from tests.kafka_helpers import consume_all

    records = await consume_all(broker, topics.results, len(originals) + 2, timeout_s=120)
    replayed = [r for r in (ResultEvent.model_validate_json(rec.value) for rec in records) if r.replayed]
    assert sorted(r.operation_id for r in replayed) == ["embed_clip_vit_b_32", "embed_dino_v2"]
    assert all(r.request_id == first_id for r in replayed)
    original_clip = next(r for r in originals if r.request_id == first_id)
    replayed_clip = next(r for r in replayed if r.operation_id == "embed_clip_vit_b_32")
    assert replayed_clip.event_id == original_clip.event_id
    # The original ran in a batch with the other image, the replay alone: same vector up to float noise.
    assert len(replayed_clip.data) == len(original_clip.data) == 512
    assert cosine(replayed_clip.data, original_clip.data) >= 0.9999


async def test_replay_by_offsets_and_time(broker, topics, folder):
    code, out, err = await imgstream(broker, topics, "submit", str(folder / "A.JPG"), "--task",
                                     "embed_clip_vit_b_32", "--in-place")
    assert code == 0, err
    code, out, err = await imgstream(broker, topics, "replay", "--since", "2000-01-01T00:00:00Z", "--dry-run")
    assert code == 0 and len(out.splitlines()) == 1, err
    code, out, err = await imgstream(broker, topics, "replay", "--until", "2000-01-01T00:00:00Z", "--dry-run")
    assert code == 0 and out == "", err
    code, out, err = await imgstream(broker, topics, "replay", "--offsets", "0:0-0,1:0-0,2:0-0,3:0-0", "--dry-run")
    assert code == 0 and out == "", err
    code, _, err = await imgstream(broker, topics, "replay", "--offsets", "zero:1", "--dry-run")
    assert code == 2 and "PARTITION:START" in err


async def test_submit_keys_requests_by_image_so_one_image_lands_on_one_partition(broker, topics, folder, tmp_path):
    import hashlib

    from tests.kafka_helpers import consume_all

    image = folder / "A.JPG"
    code, out, err = await imgstream(broker, topics, "submit", str(image), str(image), "https://example.org/x.jpg",
                                     "--task", "embed_clip_vit_b_32", "--blob-dir", str(tmp_path / "blobs"))
    assert code == 0, err
    records = await consume_all(broker, topics.requests, 3, timeout_s=30)
    keys = sorted(r.key for r in records)
    digest = hashlib.sha256(image.read_bytes()).hexdigest().encode()
    assert keys == sorted([digest, digest, b"https://example.org/x.jpg"])
    assert len({r.partition for r in records if r.key == digest}) == 1


async def test_a_bad_setting_is_a_usage_error_that_names_it(broker, topics):
    for command in (["worker"], ["submit", "x.jpg", "--task", "embed_clip_vit_b_32"], ["sink", "pgvector"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imgstream", *command, env=dict(os.environ, IMGSTREAM_MAX_IN_FLIGHT="many"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, err
        assert b"bad configuration: max_in_flight (IMGSTREAM_MAX_IN_FLIGHT)" in err and b"Traceback" not in err
