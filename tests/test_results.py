"""Result events built without validation are the events pydantic's model_construct would build."""

from __future__ import annotations

import numpy as np
import pytest

from imgstream.analysis.results import error_results, image_info, task_result
from imgstream.schemas.codec import decode_result, encode
from imgstream.schemas.events import AnalysisRequest, ModelInfo, ResultEvent

REQUEST = AnalysisRequest.model_validate({
    "request_id": "r-1", "image": {"blob": "file:///data/a.jpg"}, "metadata": {"tenant": "t", "n": [1, 2]},
    "replay_of": "requests/0/7",
    "tasks": [{"operation_id": "clip", "type": "embed_clip_vit_b_32", "params": {"target": "whole_image"}},
              {"operation_id": "box", "type": "detect_bounding_box", "params": {"target": "prominent_face"}}],
})


def results() -> list[ResultEvent]:
    info = image_info(REQUEST, 64, 48, "ab" * 32)
    clip, box = REQUEST.tasks
    return [
        task_result(REQUEST, clip, "success", data=np.arange(4, dtype=np.float32), region="whole_image",
                    image=info, model=ModelInfo(name="clip", weights="random", dim=4), normalized=True,
                    timings_ms={"fetch": 1.23456, "decode": 0.5}, reused=True),
        task_result(REQUEST, box, "success", data=[1, 2, 3, 4], region="prominent_face", bbox=[1, 2, 3, 4],
                    crop_base64="iVBORw0KGgo=", image=info),
        task_result(REQUEST, box, "skipped", error_code="no_face_found", error_message="none"),
        *error_results(REQUEST, "image_fetch_failed", "gone", timings_ms={"fetch": 2.0}),
    ]


@pytest.mark.parametrize("index", range(4))
def test_a_built_result_is_what_model_construct_gives(index):
    built = results()[index]
    values = {k: v for k, v in built.__dict__.items() if k != "cropped_image_ref"}
    reference = ResultEvent.model_construct(**values)

    assert list(built.__dict__) == list(reference.__dict__) == list(ResultEvent.model_fields)
    assert built.__pydantic_fields_set__ == reference.__pydantic_fields_set__
    assert built.__pydantic_extra__ is None and reference.__pydantic_extra__ is None
    assert built.__pydantic_private__ is None and reference.__pydantic_private__ is None
    assert encode(built) == encode(reference)
    assert built.model_dump(exclude={"data"}) == reference.model_dump(exclude={"data"})


def test_built_results_validate_copy_and_encode():
    for built in results():
        decoded = decode_result(encode(built))  # the schema takes what the worker writes
        assert decoded.event_id == "r-1/" + built.operation_id
        assert decoded.replayed and decoded.metadata == {"tenant": "t", "n": [1, 2]}
        copy = built.model_copy(update={"status": "error", "error_code": "x"})
        assert copy.status == "error" and copy.error_code == "x"
        assert "status" in copy.__pydantic_fields_set__
        assert built.__pydantic_fields_set__ is not copy.__pydantic_fields_set__
    first = results()[0]
    assert first.timings_ms == {"fetch": 1.235, "decode": 0.5}
    assert encode(first).startswith(b'{"schema_version":1,"event_id":"r-1/clip"')
