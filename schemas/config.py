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

from pydantic import BaseModel, Field, PositiveFloat, ValidationError, ValidationInfo, field_validator, model_validator

ENV_PREFIX = "IMGSTREAM_"
DAY_MS = 24 * 3600 * 1000


class Topics(BaseModel):
    requests: str = Field(default="imgstream.requests", description="Topic crawlers and `submit` publish requests to. "
                          "Change all five names to run two deployments on one cluster.")
    replay: str = Field(default="imgstream.replay", description="Topic `imgstream replay` publishes to; workers "
                        "read it beside the requests topic.")
    results: str = Field(default="imgstream.results", description="Topic workers publish one result per task to; the sink "
                         "and `submit --wait` read it.")
    dlq: str = Field(default="imgstream.dlq", description="Topic for events that are not valid requests (and requests "
                     "whose results the broker refused); watch its rate.")
    retry: str = Field(default="imgstream.retry", description="Topic of deferred fetch retries: requests whose image "
                       "host failed transiently wait here until they are due; workers read it in a lane of its own.")


CompressionType = Literal["producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"]


class TopicSettings(BaseModel):
    """How `imgstream topics create` makes one topic; a topic that exists already is left as it is."""

    partitions: int = Field(default=12, ge=1, description="Partitions: the most workers (or sinks) that can share "
                            "the topic's load. Set before the first event: adding partitions later moves keys.")
    retention_ms: int = Field(default=7 * DAY_MS, ge=-1, description="`retention.ms`: how long records are kept "
                              "(-1: forever). Longer on requests widens what `imgstream replay` can reprocess; "
                              "on results, how far back a new sink can rebuild its tables.")
    compression_type: CompressionType = Field(default="producer", description="`compression.type`: `producer` "
                                              "keeps what producers send; a codec makes the broker store that "
                                              "(zstd suits results, whose float text compresses about 2x).")
    max_message_bytes: int | None = Field(default=None, ge=1, description="`max.message.bytes`; unset: "
                                          "`kafka.max_message_bytes`. Set it only together with that setting.")


# Why each topic differs from the TopicSettings defaults: docs/DEPLOY.md "Topics".
_TOPIC_DEFAULTS: dict[str, dict[str, Any]] = {
    "requests": {},  # the replay horizon: `imgstream replay` can only reach back this far
    "replay": {"retention_ms": 3 * DAY_MS},  # consumed soon after it is written
    "results": {"compression_type": "zstd"},  # embeddings as JSON text: zstd stores about 40% of the bytes
    "dlq": {"partitions": 1, "retention_ms": 30 * DAY_MS},  # few records, read by people, later
    "retry": {},  # must outlive the longest deferral (checked) and an outage of the workers, like requests
}


def _with_role_defaults(role: str, given: Any) -> Any:
    """`given` (a partial dict from env or flags) on top of `role`'s defaults."""
    if isinstance(given, Mapping):
        return {**_TOPIC_DEFAULTS[role], **given}
    return given


class TopicSettingsByTopic(BaseModel):
    """`TopicSettings` for each of the five topics (keyed like `Topics`)."""

    requests: TopicSettings = Field(default_factory=lambda: TopicSettings(**_TOPIC_DEFAULTS["requests"]))
    replay: TopicSettings = Field(default_factory=lambda: TopicSettings(**_TOPIC_DEFAULTS["replay"]))
    results: TopicSettings = Field(default_factory=lambda: TopicSettings(**_TOPIC_DEFAULTS["results"]))
    dlq: TopicSettings = Field(default_factory=lambda: TopicSettings(**_TOPIC_DEFAULTS["dlq"]))
    retry: TopicSettings = Field(default_factory=lambda: TopicSettings(**_TOPIC_DEFAULTS["retry"]))

    @field_validator("requests", "replay", "results", "dlq", "retry", mode="before")
    @classmethod
    def _role_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        return _with_role_defaults(info.field_name, value)


class KafkaConfig(BaseModel):
    bootstrap: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]. "
                           "Set it in every deployment; list two or three brokers so a start survives one down.")
    group: str = Field(default="imgstream-workers", description="The workers' consumer group; every worker of one "
                       "deployment shares it. A second group would process every request again.")
    client_id: str = Field(default="imgstream", description="Prefix of the Kafka client ids (broker logs, "
                           "quotas). Change it when the cluster's quotas or logs must tell deployments apart.")
    topics: Topics = Field(default_factory=Topics)
    topic_settings: TopicSettingsByTopic = Field(default_factory=TopicSettingsByTopic)
    max_message_bytes: int = Field(
        default=1_000_000, description="Results are kept under this size (Apache Kafka's default message limit). "
        "Raise it only with the broker's and the results topic's limit."
    )
    session_timeout_ms: int = Field(default=10_000, description="A worker that sends no heartbeat this long is "
                                    "dropped from the group. Raise it on networks with long pauses.")
    max_poll_interval_ms: int = Field(default=300_000, description="Kafka's bound between two polls of one "
                                      "worker; the worker keeps polling while paused, so it rarely needs changing.")
    fetch_max_wait_ms: int = Field(default=100, ge=0, description="How long the broker may hold an empty fetch. "
                                   "Apache Kafka answers as soon as records arrive, so on Kafka this only sets how "
                                   "often a worker with nothing to fetch asks again: each empty fetch costs the "
                                   "worker and the broker CPU (on 2 cores a detection backlog took 11% longer at "
                                   "20 ms than at 250). The embedded broker sometimes holds a fetch for the whole "
                                   "wait, so there it adds latency at light load (measured p50/p99: 29/35 ms at 20, "
                                   "31/36 at 100, 31/110 at 250).")

    @model_validator(mode="after")
    def _results_topic_takes_results(self) -> KafkaConfig:
        limit = self.topic_settings.results.max_message_bytes
        if limit is not None and limit < self.max_message_bytes:
            raise ValueError(f"kafka.topic_settings.results.max_message_bytes ({limit}) is below "
                             f"kafka.max_message_bytes ({self.max_message_bytes}): the results topic would refuse "
                             "results the worker is allowed to publish")
        return self


class FetchConfig(BaseModel):
    total_timeout_s: float = Field(default=20.0, gt=0, description="Deadline for one fetch, retries included. "
                                   "Raise it for slow image hosts.")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Deadline for the TCP and TLS connect. "
                                     "Lower it when dead hosts hold fetch slots; raise it for far-away hosts.")
    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="Larger images are `image_too_large`. "
                           "Raise it for very large originals; it is also a worker's memory per fetch.")
    max_redirects: int = Field(default=5, ge=0, description="Redirects followed per fetch (more is "
                               "`image_fetch_failed`). Rarely worth changing.")
    retries: int = Field(default=2, ge=0, description="Retries within one fetch for timeouts, connection errors, "
                         "5xx, 408 and 429. Lower it when a failing host should cost less; other 4xx are never "
                         "retried.")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; it doubles per retry. "
                            "Raise it for hosts that answer 429 (rate limits).")
    allow_private_addresses: bool = Field(
        default=False,
        description="Allow URLs that resolve to loopback, private, link-local or metadata addresses. Only for "
        "images on an internal store the workers must reach (and tests): it lets requests probe your network.",
    )
    user_agent: str = Field(default="imgstream/0.1", description="User-Agent of image fetches; image hosts may "
                            "ask for a contact address in it.")
    blob_roots: list[str] | None = Field(
        default=None,
        description="Directories that file:// blob references may point into (symlinks resolved). Unset: the "
        "blob store directory (blobs.dir). An empty list refuses every file:// reference.",
    )
    max_concurrent: int = Field(default=32, gt=0, description="Image requests (and blob reads) at once per "
                                "worker, all hosts together. Raise it for slow image hosts (high fetch latency "
                                "while the models idle).")
    per_host_concurrent: int = Field(default=4, gt=0, description="Fetches at once to one host (scheme, name and "
                                     "port) per worker; more wait within the fetch deadline. Raise it only for "
                                     "hosts you run (a CDN of your own, an internal store).")
    deferred_attempts: int = Field(default=4, ge=1, description="Attempts a request gets when its fetch keeps "
                                   "failing transiently (the first included): all but the last failure send it to "
                                   "the retry topic (kafka.topics.retry) to be tried again later; the last is "
                                   "its final image_fetch_failed. 1: no deferred retries.")
    deferred_delays_s: list[PositiveFloat] = Field(default_factory=lambda: [60.0, 300.0, 1800.0], min_length=1,
                                           description="Seconds from a transient failure to the next attempt, one "
                                           "per deferral (the last repeats). A host's longer Retry-After wins. The "
                                           "retry topic's retention must be longer than the longest.")
    s3_buckets: list[str] | None = Field(
        default=None,
        description="What s3:// blob references may point into: `bucket` or `bucket/prefix` entries. Unset: the "
        "blob store's own bucket and prefix when blobs.dir is s3://, nothing otherwise. An empty list refuses "
        "every s3:// reference.",
    )

    @field_validator("s3_buckets")
    @classmethod
    def _bucket_entries(cls, entries: list[str] | None) -> list[str] | None:
        for entry in entries or []:
            if not entry.strip("/") or entry.startswith(("s3://", "/")):
                raise ValueError(f"s3_buckets entry {entry!r} is not `bucket` or `bucket/prefix`")
        return entries

    def deferred_delay_s(self, attempt: int) -> float:
        """Seconds between attempt `attempt` (1: the first delivery) failing and the next attempt."""
        return self.deferred_delays_s[min(attempt, len(self.deferred_delays_s)) - 1]


class DecodeConfig(BaseModel):
    max_pixels: int = Field(default=40_000_000, gt=0, description="Larger images are refused (decompression "
                            "bombs). A decoded pixel costs 3 bytes of the in-flight image bound.")


class BatchConfig(BaseModel):
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Items per model call at most. Unset: the model's default for its device "
        "(GPU: clip 256, dino 128, caption 64, face 32, person 8, decode 128; CPU: clip 32, dino 16, caption 4, "
        "face 4, person 1: on a CPU a padded Faster R-CNN batch is slower than one image at a time).")
    max_wait_ms: float = Field(default=5.0, ge=0, description="A ceiling, not a tax: a free device starts a "
                               "batch at once, and holds a small one back at most this long, only while more "
                               "images are being decoded.")
    max_queue: int = Field(default=1024, ge=1, description="Items that may wait for this model; "
                           "beyond it callers wait. Rarely worth changing: max_in_flight bounds the work first.")


def _default_batching() -> dict[str, BatchConfig]:
    # Sizes default per device (analysis.batcher.DEFAULT_MAX_BATCH); captions wait a little longer.
    return {key: BatchConfig(max_wait_ms=10 if key == "caption" else 5)
            for key in ("clip", "dino", "person", "face", "caption", "decode")}


class ModelsConfig(BaseModel):
    weights: Literal["pretrained", "random"] = Field(
        default="pretrained", description="pretrained: the real weights; random: the same architectures with "
        "seeded random weights (tests, machines without the weights).")
    seed: int = Field(default=0, description="Seed of the random weights (with "
                      "weights=random only; results of other seeds never share a reuse entry).")
    device: str = Field(default="auto", description="auto (every GPU when there are any, else the CPU), cpu, "
                        "cuda (every visible GPU: a model replica on each, every batch to the least busy), cuda:N "
                        "(that one), or a list such as cuda:0,cuda:2.")
    require_gpu: bool = Field(default=False, description="Refuse to start when no GPU is available. Set it on GPU "
                             "workers: a host whose GPU is missing then fails at once instead of crawling on the CPU.")
    fp16: bool = Field(default=True, description="Half precision on CUDA where it is numerically safe (CLIP, "
                      "DINOv2, captions; detectors stay fp32). Turn off to compare with fp32 results.")
    jpeg_decoder: Literal["auto", "device", "cpu"] = Field(
        default="auto", description="Where JPEGs are decoded. auto: on the GPU (nvJPEG, in batches across "
        "requests) when the models run on CUDA, else on CPU threads with Pillow; device: torchvision's decoder "
        "on the models' device, also on a CPU (it checks the GPU path there); cpu: always Pillow. Other formats, "
        "and files the device decoder refuses, are decoded by Pillow.")
    warmup: bool = Field(default=True, description="Run each model once at start-up, before the worker reports "
                         "ready, so the first requests do not pay for lazy initialisation.")
    reuse: bool = Field(default=True, description="Share work across requests for the same image bytes: one "
                        "decode and one model run for identical work in flight, and recent outcomes kept (see "
                        "reuse_cache_bytes). Results taken from shared work say \"reused\": true.")
    reuse_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0, description="Memory for recent outcomes "
                                   "(embeddings, detections, captions, crop PNGs), least recently used out first; "
                                   "0 keeps none (identical work in flight is still shared).")
    clip_weights_path: str | None = Field(default=None, description="Local open_clip checkpoint for CLIP, "
                                             "for hosts that cannot download weights.")
    dino_model: str = Field(default="facebook/dinov2-base", description="Hugging Face id or local directory (a "
                            "local copy for hosts without hub access).")
    caption_model: str = Field(
        default="Salesforce/blip-image-captioning-base", description="Any image-to-text model: a Hugging Face id "
        "or a local directory."
    )
    person_weights_path: str | None = Field(default=None, description="Local Faster R-CNN state dict, for "
                                               "hosts that cannot download weights.")
    preload: list[str] = Field(
        default_factory=lambda: ["clip", "dino", "person", "face", "caption"],
        description="Models loaded at start-up; others load on first use. Leave out models a deployment never "
        "uses: they cost memory and start-up time.",
    )
    batching: dict[str, BatchConfig] = Field(default_factory=_default_batching)
    classifiers_dir: str = Field(default="trained_classifiers", description="Folder of classifier files and "
                                 "best_models.json; changes are picked up without a restart.")

    @field_validator("batching", mode="before")
    @classmethod
    def _batching_over_defaults(cls, value: Any) -> Any:
        # One knob from the environment (MODELS__BATCHING__CAPTION__MAX_BATCH_SIZE) keeps the model's other defaults.
        if not isinstance(value, Mapping):
            return value
        defaults = {name: config.model_dump() for name, config in _default_batching().items()}
        return {**defaults, **{name: {**defaults.get(name, {}), **given} if isinstance(given, Mapping) else given
                               for name, given in value.items()}}

    def batch(self, model: str) -> BatchConfig:
        return self.batching.get(model) or _default_batching().get(model) or BatchConfig()


class BlobConfig(BaseModel):
    dir: str = Field(
        default=".imgstream/blobs",
        description="Where `submit` puts local files (and workers put crops too large to inline): a directory "
        "(file:// references) or s3://bucket/prefix. Producers and workers must see the same store.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph, ...); unset: AWS. Credentials come "
        "from the usual AWS environment variables or config files.",
    )
    s3_region: str | None = Field(default=None, description="Region of the S3 bucket; unset: the AWS default chain.")


class SinkConfig(BaseModel):
    """`imgstream sink pgvector`: which database, which consumer group, how big a batch."""

    dsn: str | None = Field(
        default=None, description="PostgreSQL URI, e.g. postgresql://user:password@host:5432/db?sslmode=require; "
        "unset: the embedded server (pgserver) starts on data_dir, for development."
    )
    data_dir: str = Field(default=".imgstream/pgdata", description="Data directory of the embedded "
                          "PostgreSQL (development); `search` and `train-classifiers --data-dir` read the same.")
    group: str = Field(default="imgstream-sink", description="The sinks' consumer group; more sinks in it write "
                       "in parallel, one per few results partitions.")
    batch_max_records: int = Field(default=500, ge=1, description="Records per database transaction: larger "
                                   "batches write faster, smaller ones show results sooner.")
    batch_max_ms: float = Field(default=500.0, ge=0, description="A batch is written at the latest this many ms "
                                "after its first record. Lower it when results must be searchable sooner.")
    hnsw_m: int = Field(default=16, ge=2, le=100, description="HNSW graph degree of new embedding "
                        "tables (pgvector's default); higher: better recall, more memory, slower inserts.")
    hnsw_ef_construction: int = Field(
        default=64, ge=4, le=1000, description="HNSW build breadth of new embedding tables (higher: better recall, "
        "slower inserts).",
    )


RankMetric = Literal["average_precision", "f1", "precision", "recall"]


class TrainingConfig(BaseModel):
    """`imgstream train-classifiers`: how models are fitted, compared and kept."""

    keep_versions: int = Field(default=10, ge=1, description="Versions kept per collection (the best "
                               "ranked); raise it to keep more history to roll back to.")
    rank_metric: RankMetric = Field(default="average_precision",
                                    description="Held-out metric the bake-off ranks versions by. "
                                    "precision when false positives cost most, recall when misses do.")
    holdout_fraction: float = Field(
        default=0.2, ge=0.0, le=0.5,
        description="Share of each class held out from training, drawn from keys no stored version trained on. "
        "Lower it for small collections (more to train on), at the cost of a noisier bake-off.",
    )
    min_holdout_per_class: int = Field(
        default=5, ge=1, description="Positives and negatives the held-out set needs for a bake-off; fewer "
        "keeps the current model. Raise it for decisions that must rest on more evidence.",
    )
    min_examples_per_class: int = Field(
        default=5, ge=2, description="Positives and negatives with embeddings a collection needs to train "
        "(fewer: skipped). A classifier from fewer examples rarely generalises.",
    )
    c_grid: list[PositiveFloat] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1,
                                description="Inverse regularisation strengths tried by "
                                "cross-validation; widen it when the best C is at either end of the grid (see the "
                                "report).")
    cv_folds: int = Field(default=5, ge=2, description="Stratified folds for C and the threshold; "
                          "fewer for collections with few positives (each fold needs some).")
    target_precision: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Choose the threshold that reaches this out-of-fold precision (highest recall); "
        "unset: the threshold that maximises F1.",
    )
    seed: int = Field(default=42, description="Seed of the held-out split and the folds, so a run can be "
                      "repeated exactly.")


class WorkerConfig(BaseModel):
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    blobs: BlobConfig = Field(default_factory=BlobConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    max_in_flight: int = Field(default=64, ge=1, description="Requests being processed at once. Raise it when the "
                               "model batches stay small while lag grows (fetches are the wall); see DEPLOY.md "
                               "\"Sizing a worker\".")
    max_in_flight_image_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1,
        description="Fetched plus decoded (RGB) image bytes held by requests in flight. At the bound the "
        "worker pauses its partitions and starts no new fetch until requests finish. Size it to the worker's "
        "memory (DEPLOY.md \"Sizing a worker\").",
    )
    http_port: int | None = Field(default=None, description="Port of /healthz, /readyz, /operations, "
                                      "/metrics; unset: no HTTP server. Set it wherever Prometheus scrapes.")
    drain_timeout_s: float = Field(default=30.0, ge=0,
                                   description="On SIGTERM/SIGINT: time to finish the requests in flight. "
                                   "Keep it under the container's stop grace period (60 s in docker-compose.yml).")
    revoke_timeout_s: float = Field(
        default=10.0, ge=0,
        description="On a rebalance: time to finish the revoked partitions' requests before they are abandoned "
        "to the new owner (keep it under the group's rebalance timeout).",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO or WARNING. DEBUG logs a line per "
                           "request (costly above a few hundred requests/s); WARNING keeps only problems.")
    replay_share: float = Field(
        default=0.2, ge=0.0, le=1.0, description="While live requests wait, replayed ones (the replay topic) may "
        "hold at most this share of max_in_flight and of each model batch; with the live lane idle, replay may use "
        "everything. 0: replay runs only when live is idle.")
    report_interval_s: float = Field(default=30.0, ge=0, description="Seconds between the worker's summary log "
                                     "lines (throughput, results, lanes, reuse hit rate, batch sizes); 0: none.")

    def file_blob_roots(self) -> list[str]:
        """Where file:// references may point: fetch.blob_roots, else the blob store directory submit writes to."""
        if self.fetch.blob_roots is not None:
            return list(self.fetch.blob_roots)
        scheme, sep, rest = self.blobs.dir.partition("://")
        if not sep:
            return [self.blobs.dir]
        return [rest] if scheme == "file" else []  # an s3:// store leaves no local directory to allow

    def s3_blob_scopes(self) -> list[str]:
        """Where s3:// references may point (`bucket` or `bucket/prefix`): fetch.s3_buckets, else blobs.dir's own."""
        if self.fetch.s3_buckets is not None:
            return list(self.fetch.s3_buckets)
        scheme, sep, rest = self.blobs.dir.partition("://")
        return [rest.strip("/")] if sep and scheme == "s3" and rest.strip("/") else []

    @model_validator(mode="after")
    def _retry_topic_outlives_the_delays(self) -> WorkerConfig:
        retention_ms = self.kafka.topic_settings.retry.retention_ms
        fetch = self.fetch
        longest_s = max(fetch.deferred_delay_s(n) for n in range(1, fetch.deferred_attempts)) \
            if fetch.deferred_attempts > 1 else 0.0
        if retention_ms != -1 and retention_ms < longest_s * 1000:
            raise ValueError(f"kafka.topic_settings.retry.retention_ms ({retention_ms}) is shorter than the longest "
                             f"deferred delay ({longest_s:g} s, fetch.deferred_delays_s): deferred requests would "
                             "expire unanswered")
        return self


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


class ConfigError(ValueError):
    """A setting (a flag or an IMGSTREAM_* variable) that is not valid; the message names it."""


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Build the configuration from defaults, the environment and CLI overrides (in that order).

    Raises ConfigError naming each bad setting and its environment variable.
    """
    data = _merge(env_overrides(environ), overrides or {})
    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            path = [str(part) for part in error["loc"] if not isinstance(part, int)]
            problems.append(f"{'.'.join(path)} ({ENV_PREFIX}{'__'.join(path).upper()}): {error['msg']}")
        raise ConfigError("; ".join(problems)) from None
