"""orjson encoding and decoding of imgstream's events."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from imgstream.schemas.events import AnalysisRequest, ResultEvent


class InvalidEvent(Exception):
    """Bytes that are not a valid event; `code` says why (for the DLQ)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# numpy arrays (embeddings) are written by orjson directly, float32 as the shortest text that reads
# back to the same float32; datetimes as RFC 3339 with a Z.
_DUMPS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_UTC_Z


def _fields(value: Any) -> Any:
    """orjson's hook for what it cannot write itself: a model (the event, and models inside it) as its fields."""
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode(event: BaseModel) -> bytes:
    """Serialise an event to compact JSON bytes.

    orjson walks the model's own fields (what `model_dump()` would give: the events have no
    serialisers of their own outside JSON mode and keep no extra fields), so a result costs no
    copy into dicts and no Python float per embedding value.
    """
    return orjson.dumps(event, default=_fields, option=_DUMPS)


def encode_json(value: Any) -> bytes:
    return orjson.dumps(value)


def _summarise(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def decode_request(data: bytes | None) -> AnalysisRequest:
    """Parse an AnalysisRequest, raising InvalidEvent(code, reason) for anything else."""
    if data is None:
        raise InvalidEvent("empty", "event has no value (tombstone)")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"value is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("schema_violation", f"value is JSON {type(raw).__name__}, not an object")
    try:
        return AnalysisRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidEvent("schema_violation", _summarise(exc)) from None


def decode_result(data: bytes) -> ResultEvent:
    return ResultEvent.model_validate_json(data)
