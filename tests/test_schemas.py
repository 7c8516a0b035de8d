"""The event contract (SPEC §2, §3) and the generated JSON Schema files."""

import subprocess
import sys

import numpy as np
import orjson
import pytest

from imgstream.schemas.codec import InvalidEvent, decode_request, encode
from imgstream.schemas.events import (
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
    AnalysisRequest,
    DeadLetter,
    ImageInfo,
    ModelInfo,
    ResultEvent,
    make_event_id,
)
from imgstream.schemas.export import SCHEMA_DIR, render
from imgstream.schemas.operations import InvalidParams, UnsupportedOperation, describe_operations, resolve_params

GOOD = {
    "schema_version": 1,
    "request_id": "crawler-7:photo-123",
    "image": {"url": "https://example.org/a.jpg"},
    "tasks": [
        {"operation_id": "clip_whole", "type": "embed_clip_vit_b_32", "params": {"target": "whole_image"}},
        {"operation_id": "face_box", "type": "detect_bounding_box", "params": {"target": "prominent_face"}},
    ],
    "metadata": {"photo_id": 123},
    "submitted_at": "2026-11-25T18:00:00Z",
}


def _with(**changes):
    return orjson.dumps({**GOOD, **changes})


def test_spec_example_request_decodes():
    request = decode_request(orjson.dumps(GOOD))
    assert request.request_id == "crawler-7:photo-123"
    assert [t.operation_id for t in request.tasks] == ["clip_whole", "face_box"]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"not json at all", "not_json"),
        (b"[1, 2]", "schema_violation"),
        (_with(tasks=[]), "schema_violation"),
        (_with(image={}), "schema_violation"),
        (_with(image={"url": "https://a/b.jpg", "blob": "file:///x.jpg"}), "schema_violation"),
        (_with(image={"url": "ftp://a/b.jpg"}), "schema_violation"),
        (_with(image={"blob": "no-scheme"}), "schema_violation"),
        (_with(schema_version=2), "schema_violation"),
        (_with(request_id=""), "schema_violation"),
        (_with(tasks=[{"operation_id": "a", "type": "x"}, {"operation_id": "a", "type": "y"}]), "schema_violation"),
        (_with(tasks=[{"operation_id": str(i), "type": "x"} for i in range(65)]), "schema_violation"),
        (_with(metadata={"blob": "x" * 20000}), "schema_violation"),
        (None, "empty"),
    ],
)
def test_structurally_invalid_events_are_refused_with_a_reason(value, code):
    with pytest.raises(InvalidEvent) as info:
        decode_request(value)
    assert info.value.code == code
    assert info.value.reason


def _nested(levels: int) -> bytes:
    """A JSON object nested `levels` deep, written by hand: orjson itself refuses to write past 254."""
    return b'{"k":' * (levels - 1) + b"{}" + b"}" * (levels - 1)


def _with_raw(field: bytes, value: bytes) -> bytes:
    return orjson.dumps(GOOD)[:-1] + b',"' + field + b'":' + value + b"}"


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 254, 255, 300, 1000])
def test_metadata_nested_past_the_limit_is_refused_naming_the_limit(levels):
    with pytest.raises(InvalidEvent) as info:
        decode_request(_with_raw(b"metadata", _nested(levels)))
    assert info.value.code == "schema_violation"
    assert f"more than {MAX_JSON_DEPTH} levels" in info.value.reason and "metadata" in info.value.reason


def test_metadata_and_params_at_the_depth_limit_pass():
    request = decode_request(_with_raw(b"metadata", _nested(MAX_JSON_DEPTH)))
    assert len(encode(request)) > 0
    task = {"operation_id": "a", "type": "x", "params": orjson.loads(_nested(MAX_JSON_DEPTH))}
    assert decode_request(_with(tasks=[task])).tasks[0].params


def test_params_nested_past_the_limit_are_refused():
    task = b'[{"operation_id":"a","type":"x","params":{"p":' + _nested(MAX_JSON_DEPTH) + b"}}]"
    with pytest.raises(InvalidEvent, match=f"params nests more than {MAX_JSON_DEPTH} levels"):
        decode_request(_with_raw(b"tasks", task))


def test_metadata_over_the_size_limit_names_the_limit():
    with pytest.raises(InvalidEvent, match=f"larger than {MAX_METADATA_BYTES} bytes"):
        decode_request(_with(metadata={"blob": "x" * MAX_METADATA_BYTES}))


@pytest.mark.parametrize(("metadata", "message"), [
    ({"id": 2**64}, "Integer exceeds 64-bit range"),
    ({"nested": {1: "int key"}}, "Dict key must be str"),
    ({"text": "lone \ud800 surrogate"}, "surrogates not allowed"),
    ({"tags": {"a", "b"}}, "not JSON serializable"),
])
def test_requests_built_in_python_with_metadata_json_cannot_hold_are_refused(metadata, message):
    # Off the wire orjson never yields these (big numbers read as floats, surrogates are refused), but a
    # producer building requests in Python can.
    with pytest.raises(ValueError, match=message):
        AnalysisRequest.model_validate({**GOOD, "metadata": metadata})


@pytest.mark.parametrize("field", ["request_id", "replay_of"])
def test_text_utf8_cannot_encode_is_refused(field):
    with pytest.raises(ValueError, match="surrogate|unicode string"):
        AnalysisRequest.model_validate({**GOOD, field: "crawler-\udc80"})


def test_dead_letter_headers_survive_a_reason_utf8_cannot_encode():
    letter = DeadLetter(reason="bad \ud800", error_code="schema_violation", source_topic="t", source_partition=0,
                        source_offset=1)
    assert dict(letter.headers())["imgstream.reason"] == b"bad \\ud800"


def test_duplicate_operation_id_reason_names_it():
    bad = _with(tasks=[{"operation_id": "dup", "type": "x"}, {"operation_id": "dup", "type": "y"}])
    with pytest.raises(InvalidEvent, match="duplicate operation_id 'dup'"):
        decode_request(bad)


def test_unknown_operation_is_structurally_valid():
    request = decode_request(_with(tasks=[{"operation_id": "a", "type": "no_such_op", "params": None}]))
    assert request.tasks[0].params == {}


def test_event_id_is_deterministic():
    assert make_event_id("r1", "op") == make_event_id("r1", "op") == "r1/op"


def test_result_event_round_trips_through_the_codec():
    event = ResultEvent(event_id="r/o", request_id="r", operation_id="o", type="embed_clip_vit_b_32",
                        status="success", data=[0.5, -0.25])
    assert ResultEvent.model_validate_json(encode(event)) == event


def test_encoding_writes_what_model_dump_holds_with_embeddings_straight_from_numpy():
    vector = np.linspace(-1, 1, 512, dtype=np.float32)
    event = ResultEvent(event_id="r/o", request_id="r", operation_id="o", type="embed_clip_vit_b_32",
                        status="success", data=vector, image=ImageInfo(url="https://example.org/a.jpg", width=4,
                                                                       height=3, sha256="ab" * 32),
                        model=ModelInfo(name="ViT-B-32-quickgelu", weights="random", dim=512),
                        metadata={"photo_id": 1, "tags": ["a"]}, timings_ms={"fetch": 1.5}, reused=True)
    expected = orjson.dumps(event.model_dump(), option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_UTC_Z)
    assert encode(event) == expected
    back = ResultEvent.model_validate_json(encode(event))  # and it is a valid result event
    assert np.allclose(back.data, vector, atol=0) and back.image == event.image and back.reused
    request = decode_request(_with(metadata={"photo_id": 7}))
    assert orjson.loads(encode(request)) == orjson.loads(orjson.dumps(request.model_dump(), option=orjson.OPT_UTC_Z))


def test_dead_letter_headers_round_trip():
    letter = DeadLetter(reason="value is not JSON", error_code="not_json", source_topic="t", source_partition=3,
                        source_offset=42)
    assert DeadLetter.from_headers(letter.headers()) == letter


def test_json_schema_files_are_up_to_date():
    for name, text in render().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{path} missing: run `make schemas`"
        assert path.read_text() == text, f"{path} is stale: run `make schemas`"


def test_schemas_and_producer_import_without_torch():
    code = (
        "import sys, schemas, schemas.codec, schemas.operations, schemas.config, producer.cli, producer.submit; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_every_operation_with_targets_and_params():
    ops = describe_operations()
    assert set(ops) == {"detect_bounding_box", "embed_clip_vit_b_32", "embed_dino_v2", "classify", "describe_image"}
    assert ops["detect_bounding_box"]["default_target"] == "prominent_person"
    assert ops["embed_clip_vit_b_32"]["allowed_targets"] == ["whole_image", "prominent_person", "prominent_face"]
    assert ops["describe_image"]["params"]["max_length"]["default"] == 50


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("embed_clip_vit_b_32", {"target": "prominent_cat"}, "Unsupported target"),
        ("detect_bounding_box", {"target": "whole_image"}, "Unsupported target"),
        ("embed_clip_vit_b_32", {"face_context": "elsewhere"}, "face_context"),
        ("embed_clip_vit_b_32", {"min_score": 1.5}, "min_score"),
        ("embed_clip_vit_b_32", {"normalize": "yes"}, "normalize"),
        ("describe_image", {"max_length": 0}, "max_length"),
        ("describe_image", {"max_length": 513}, "max_length"),
        ("classify", {}, "collection_id"),
        ("classify", {"collection_id": "abc"}, "collection_id"),
        ("embed_clip_vit_b_32", {"colour": "red"}, "unknown param"),
    ],
)
def test_bad_params_are_invalid(op, params, message):
    with pytest.raises(InvalidParams, match=message):
        resolve_params(op, params)


def test_unknown_operation_is_unsupported():
    with pytest.raises(UnsupportedOperation):
        resolve_params("embed_dino_v9", {})


def test_defaults_are_filled():
    params = resolve_params("embed_dino_v2", {})
    assert params["target"] == "whole_image" and params["normalize"] is False and params["return_crop"] is True
    assert resolve_params("classify", {"collection_id": "7"})["collection_id"] == 7


def test_config_precedence_flags_over_environment_over_defaults():
    from imgstream.schemas.config import load_config

    env = {"IMGSTREAM_KAFKA__BOOTSTRAP": "env:9092", "IMGSTREAM_MODELS__WEIGHTS": "random",
           "IMGSTREAM_MAX_IN_FLIGHT": "7", "IMGSTREAM_FETCH__ALLOW_PRIVATE_ADDRESSES": "true"}
    config = load_config({"kafka": {"bootstrap": "flag:9092", "group": None}, "models": {"device": None}}, env)
    assert config.kafka.bootstrap == "flag:9092" and config.kafka.group == "imgstream-workers"
    assert config.models.weights == "random" and config.models.device == "auto"
    assert config.max_in_flight == 7 and config.fetch.allow_private_addresses is True
