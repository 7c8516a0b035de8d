"""What went wrong with a Kafka connection, in words that name the setting to change."""

from __future__ import annotations

from aiokafka import errors as kerrors


class KafkaSetupError(Exception):
    """The cluster refused us for a reason retrying cannot fix (login, certificate, permission, settings).

    `kind` is one of "authentication", "tls", "authorization", "configuration", "topic".
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class BrokerUnreachable(Exception):
    """No broker answered at the bootstrap address (down, starting, or a network problem): worth retrying."""


class PublishForbidden(KafkaSetupError):
    """A publish the cluster will never take: the topic is missing or we may not write to it."""

    def __init__(self, kind: str, topic: str, message: str) -> None:
        super().__init__(kind, message)
        self.topic = topic


# Broker answers that mean "not allowed": no retry makes them pass.
_AUTHORIZATION = (
    kerrors.TopicAuthorizationFailedError,
    kerrors.GroupAuthorizationFailedError,
    kerrors.ClusterAuthorizationFailedError,
    kerrors.TransactionalIdAuthorizationFailed,
)
_AUTHENTICATION = (kerrors.SaslAuthenticationFailed, kerrors.AuthenticationFailedError,
                   kerrors.IllegalSaslStateError, kerrors.UnsupportedSaslMechanismError)


def explain_runtime_error(exc: BaseException, what: str) -> KafkaSetupError | None:
    """A KafkaSetupError for an error that retrying cannot fix, or None. `what` says what was being done
    ("write to imgstream.results", "alice with SCRAM-SHA-512 at host:9093")."""
    if isinstance(exc, kerrors.TopicAuthorizationFailedError):
        return KafkaSetupError("authorization", f"not authorized to {what}: grant this principal the topic ACL "
                               f"it needs (Read for consumers, Write for producers) or fix the topic name in "
                               f"kafka.topics ({_detail(exc)})")
    if isinstance(exc, kerrors.GroupAuthorizationFailedError):
        return KafkaSetupError("authorization", f"not authorized to {what}: grant this principal Read on the "
                               f"consumer group (kafka.group / sink.group) ({_detail(exc)})")
    if isinstance(exc, _AUTHORIZATION):
        return KafkaSetupError("authorization", f"not authorized to {what}: {type(exc).__name__} "
                               f"({_detail(exc)}); grant this principal the cluster ACL it needs")
    if isinstance(exc, _AUTHENTICATION):
        return KafkaSetupError("authentication", f"login refused ({what}): {_detail(exc)}; check "
                               "kafka.sasl_username and kafka.sasl_password (IMGSTREAM_KAFKA__SASL_PASSWORD or "
                               "IMGSTREAM_KAFKA__SASL_PASSWORD_FILE)")
    return None


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
