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


def explain_runtime_error(exc: BaseException, what: str, permission: str = "Read") -> KafkaSetupError | None:
    """A KafkaSetupError for an error that retrying cannot fix, or None. `what` says what was being done
    ("write to imgstream.results", "alice with SCRAM-SHA-512 at host:9093"); `permission` is the topic
    ACL operation that needs (Read, Write)."""
    if isinstance(exc, kerrors.TopicAuthorizationFailedError):
        return KafkaSetupError("authorization", f"not authorized to {what} ({brief(exc, 200)}): the principal needs "
                               f"{permission} (and Describe) on the topic; grant it, or fix the topic's name in "
                               "kafka.topics")
    if isinstance(exc, kerrors.GroupAuthorizationFailedError):
        return KafkaSetupError("authorization", f"not authorized to {what}: grant this principal Read on the "
                               f"consumer group (kafka.group / sink.group) ({brief(exc, 200)})")
    if isinstance(exc, _AUTHORIZATION):
        return KafkaSetupError("authorization", f"not authorized to {what}: {type(exc).__name__} "
                               f"({brief(exc, 200)}); grant this principal the cluster ACL it needs")
    if isinstance(exc, _AUTHENTICATION):
        return KafkaSetupError("authentication", f"login refused ({what}): {brief(exc, 200)}; check "
                               "kafka.sasl_username and kafka.sasl_password (IMGSTREAM_KAFKA__SASL_PASSWORD or "
                               "IMGSTREAM_KAFKA__SASL_PASSWORD_FILE)")
    return None


def brief(problem: BaseException | str, limit: int = 160) -> str:
    """An error (or any text) on one line of at most `limit` characters, for log lines and reasons."""
    text = " ".join(str(problem).split()) or (type(problem).__name__ if isinstance(problem, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."
