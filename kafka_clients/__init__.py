"""The one place that builds imgstream's Kafka clients (consumer, producer, admin) from `kafka.*` settings.

Security (TLS, SASL, OAUTHBEARER tokens) and tuning are applied here for every command; a
failure to connect is told apart: settings to change (`KafkaSetupError`, never retried) or a
broker that does not answer (`BrokerUnreachable`, retried by long-running commands).
"""

from imgstream.kafka_clients.build import (
    KafkaLike,
    check_login,
    kafka_settings,
    open_admin,
    open_client,
    open_consumer,
    open_producer,
    producer_args,
)
from imgstream.kafka_clients.errors import BrokerUnreachable, KafkaSetupError, PublishForbidden, explain_runtime_error

__all__ = [
    "BrokerUnreachable",
    "check_login",
    "KafkaLike",
    "KafkaSetupError",
    "PublishForbidden",
    "explain_runtime_error",
    "kafka_settings",
    "open_admin",
    "open_client",
    "open_consumer",
    "open_producer",
    "producer_args",
]
