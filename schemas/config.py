"""imgstream's configuration: one typed object, read once.

Precedence: CLI flags (passed as overrides) > environment `IMGSTREAM_*` > defaults.
Nested fields use a double underscore: `IMGSTREAM_KAFKA__BOOTSTRAP=host:9092`,
`IMGSTREAM_MODELS__WEIGHTS=random`, `IMGSTREAM_FETCH__ALLOW_PRIVATE_ADDRESSES=true`.
This module is the only place that reads `os.environ`.
"""

from __future__ import annotations

import difflib
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_PREFIX = "IMGSTREAM_"
# `IMGSTREAM_KAFKA__SASL_PASSWORD_FILE=/run/secrets/kafka`: a secret read from a file (container secrets).
FILE_SUFFIX = "_FILE"
DAY_MS = 24 * 3600 * 1000


class Settings(BaseModel):
    """Base of every configuration model: a key it does not know is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Topics(Settings):
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


class TopicSettings(Settings):
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


class TopicSettingsByTopic(Settings):
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


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
# Where file:// blobs are read (fetch.blob_reads; consumer/blob_readers.py).
BlobReads = Literal["auto", "inline", "thread"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


class OAuthConfig(Settings):
    """Where OAUTHBEARER tokens come from (`kafka.sasl_mechanism=OAUTHBEARER`)."""

    provider: Literal["oidc", "aws_msk_iam"] | None = Field(
        default=None, description="oidc: the client-credentials grant of an OpenID Connect provider (Confluent "
        "Cloud, Keycloak, Okta, Azure AD...); aws_msk_iam: Amazon MSK IAM, signed with the AWS credentials of the "
        "host (needs `pip install 'imgstream[msk]'`). Required with OAUTHBEARER.")
    token_endpoint_url: str | None = Field(default=None, description="oidc: the provider's token endpoint "
                                           "(https://.../oauth2/token).")
    client_id: str | None = Field(default=None, description="oidc: the client id the cluster knows this "
                                  "deployment by.")
    client_secret: SecretStr | None = Field(default=None, description="oidc: the client secret (a secret: also "
                                            "read from the file named by IMGSTREAM_KAFKA__OAUTH__CLIENT_SECRET_FILE).")
    scope: str | None = Field(default=None, description="oidc: space-separated scopes to ask for, if the "
                              "provider needs them.")
    extensions: dict[str, str] = Field(default_factory=dict, description="SASL extensions sent with the token "
                                       "(Confluent Cloud: logicalCluster and identityPoolId).")
    aws_region: str | None = Field(default=None, description="aws_msk_iam: the cluster's region; unset: the AWS "
                                   "default chain (AWS_REGION).")
    refresh_margin_s: float = Field(default=60.0, ge=0, description="A token is renewed this long before it "
                                    "expires. Raise it when token endpoints are slow.")


class ProducerSettings(Settings):
    """Producer tuning; each field is the aiokafka argument of the same name (one line adds the next)."""

    acks: Literal["all", 1, 0] = Field(default="all", description="all: a record counts as sent once every "
                                           "in-sync replica has it (results are committed only then). Do not lower "
                                           "it: a lost result is never sent again.")
    enable_idempotence: bool | Literal["auto"] = Field(
        default="auto", description="Idempotent producer (no duplicates from the producer's own retries). auto: on "
        "where the broker supports it (the embedded broker does not), with a log line when it is off.")
    compression_type: Compression = Field(default="zstd", description="Codec of produced batches; zstd matches "
                                          "the results topic's compression.type, so the broker stores them as sent. "
                                          "none for brokers older than Kafka 2.1.")
    linger_ms: int = Field(default=5, ge=0, description="How long a batch waits for more records. Raise it "
                           "(10-50) for fewer, larger produce requests at high rates.")


class ConsumerSettings(Settings):
    """Consumer tuning; each field is the aiokafka argument of the same name (one line adds the next)."""

    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a group without a committed offset starts: earliest processes "
        "what is already on the topic; latest only what comes after the first start.")
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        default="read_committed", description="read_committed skips records of aborted transactions (crawlers "
        "that produce transactionally); the same as read_uncommitted for everyone else.")


class KafkaConfig(Settings):
    bootstrap: str = Field(default="127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]. "
                           "Set it in every deployment; list two or three brokers so a start survives one down.")
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (a login over TLS: "
        "Confluent Cloud, MSK, Aiven...). docs/DEPLOY.md \"Connecting to a secured cluster\" has recipes.")
    sasl_mechanism: SaslMechanism = Field(default="PLAIN", description="With SASL_*: PLAIN (API keys), "
                                          "SCRAM-SHA-256, SCRAM-SHA-512, or OAUTHBEARER (see kafka.oauth).")
    sasl_username: str | None = Field(default=None, description="SASL user (PLAIN, SCRAM); the API key on "
                                      "Confluent Cloud.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (a secret: also read from "
                                            "the file named by IMGSTREAM_KAFKA__SASL_PASSWORD_FILE).")
    sasl_plain_over_plaintext: bool = Field(default=False, description="Allow PLAIN over SASL_PLAINTEXT, which "
                                            "sends the password unencrypted. Only on a network you trust.")
    ssl_cafile: str | None = Field(default=None, description="CA bundle (PEM) that signed the brokers' "
                                   "certificates; unset: the system's trusted CAs.")
    ssl_certfile: str | None = Field(default=None, description="Client certificate (PEM) for mutual TLS "
                                     "(Aiven, MSK with TLS auth).")
    ssl_keyfile: str | None = Field(default=None, description="Private key (PEM) of ssl_certfile.")
    ssl_key_password: SecretStr | None = Field(default=None, description="Password of an encrypted ssl_keyfile "
                                               "(a secret: also IMGSTREAM_KAFKA__SSL_KEY_PASSWORD_FILE).")
    ssl_check_hostname: bool = Field(default=True, description="Check that the broker's certificate names the "
                                     "host connected to. Turn off only for brokers reached by an address their "
                                     "certificate does not list.")
    oauth: OAuthConfig = Field(default_factory=OAuthConfig)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    group: str = Field(default="imgstream-workers", description="The workers' consumer group; every worker of one "
                       "deployment shares it. A second group would process every request again.")
    client_id: str = Field(default="imgstream", description="Prefix of the Kafka client ids (broker logs, "
                           "quotas, ACLs by client). Change it when the cluster's quotas or logs must tell "
                           "deployments apart.")
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
    request_timeout_ms: int = Field(default=30_000, ge=1000, description="How long a client waits for one broker "
                                    "answer (and a connection); a group member waits at least its rebalance "
                                    "timeout plus 5 s. Raise it for brokers far away.")

    @model_validator(mode="after")
    def _results_topic_takes_results(self) -> KafkaConfig:
        limit = self.topic_settings.results.max_message_bytes
        if limit is not None and limit < self.max_message_bytes:
            raise ValueError(f"kafka.topic_settings.results.max_message_bytes ({limit}) is below "
                             f"kafka.max_message_bytes ({self.max_message_bytes}): the results topic would refuse "
                             "results the worker is allowed to publish")
        return self

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaConfig:
        """Settings that cannot work together are refused before anything connects."""
        sasl = self.security_protocol.startswith("SASL_")
        tls = self.security_protocol.endswith("SSL")
        if not tls:
            given = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password")
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"kafka.{given[0]} is set but kafka.security_protocol is "
                                 f"{self.security_protocol}: use SSL or SASL_SSL for a TLS connection")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("kafka.ssl_keyfile is set without kafka.ssl_certfile (the client certificate)")
        if not sasl:
            if self.sasl_username is not None or self.sasl_password is not None:
                raise ValueError(f"kafka.sasl_username/sasl_password are set but kafka.security_protocol is "
                                 f"{self.security_protocol}: use SASL_SSL (or SASL_PLAINTEXT)")
            return self
        if self.sasl_mechanism == "OAUTHBEARER":
            if self.oauth.provider is None:
                raise ValueError("kafka.sasl_mechanism is OAUTHBEARER but kafka.oauth.provider is unset: "
                                 "oidc or aws_msk_iam")
            if self.oauth.provider == "oidc":
                missing = [n for n in ("token_endpoint_url", "client_id", "client_secret")
                           if getattr(self.oauth, n) is None]
                if missing:
                    raise ValueError(f"kafka.oauth.provider is oidc but kafka.oauth.{missing[0]} is unset")
            return self
        if self.sasl_username is None or self.sasl_password is None:
            which = "sasl_username" if self.sasl_username is None else "sasl_password"
            raise ValueError(f"kafka.security_protocol is {self.security_protocol} with {self.sasl_mechanism} but "
                             f"kafka.{which} is unset")
        if self.sasl_mechanism == "PLAIN" and not tls and not self.sasl_plain_over_plaintext:
            raise ValueError("kafka.sasl_mechanism PLAIN over SASL_PLAINTEXT would send the password unencrypted: "
                             "use SASL_SSL, or set kafka.sasl_plain_over_plaintext=true on a network you trust")
        return self


class FetchConfig(Settings):
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
    blob_reads: BlobReads = Field(
        default="auto",
        description="Where file:// blobs are read. thread: in a thread pool, for storage that can stall (NFS, "
        "FUSE). inline: files up to 1 MiB on the event loop itself (tens of microseconds, against 100 or more "
        "for the hop to a thread), larger ones in the pool. auto: inline when every blob root lies on a local "
        "file system (/proc/self/mountinfo), thread otherwise.",
    )
    max_concurrent: int = Field(default=32, gt=0, description="Image requests (and blob reads in the thread "
                                "pool) at once per worker, all hosts together. Raise it for slow image hosts (high "
                                "fetch latency while the models idle).")
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


class DecodeConfig(Settings):
    max_pixels: int = Field(default=40_000_000, gt=0, description="Larger images are refused (decompression "
                            "bombs). A decoded pixel costs 3 bytes of the in-flight image bound.")


class BatchConfig(Settings):
    max_batch_size: int | None = Field(
        default=None, ge=1, description="Items per model call at most. Unset: the model's default for its device "
        "(GPU: clip 256, dino 128, caption 64, face 32, person 8, decode 128; CPU: clip 32, dino 16, caption 4, "
        "face 4, person 1: on a CPU a padded Faster R-CNN batch is slower than one image at a time).")
    max_wait_ms: float = Field(default=5.0, ge=0, description="A ceiling, not a tax: a free device starts a "
                               "batch at once, and holds a small one back at most this long, only while more "
                               "images are being decoded.")
    max_queue: int = Field(default=1024, ge=1, description="Items that may wait for this model; "
                           "beyond it callers wait. Rarely worth changing: max_in_flight bounds the work first.")


BATCHED_MODELS = ("clip", "dino", "person", "face", "caption", "decode")


def _default_batching() -> dict[str, BatchConfig]:
    # Sizes default per device (analysis.batcher.DEFAULT_MAX_BATCH); captions wait a little longer.
    return {key: BatchConfig(max_wait_ms=10 if key == "caption" else 5) for key in BATCHED_MODELS}


class ModelsConfig(Settings):
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
        unknown = sorted(set(value) - set(BATCHED_MODELS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], BATCHED_MODELS, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the models are {', '.join(BATCHED_MODELS)}"
            raise ValueError(f"{unknown[0]} is not a batched model; {hint}")
        defaults = {name: config.model_dump() for name, config in _default_batching().items()}
        return {**defaults, **{name: {**defaults.get(name, {}), **given} if isinstance(given, Mapping) else given
                               for name, given in value.items()}}

    def batch(self, model: str) -> BatchConfig:
        return self.batching.get(model) or _default_batching().get(model) or BatchConfig()


class BlobConfig(Settings):
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


class SinkConfig(Settings):
    """`imgstream sink pgvector`: which database, which consumer group, how big a batch."""

    dsn: SecretStr | None = Field(
        default=None, description="PostgreSQL URI, e.g. postgresql://user:password@host:5432/db?sslmode=require "
        "(a secret: it holds the password; also read from the file named by IMGSTREAM_SINK__DSN_FILE); unset: the "
        "embedded server (pgserver) starts on data_dir, for development."
    )
    def database_uri(self) -> str | None:
        """The DSN as text, for the database driver only (never for a log line)."""
        return self.dsn.get_secret_value() if self.dsn is not None else None

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
    db_backoff_max_s: float = Field(default=10.0, gt=0, description="While the database is unreachable the "
                                    "sink retries with backoff from 0.5 s, doubling up to this. Lower it to write "
                                    "sooner after a failover; each try is one connection attempt.")
    db_give_up_s: float | None = Field(default=None, gt=0, description="Exit 1 once the database has been "
                                       "unreachable this long. Unset: retry for as long as it takes (offsets wait, "
                                       "nothing is lost); set it where a supervisor should restart the sink instead.")
    http_port: int | None = Field(default=None, ge=0, le=65535, description="Port of the sink's /healthz, "
                                  "/readyz and /metrics; unset: no HTTP server. Set it wherever Prometheus "
                                  "scrapes or an orchestrator probes.")
    http_host: str = Field(default="127.0.0.1", description="Address the sink's HTTP port binds to: loopback "
                           "by default; 0.0.0.0 (all IPv4 interfaces) or :: where Prometheus scrapes from another "
                           "host or container (the images set 0.0.0.0).")


RankMetric = Literal["average_precision", "f1", "precision", "recall"]


class TrainingConfig(Settings):
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
    near_duplicate_distance: int | None = Field(
        default=8, ge=0, le=32,
        description="Two labelled images whose perceptual hashes (64-bit pHash, the smaller of as-is and "
        "mirrored) differ in at most this many bits are copies: folds and the held-out set keep them on one "
        "side. null: copies by identical bytes (SHA-256) only.",
    )
    prune_grace_s: float = Field(
        default=3600.0, ge=0,
        description="A pruned version's model file stays readable this long after the index stopped "
        "naming it (deleted by the first run after that), so workers that read an older index still serve it.",
    )


class WorkerConfig(Settings):
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
    processes: int = Field(default=1, ge=1, le=64, description="Worker processes of the group on this host, "
                           "each with its own event loop, models and HTTP port (http_port + i). Raise it when one "
                           "process's event loop is the limit (its CPU near 100% while the devices idle); on GPUs "
                           "run the CUDA MPS daemon so the processes share each GPU (docs/DEPLOY.md).")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto", description="The event loop: uvloop (libuv; less of the event loop's CPU per request, "
        "docs/BENCHMARKS.md) or Python's own asyncio loop; auto takes uvloop where it is "
        "installed (the worker extra installs it on Linux and macOS).")
    http_port: int | None = Field(default=None, description="Port of /healthz, /readyz, /operations, "
                                      "/metrics; unset: no HTTP server. Set it wherever Prometheus scrapes.")
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP port binds to: loopback by "
                           "default; 0.0.0.0 (all IPv4 interfaces) or :: where Prometheus scrapes from another host "
                           "or container (the images set 0.0.0.0).")
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
    log_format: Literal["text", "json"] = Field(
        default="text", description="text: one readable line per event; json: one JSON object per line (time, level, "
        "logger, message, request_id, and trace_id and span_id while tracing) for a log pipeline.")
    tracing: bool = Field(
        default=False, description="on: OpenTelemetry spans of every request (worker), batch (sink) and submit go "
        "out over OTLP/HTTP as the standard OTEL_* variables say (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, "
        "OTEL_TRACES_SAMPLER, ...); needs the otel extra. off: no tracing work at all; a request's own traceparent "
        "still travels on to its results.")
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


class ConfigError(ValueError):
    """A setting (a flag or an IMGSTREAM_* variable) that is not valid; the message names it."""


def env_name(path: list[str] | tuple[str, ...]) -> str:
    """The environment variable of a setting path: ("kafka", "bootstrap") -> IMGSTREAM_KAFKA__BOOTSTRAP."""
    return ENV_PREFIX + "__".join(part.upper() for part in path)


def _field_at(path: list[str]) -> Any:
    """The pydantic field at `path` of WorkerConfig, or None where the path leads nowhere.

    A key of a mapping of sections (models.batching.<model>) leads to that section's fields.
    """
    model: Any = WorkerConfig
    field = None
    for part in path:
        if typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = field.annotation
    return field


def _is_section(path: list[str]) -> bool:
    """Whether `path` is a group of settings (a model), not one setting."""
    if not path:
        return True
    field = _field_at(path)
    return field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _is_secret(path: list[str]) -> bool:
    field = _field_at(path)
    return field is not None and "SecretStr" in str(field.annotation)


def _read_secret_file(variable: str, file_name: str) -> str:
    try:
        return Path(file_name).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read the secret file {file_name!r}: {exc.strerror}") from None


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `IMGSTREAM_*` variables as a nested dict (`A__B` -> {"a": {"b": ...}}).

    A secret setting may instead name a file holding it: `IMGSTREAM_KAFKA__SASL_PASSWORD_FILE`.
    Secrets are kept as given (never parsed as JSON).
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not path:
            continue
        if path[-1].endswith(FILE_SUFFIX.lower()):
            secret = [*path[:-1], path[-1][: -len(FILE_SUFFIX)]]
            if _is_secret(secret):
                _set_path(data, secret, _read_secret_file(name, raw))
                continue
        _set_path(data, path, raw if _is_secret(path) else _parse_env_value(raw))
    return data


def _valid_names(path: list[str]) -> list[str]:
    """The setting names valid beside the last part of `path` (the fields of its parent section)."""
    model: Any = WorkerConfig
    if len(path) > 1:
        field = _field_at(path[:-1])
        model = field.annotation if field is not None else None
        if typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _unknown_setting(path: list[str]) -> str:
    """A usage message for a setting that does not exist, naming the closest valid one."""
    everything = _all_paths(WorkerConfig, [])
    same_leaf = [p for p in everything if p[-1] == path[-1]]  # the right name in the wrong section
    siblings = difflib.get_close_matches(path[-1], _valid_names(path), n=1, cutoff=0.6)
    if same_leaf:
        suggestion = same_leaf[0]
    elif siblings:
        suggestion = [*path[:-1], siblings[0]]
    else:
        dotted = {".".join(p): p for p in everything}
        found = difflib.get_close_matches(".".join(path), list(dotted), n=1, cutoff=0.6)
        suggestion = dotted[found[0]] if found else None
    message = f"unknown setting {'.'.join(path)} ({env_name(path)})"
    if suggestion is None:
        where = ".".join(path[:-1]) or "the top level"
        return f"{message}; the settings of {where} are: {', '.join(_valid_names(path))}"
    return f"{message}; did you mean {'.'.join(suggestion)} ({env_name(suggestion)})?"


def _all_paths(model: type[BaseModel], prefix: list[str]) -> list[list[str]]:
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _all_paths(annotation, [*prefix, name])
        else:
            out.append([*prefix, name])
    return out


def load_config(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Build the configuration from defaults, the environment and CLI overrides (in that order).

    Raises ConfigError naming each bad setting and its environment variable; a setting that
    does not exist is named with the closest one that does.
    """
    data = _merge(env_overrides(environ), overrides or {})
    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            path = [str(part) for part in error["loc"] if not isinstance(part, int)]
            if error["type"] == "extra_forbidden":
                problems.append(_unknown_setting(path))
            elif error["type"] == "value_error" and _is_section(path):
                # A section's own check (settings that cannot work together): its message names them.
                problems.append(str(error["ctx"]["error"]))
            elif error["type"] == "value_error":
                problems.append(f"{'.'.join(path)} ({env_name(path)}): {error['ctx']['error']}")
            else:
                problems.append(f"{'.'.join(path)} ({env_name(path)}): {error['msg']}")
        raise ConfigError("; ".join(problems)) from None
