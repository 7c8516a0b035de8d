"""imgstream's configuration: one typed object, read once.

Precedence: CLI flags (passed as overrides) > environment `IMGSTREAM_*` > defaults.
Nested fields use a double underscore: `IMGSTREAM_KAFKA__BOOTSTRAP=host:9092`,
`IMGSTREAM_MODELS__WEIGHTS=random`, `IMGSTREAM_FETCH__ALLOW_PRIVATE_ADDRESSES=true`.
This module is the only place that reads `os.environ`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Mapping

from pydantic import BaseModel, Field, PositiveFloat

ENV_PREFIX = "IMGSTREAM_"


class Topics(BaseModel):
    requests: str = "imgstream.requests"
    replay: str = "imgstream.replay"
    results: str = "imgstream.results"
    dlq: str = "imgstream.dlq"


class KafkaConfig(BaseModel):
    bootstrap: str = "127.0.0.1:9092"
    group: str = "imgstream-workers"
    client_id: str = "imgstream"
    topics: Topics = Field(default_factory=Topics)
    max_message_bytes: int = Field(
        default=1_000_000, description="Results are kept under this size (Apache Kafka's default message limit)."
    )
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000


class FetchConfig(BaseModel):
    total_timeout_s: float = Field(default=20.0, gt=0, description="Deadline for one fetch, retries included.")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_redirects: int = Field(default=5, ge=0)
    retries: int = Field(default=2, ge=0, description="Retries for timeouts, 5xx and 429.")
    backoff_s: float = Field(default=0.5, ge=0)
    allow_private_addresses: bool = Field(
        default=False,
        description="Allow URLs that resolve to loopback, private, link-local or metadata addresses.",
    )
    user_agent: str = "imgstream/0.1"
    blob_roots: list[str] | None = Field(
        default=None,
        description="Directories that file:// blob references may point into (symlinks resolved). Unset: the "
        "blob store directory (blobs.dir). An empty list refuses every file:// reference.",
    )
    max_concurrent: int = Field(default=32, gt=0)


class DecodeConfig(BaseModel):
    max_pixels: int = Field(default=40_000_000, gt=0)


class BatchConfig(BaseModel):
    max_batch_size: int = Field(default=16, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=1024, ge=1)


def _default_batching() -> dict[str, BatchConfig]:
    # Detection and captioning saturate at small batches, embeddings keep scaling (DESIGN "Batching").
    return {
        "clip": BatchConfig(max_batch_size=64, max_wait_ms=5),
        "dino": BatchConfig(max_batch_size=32, max_wait_ms=5),
        "person": BatchConfig(max_batch_size=8, max_wait_ms=5),
        "face": BatchConfig(max_batch_size=8, max_wait_ms=5),
        "caption": BatchConfig(max_batch_size=8, max_wait_ms=10),
    }


class ModelsConfig(BaseModel):
    weights: Literal["pretrained", "random"] = "pretrained"
    seed: int = 0
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    require_gpu: bool = Field(default=False, description="Refuse to start when no GPU is available.")
    fp16: bool = Field(default=True, description="Half precision on CUDA where it is numerically safe.")
    clip_weights_path: str | None = Field(default=None, description="Local open_clip checkpoint for CLIP.")
    dino_model: str = Field(default="facebook/dinov2-base", description="Hugging Face id or local directory.")
    caption_model: str = Field(
        default="Salesforce/blip-image-captioning-base", description="Hugging Face id or local directory."
    )
    person_weights_path: str | None = Field(default=None, description="Local Faster R-CNN state dict.")
    preload: list[str] = Field(
        default_factory=lambda: ["clip", "dino", "person", "face", "caption"],
        description="Models loaded at start-up; others load on first use.",
    )
    batching: dict[str, BatchConfig] = Field(default_factory=_default_batching)
    classifiers_dir: str = "trained_classifiers"

    def batch(self, model: str) -> BatchConfig:
        return self.batching.get(model) or _default_batching().get(model) or BatchConfig()


class BlobConfig(BaseModel):
    dir: str = Field(
        default=".imgstream/blobs",
        description="Where `submit` puts local files: a directory (file:// references) or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph, ...); unset: AWS. Credentials come "
        "from the usual AWS environment variables or config files.",
    )
    s3_region: str | None = None


class SinkConfig(BaseModel):
    """`imgstream sink pgvector`: which database, which consumer group, how big a batch."""

    dsn: str | None = Field(
        default=None, description="PostgreSQL URI; when unset the embedded server (pgserver) starts on data_dir."
    )
    data_dir: str = Field(default=".imgstream/pgdata", description="Data directory of the embedded PostgreSQL.")
    group: str = "imgstream-sink"
    batch_max_records: int = Field(default=500, ge=1, description="A batch is written at this many records,")
    batch_max_ms: float = Field(default=500.0, ge=0, description="or this many ms after its first record.")
    hnsw_m: int = Field(default=16, ge=2, le=100, description="HNSW graph degree of new embedding tables.")
    hnsw_ef_construction: int = Field(
        default=64, ge=4, le=1000, description="HNSW build breadth of new embedding tables (higher: better recall, "
        "slower inserts).",
    )


RankMetric = Literal["average_precision", "f1", "precision", "recall"]


class TrainingConfig(BaseModel):
    """`imgstream train-classifiers`: how models are fitted, compared and kept."""

    keep_versions: int = Field(default=10, ge=1, description="Versions kept per collection (the best ranked).")
    rank_metric: RankMetric = Field(default="average_precision",
                                    description="Held-out metric the bake-off ranks versions by.")
    holdout_fraction: float = Field(
        default=0.2, ge=0.0, le=0.5,
        description="Share of each class held out from training, drawn from keys no stored version trained on.",
    )
    min_holdout_per_class: int = Field(
        default=5, ge=1, description="Positives and negatives the held-out set needs for a bake-off.",
    )
    min_examples_per_class: int = Field(
        default=5, ge=2, description="Positives and negatives with embeddings a collection needs to train.",
    )
    c_grid: list[PositiveFloat] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1,
                                description="Inverse regularisation strengths tried by cross-validation.")
    cv_folds: int = Field(default=5, ge=2, description="Stratified folds for C and the threshold.")
    target_precision: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Choose the threshold that reaches this out-of-fold precision (highest recall); "
        "unset: the threshold that maximises F1.",
    )
    seed: int = 42


class WorkerConfig(BaseModel):
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    blobs: BlobConfig = Field(default_factory=BlobConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    max_in_flight: int = Field(default=64, ge=1, description="Requests being processed at once.")
    max_in_flight_image_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1,
        description="Fetched plus decoded (RGB) image bytes held by requests in flight. At the bound the "
        "worker pauses its partitions and starts no new fetch until requests finish.",
    )
    http_port: int | None = Field(default=None, description="Port of /healthz, /readyz, /operations, /metrics.")
    drain_timeout_s: float = Field(default=30.0, ge=0,
                                   description="On SIGTERM/SIGINT: time to finish the requests in flight.")
    revoke_timeout_s: float = Field(
        default=10.0, ge=0,
        description="On a rebalance: time to finish the revoked partitions' requests before they are abandoned "
        "to the new owner (keep it under the group's rebalance timeout).",
    )
    log_level: str = "INFO"

    def file_blob_roots(self) -> list[str]:
        """Where file:// references may point: fetch.blob_roots, else the blob store directory submit writes to."""
        if self.fetch.blob_roots is not None:
            return list(self.fetch.blob_roots)
        scheme, sep, rest = self.blobs.dir.partition("://")
        if not sep:
            return [self.blobs.dir]
        return [rest] if scheme == "file" else []  # an s3:// store leaves no local directory to allow


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`; None in `override` means "not given" at any depth."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping):
            out[key] = _merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        elif value is not None:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `IMGSTREAM_*` variables as a nested dict (`A__B` -> {"a": {"b": ...}})."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
            if path:
                _set_path(data, path, _parse_env_value(raw))
    return data


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Build the configuration from defaults, the environment and CLI overrides (in that order)."""
    data = _merge(env_overrides(environ), overrides or {})
    return WorkerConfig.model_validate(data)
