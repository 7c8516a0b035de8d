"""Building ResultEvents: one per (request_id, operation_id)."""

from __future__ import annotations

from typing import Any

from imgstream.schemas.events import (
    SCHEMA_VERSION,
    AnalysisRequest,
    ImageInfo,
    ModelInfo,
    ResultEvent,
    Status,
    Task,
    make_event_id,
    utc_now,
)


def image_info(request: AnalysisRequest, width: int | None = None, height: int | None = None,
               sha256: str | None = None) -> ImageInfo:
    return ImageInfo(url=request.image.url, blob=request.image.blob, width=width, height=height, sha256=sha256)


def task_result(
    request: AnalysisRequest,
    task: Task,
    status: Status,
    *,
    data: Any = None,
    region: str | None = None,
    bbox: list[int] | None = None,
    crop_base64: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    image: ImageInfo | None = None,
    model: ModelInfo | None = None,
    normalized: bool | None = None,
    timings_ms: dict[str, float] | None = None,
    reused: bool = False,
) -> ResultEvent:
    # Built without validation: the engine's outputs have the schema's types by construction (a test
    # validates every kind of result), and validating a 512-float array per result would cost more
    # than the model did on a GPU.
    return construct_result({
        "schema_version": SCHEMA_VERSION,
        "event_id": make_event_id(request.request_id, task.operation_id),
        "request_id": request.request_id,
        "operation_id": task.operation_id,
        "type": task.type,
        "status": status,
        "data": data,
        "region": region,
        "cropped_image_bbox": bbox,
        "cropped_image_base64": crop_base64,
        "cropped_image_ref": None,
        "error_code": error_code,
        "error_message": error_message,
        "image": image or image_info(request),
        "model": model,
        "normalized": normalized,
        "metadata": request.metadata,
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()} if timings_ms else {},
        "replayed": request.replay_of is not None,
        "reused": reused,
        "completed_at": utc_now(),
    })


# The fields task_result sets, as model_construct recorded them (cropped_image_ref is set only when
# a crop moves to the blob store).
_FIELDS_SET = frozenset(ResultEvent.model_fields) - {"cropped_image_ref"}


def construct_result(values: dict[str, Any]) -> ResultEvent:
    """What ResultEvent.model_construct() gave task_result, from `values` holding every field in the
    model's order: its steps for a model without extras, private attributes or post-init, without its
    walk over the fields for defaults; a fifth of its cost (tests/test_results.py compares the two)."""
    event = ResultEvent.__new__(ResultEvent)
    _set = object.__setattr__
    _set(event, "__dict__", values)
    _set(event, "__pydantic_fields_set__", set(_FIELDS_SET))
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def error_results(
    request: AnalysisRequest,
    code: str,
    message: str,
    *,
    image: ImageInfo | None = None,
    timings_ms: dict[str, float] | None = None,
) -> list[ResultEvent]:
    """An `error` result for every task, e.g. when the image could not be fetched or decoded."""
    return [
        task_result(request, task, "error", error_code=code, error_message=message, image=image, timings_ms=timings_ms)
        for task in request.tasks
    ]
