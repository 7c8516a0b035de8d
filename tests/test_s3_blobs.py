"""s3:// blobs against a real S3-compatible server (moto's, on loopback): submit uploads, the worker reads."""

from __future__ import annotations

import asyncio
import io
import os
import uuid

import boto3
import pytest

from imgstream.analysis.imaging import ImageError
from imgstream.consumer.fetch import TransientFetchError
from imgstream.consumer.s3_reader import S3BlobReader, S3Scopes
from imgstream.consumer.worker import Worker
from imgstream.producer.embedded_broker import find_free_port
from imgstream.schemas.config import BlobConfig, FetchConfig, KafkaConfig, WorkerConfig
from imgstream.schemas.events import AnalysisRequest, ResultEvent
from tests.engine_helpers import photo
from tests.kafka_helpers import consume_all, produce, running
from tests.test_producer_cli import imgstream
from tests.test_request_failures import running_worker

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
async def s3_worker(broker, topics, engine, s3_endpoint, bucket):
    config = WorkerConfig(
        kafka=KafkaConfig(bootstrap=broker, group=f"g-{uuid.uuid4().hex[:8]}", topics=topics, session_timeout_ms=3000),
        fetch=FetchConfig(max_bytes=2_000_000, s3_buckets=[bucket]), blobs=BlobConfig(s3_endpoint_url=s3_endpoint),
    )
    async with running(Worker(config, engine)) as worker:
        yield worker


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

    from imgstream.consumer.publish import crop_store, fit_result
    from imgstream.schemas.events import ResultEvent as Event

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


async def test_an_s3_reference_outside_the_allowed_buckets_is_refused_without_an_s3_call(
        broker, topics, engine, s3_endpoint, bucket, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    other = f"b-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=other)
    jpeg = io.BytesIO()
    photo("astronaut").save(jpeg, "JPEG")
    s3.put_object(Bucket=other, Key="secret.jpg", Body=jpeg.getvalue())
    s3.put_object(Bucket=bucket, Key="elsewhere/secret.jpg", Body=jpeg.getvalue())
    refused = {"other-bucket": f"s3://{other}/secret.jpg",
               "outside-prefix": f"s3://{bucket}/elsewhere/secret.jpg",
               "dot-dot": f"s3://{bucket}/blobs/../elsewhere/secret.jpg",
               "prefix-lookalike": f"s3://{bucket}/blobsx/secret.jpg"}
    missing = f"s3://{bucket}/blobs/nope.jpg"

    def request(request_id: str, reference: str) -> tuple[bytes, bytes, list]:
        event = AnalysisRequest(request_id=request_id, image={"blob": reference},
                                tasks=[{"operation_id": "e", "type": "embed_clip_vit_b_32"}])
        return request_id.encode(), event.model_dump_json().encode(), []

    # blobs.dir on S3 and no fetch.s3_buckets: the store's own bucket and prefix are the only scope.
    async with running_worker(broker, topics, engine,
                              blobs=BlobConfig(dir=f"s3://{bucket}/blobs", s3_endpoint_url=s3_endpoint)) as worker:
        while worker.fetcher is None:
            await asyncio.sleep(0.05)
        reader = worker.fetcher._blob_readers["s3"]
        calls: list[str] = []
        reader._s3().meta.events.register("before-send.s3", lambda request, **_: calls.append(request.url))
        await produce(broker, topics.requests, [request(rid, ref) for rid, ref in refused.items()])
        records = await consume_all(broker, topics.results, len(refused), timeout_s=60)
        assert calls == []  # refused before any S3 call
        await produce(broker, topics.requests, [request("missing", missing)])
        records = await consume_all(broker, topics.results, len(refused) + 1, timeout_s=60)
        assert calls  # the allowed one was asked for

    results = {r.request_id: r for r in (ResultEvent.model_validate_json(rec.value) for rec in records)}
    said = results["missing"].error_message.replace(missing, "REF")
    assert "cannot be read" in said
    for request_id, reference in refused.items():
        result = results[request_id]
        assert (result.status, result.error_code) == ("error", "image_fetch_failed")
        assert result.error_message.replace(reference, "REF") == said, request_id


def test_missing_and_forbidden_objects_read_the_same(s3_endpoint, bucket):
    from botocore.stub import Stubber

    reader = S3BlobReader(s3_endpoint, scopes=[bucket])
    stubber = Stubber(reader._s3())
    for code, status in (("NoSuchKey", 404), ("AccessDenied", 403), ("NoSuchBucket", 404)):
        stubber.add_client_error("get_object", service_error_code=code, http_status_code=status)
    messages = []
    with stubber:
        for _ in range(3):
            with pytest.raises(ImageError) as info:
                reader._read(f"s3://{bucket}/a.jpg", bucket, "a.jpg", 1000)
            assert info.value.code == "image_fetch_failed" and not isinstance(info.value, TransientFetchError)
            messages.append(info.value.message)
    assert len(set(messages)) == 1


def test_a_busy_s3_store_is_a_transient_failure(s3_endpoint, bucket):
    from botocore.stub import Stubber

    reader = S3BlobReader(s3_endpoint, scopes=[bucket])
    stubber = Stubber(reader._s3())
    stubber.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
    with stubber, pytest.raises(TransientFetchError):
        reader._read(f"s3://{bucket}/a.jpg", bucket, "a.jpg", 1000)


@pytest.mark.parametrize(("entries", "reference", "allowed"), [
    (["photos"], "s3://photos/a/b.jpg", True),
    (["photos"], "s3://photos2/a.jpg", False),
    (["photos/uploads"], "s3://photos/uploads/a.jpg", True),
    (["photos/uploads/"], "s3://photos/uploads/x/a.jpg", True),
    (["photos/uploads"], "s3://photos/uploadsx/a.jpg", False),
    (["photos/uploads"], "s3://photos/other/a.jpg", False),
    (["photos/uploads"], "s3://photos/uploads/../other/a.jpg", False),
    (["photos/uploads"], "s3://photos/uploads/./a.jpg", False),
    (["a", "photos/uploads"], "s3://a/anything.jpg", True),
    ([], "s3://photos/a.jpg", False),
])
def test_s3_scopes(entries, reference, allowed):
    from imgstream.consumer.s3_reader import split_s3_reference

    assert S3Scopes(entries).allows(*split_s3_reference(reference)) is allowed


def test_the_default_s3_scope_is_the_blob_stores_own():
    own = WorkerConfig(blobs=BlobConfig(dir="s3://store/imgstream/blobs")).s3_blob_scopes()
    assert own == ["store/imgstream/blobs"]
    assert WorkerConfig(blobs=BlobConfig(dir="s3://store")).s3_blob_scopes() == ["store"]
    assert WorkerConfig().s3_blob_scopes() == []  # a directory store: no bucket at all
    assert WorkerConfig(fetch=FetchConfig(s3_buckets=["a", "b/c"])).s3_blob_scopes() == ["a", "b/c"]
    with pytest.raises(ValueError, match="not `bucket` or `bucket/prefix`"):
        FetchConfig(s3_buckets=["s3://a"])
