"""Event, configuration and operation-registry models of imgstream (pydantic + orjson only)."""

from imgstream.schemas.events import (
    SCHEMA_VERSION,
    AnalysisRequest,
    DeadLetter,
    ImageInfo,
    ImageRef,
    ModelInfo,
    ResultEvent,
    Status,
    Task,
    make_event_id,
)

__all__ = [
    "SCHEMA_VERSION",
    "AnalysisRequest",
    "DeadLetter",
    "ImageInfo",
    "ImageRef",
    "ModelInfo",
    "ResultEvent",
    "Status",
    "Task",
    "make_event_id",
]
