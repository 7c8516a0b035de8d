"""s3:// blobs against a real S3-compatible server (moto's, on loopback): submit uploads, the worker reads."""

from __future__ import annotations

import asyncio
import os
import uuid

import boto3
import pytest

from consumer.worker import Worker
from producer.embedded_broker import find_free_port
from schemas.config import BlobConfig, FetchConfig, KafkaConfig, WorkerConfig
from schemas.events import AnalysisRequest, ResultEvent
from tests.engine_helpers import photo
from tests.kafka_helpers import consume_all, produce
from tests.test_producer_cli import imgstream

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    port = find_free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint):
    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
async def s3_worker(broker, topics, engine, s3_endpoint):
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics, session_timeout_ms=3000),
        fetch=FetchConfig(max_bytes=2_000_000), blobs=BlobConfig(s3_endpoint_url=s3_endpoint),
    )
    worker = Worker(config, engine)
    task = asyncio.create_task(worker.run())
    yield worker
    worker.request_stop("test finished")
    await asyncio.wait_for(task, 60)


async def test_submit_uploads_to_s3_and_the_worker_reads_it(broker, topics, s3_worker, s3_endpoint, bucket, tmp_path):
    path = tmp_path / "astronaut.jpg"
    photo("astronaut").save(path)
    env_args = ("submit", str(path), "--task", "detect_bounding_box:prominent_face", "--wait", "--json",
                "--blob-dir", f"s3://{bucket}/uploads")
    os.environ["IMGSTREAM_BLOBS__S3_ENDPOINT_URL"] = s3_endpoint
    try:
        code, out, err = await imgstream(broker, topics, *env_args)
    finally:
        os.environ.pop("IMGSTREAM_BLOBS__S3_ENDPOINT_URL")
    assert code == 0, err
    (result,) = [ResultEvent.model_validate_json(line) for line in out.splitlines()]
    assert result.status == "success" and result.image.blob.startswith(f"s3://{bucket}/uploads/")
    assert 170 <= result.data[0] < result.data[2] <= 290
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 1 and keys[0].endswith(".jpg")


async def test_missing_and_oversized_s3_objects_give_error_results(broker, topics, s3_worker, s3_endpoint, bucket):
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="big.jpg", Body=b"\xff" * 2_500_000)
    requests = [
        AnalysisRequest(request_id="missing", image={"blob": f"s3://{bucket}/nope.jpg"},
                        tasks=[{"operation_id": "e", "type": "embed_clip_vit_b_32"}]),
        AnalysisRequest(request_id="big", image={"blob": f"s3://{bucket}/big.jpg"},
                        tasks=[{"operation_id": "e", "type": "embed_clip_vit_b_32"}]),
    ]
    await produce(broker, topics.requests, [(r.request_id.encode(), r.model_dump_json().encode(), []) for r in requests])
    results = {r.request_id: r for r in (ResultEvent.model_validate_json(rec.value)
                                         for rec in await consume_all(broker, topics.results, 2, timeout_s=60))}
    assert (results["missing"].status, results["missing"].error_code) == ("error", "image_fetch_failed")
    assert (results["big"].status, results["big"].error_code) == ("error", "image_too_large")


def test_a_crop_too_large_for_a_message_goes_to_the_s3_blob_store(s3_endpoint, bucket):
    import base64
    import io

    from consumer.publish import crop_store, fit_result
    from schemas.events import ResultEvent as Event

    png = io.BytesIO()
    photo("astronaut").save(png, format="PNG")
    result = Event(event_id="r/face", request_id="r", operation_id="face", type="embed_clip_vit_b_32",
                   status="success", data=[0.0] * 512, cropped_image_bbox=[0, 0, 512, 512],
                   cropped_image_base64=base64.b64encode(png.getvalue()).decode())
    store = crop_store(BlobConfig(dir=f"s3://{bucket}/blobs", s3_endpoint_url=s3_endpoint))
    fitted = fit_result(result, 100_000, store)
    stored = Event.model_validate_json(fitted.payload)
    assert fitted.offloaded and stored == fitted.result and stored.cropped_image_base64 is None
    assert stored.cropped_image_ref.startswith(f"s3://{bucket}/blobs/crops/")
    key = stored.cropped_image_ref.split("/", 3)[3]
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == png.getvalue()
