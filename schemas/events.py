"""The events that travel on imgstream's topics (SPEC §2, §3)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

SCHEMA_VERSION = 1
MAX_TASKS = 64
MAX_METADATA_BYTES = 16 * 1024
# Objects and arrays nested in `metadata` or a task's `params` (the value itself is level 1). orjson
# writes at most 254 levels and reads 1,024, so without a bound a request could be read but never answered.
MAX_JSON_DEPTH = 32
URL_SCHEMES = ("http://", "https://")


def _utf8_text(value: str) -> str:
    """Text that UTF-8 can encode: JSON off the wire never holds a lone surrogate, but a request built in
    Python can, and pydantic lets some through (`str | None` fields)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds a lone surrogate, which UTF-8 cannot encode") from None
    return value


Text = Annotated[str, AfterValidator(_utf8_text)]


def _depth_over(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels in `value` (iterative: any depth is safe)."""
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def check_json_value(value: Any, what: str, max_bytes: int | None = None) -> int:
    """The size of `value` as JSON; ValueError naming the limit when it is too deep, too large or not JSON."""
    too_deep = ValueError(f"{what} nests more than {MAX_JSON_DEPTH} levels of objects and arrays "
                          f"(the limit is {MAX_JSON_DEPTH})")
    try:
        size = len(orjson.dumps(value))
    except TypeError as exc:  # orjson.JSONEncodeError: nested past 254, an int over 64 bits, a key that is no str
        if _depth_over(value, MAX_JSON_DEPTH):
            raise too_deep from None
        raise ValueError(f"{what} cannot be written as JSON: {exc}") from None
    if _depth_over(value, MAX_JSON_DEPTH):
        raise too_deep
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{what} is larger than {max_bytes} bytes as JSON (the limit is {max_bytes})")
    return size


Status = Literal["success", "skipped", "error"]


class ImageRef(BaseModel):
    """Where the image lives: exactly one of an http(s) URL or a blob-store reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Text | None = Field(default=None, max_length=8192, description="http or https URL of the image.")
    blob: Text | None = Field(
        default=None,
        max_length=8192,
        description="Blob-store reference such as file:///shared/a.jpg or s3://bucket/key.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        if (self.url is None) == (self.blob is None):
            raise ValueError("image must hold exactly one of 'url' or 'blob'")
        if self.url is not None and not self.url.lower().startswith(URL_SCHEMES):
            raise ValueError("image.url must be an http:// or https:// URL")
        if self.blob is not None:
            scheme, sep, rest = self.blob.partition("://")
            if not sep or not scheme or not rest:
                raise ValueError("image.blob must be a reference with a scheme, such as file:///path")
        return self

    @property
    def location(self) -> str:
        return self.url if self.url is not None else self.blob  # type: ignore[return-value]


class Task(BaseModel):
    """One operation to run on the request's image."""

    model_config = ConfigDict(extra="forbid")

    operation_id: Text = Field(min_length=1, max_length=256)
    type: Text = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(
        default_factory=dict, description=f"The operation's parameters; at most {MAX_JSON_DEPTH} levels of nested "
        "objects and arrays.", json_schema_extra={"x-max-depth": MAX_JSON_DEPTH})

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("params")
    @classmethod
    def _writable_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        # Replay and retries write the request again: what cannot be written must be refused here.
        if params:
            check_json_value(params, "params")
        return params


class AnalysisRequest(BaseModel):
    """An image plus the tasks to run on it (SPEC §2)."""

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: Text = Field(min_length=1, max_length=512)
    image: ImageRef
    tasks: list[Task] = Field(min_length=1, max_length=MAX_TASKS)
    metadata: dict[str, Any] | None = Field(
        default=None, description=f"Echoed verbatim on every result: at most {MAX_METADATA_BYTES} bytes as JSON "
        f"and {MAX_JSON_DEPTH} levels of nested objects and arrays (the metadata object is level 1).",
        json_schema_extra={"x-max-bytes": MAX_METADATA_BYTES, "x-max-depth": MAX_JSON_DEPTH})
    submitted_at: datetime | None = None
    replay_of: Text | None = Field(
        default=None,
        description="Set by `imgstream replay`: where the original request was read (topic/partition/offset).",
    )

    @field_validator("tasks")
    @classmethod
    def _unique_operation_ids(cls, tasks: list[Task]) -> list[Task]:
        seen: set[str] = set()
        for task in tasks:
            if task.operation_id in seen:
                raise ValueError(f"duplicate operation_id {task.operation_id!r}")
            seen.add(task.operation_id)
        return tasks

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        # Every result carries it: metadata the encoder refuses would leave the request unanswerable.
        if metadata is not None:
            check_json_value(metadata, "metadata", MAX_METADATA_BYTES)
        return metadata


class ImageInfo(BaseModel):
    """What the worker saw of the image: where it came from and its displayed size."""

    url: str | None = None
    blob: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None


class ModelInfo(BaseModel):
    """Which model and which weights produced a result."""

    name: str
    weights: str
    dim: int | None = None


def make_event_id(request_id: str, operation_id: str) -> str:
    """The deterministic id of the one result for (request_id, operation_id)."""
    return f"{request_id}/{operation_id}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ResultEvent(BaseModel):
    """One result per (request_id, operation_id) (SPEC §3)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str
    request_id: str
    operation_id: str
    type: str
    status: Status
    data: Any = None
    region: str | None = Field(default=None, description="The image region actually used (after fallbacks).")
    cropped_image_bbox: list[int] | None = None
    cropped_image_base64: str | None = None
    cropped_image_ref: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    image: ImageInfo | None = None
    model: ModelInfo | None = None
    normalized: bool | None = Field(default=None, description="Embedding results: whether `data` is the "
                                    "L2-normalised vector (the task's `normalize`); null for other results.")
    metadata: dict[str, Any] | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    replayed: bool = False
    reused: bool = Field(default=False, description="True when the result was not computed for this request "
                         "but taken from identical work on the same image bytes (in flight or recently "
                         "finished); timings_ms.compute is then 0.")
    completed_at: datetime = Field(default_factory=utc_now)

    @field_serializer("data", when_used="json")
    def _data_as_json(self, data: Any) -> Any:
        # In process an embedding is a numpy array (the codec writes it without a Python float
        # per value); pydantic's own JSON output takes it as a list.
        return data.tolist() if hasattr(data, "tolist") else data


class DeadLetter(BaseModel):
    """Why an event went to the DLQ; travels as headers beside the original bytes."""

    reason: str
    error_code: Literal["not_json", "schema_violation", "not_utf8"] | str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at: datetime = Field(default_factory=utc_now)

    HEADER_PREFIX: ClassVar[str] = "imgstream."

    def headers(self) -> list[tuple[str, bytes]]:
        p = self.HEADER_PREFIX
        # backslashreplace: a reason quoting text UTF-8 cannot encode must not stop the dead letter itself
        return [
            (p + "reason", self.reason.encode("utf-8", "backslashreplace")),
            (p + "error_code", self.error_code.encode("utf-8", "backslashreplace")),
            (p + "source_topic", self.source_topic.encode()),
            (p + "source_partition", str(self.source_partition).encode()),
            (p + "source_offset", str(self.source_offset).encode()),
            (p + "failed_at", self.failed_at.isoformat().encode()),
        ]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | tuple) -> DeadLetter:
        p = cls.HEADER_PREFIX
        values = {k[len(p):]: v.decode() for k, v in headers if k.startswith(p)}
        return cls.model_validate(values)


class DeferredRetry(BaseModel):
    """When and why a request on the retry topic is tried again; travels as headers beside the original bytes."""

    attempt: int = Field(ge=2, description="The attempt this record is for; the request's first delivery was 1.")
    due_at: datetime = Field(description="Not tried before this time (UTC).")
    first_failure: str = Field(description="Why the first attempt's fetch failed.")
    first_failed_at: datetime
    last_failure: str = Field(description="Why the previous attempt's fetch failed.")
    source_topic: str = Field(description="Where the request was first read (the requests or the replay topic).")

    HEADER_PREFIX: ClassVar[str] = "imgstream."
    # A failure's text travels in a header; a hostile host's error page must not grow the record.
    MAX_REASON_CHARS: ClassVar[int] = 1000

    @field_validator("first_failure", "last_failure")
    @classmethod
    def _cut(cls, reason: str) -> str:
        limit = cls.MAX_REASON_CHARS
        return reason if len(reason) <= limit else reason[: limit - 3] + "..."

    def headers(self) -> list[tuple[str, bytes]]:
        p = self.HEADER_PREFIX
        return [
            (p + "attempt", str(self.attempt).encode()),
            (p + "due_at", self.due_at.isoformat().encode()),
            (p + "first_failure", self.first_failure.encode()),
            (p + "first_failed_at", self.first_failed_at.isoformat().encode()),
            (p + "last_failure", self.last_failure.encode()),
            (p + "source_topic", self.source_topic.encode()),
        ]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | tuple) -> DeferredRetry:
        """Raises pydantic's ValidationError (a ValueError) when a header is missing or invalid."""
        p = cls.HEADER_PREFIX
        values = {k[len(p):]: v.decode(errors="replace") for k, v in headers if k.startswith(p)}
        return cls.model_validate(values)
