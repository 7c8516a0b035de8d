"""The connection arguments aiokafka needs for `kafka.security_protocol`: a TLS context and a SASL login."""

from __future__ import annotations

import ssl
from typing import Any

from imgstream.kafka_clients.errors import KafkaSetupError
from imgstream.kafka_clients.tokens import token_provider
from imgstream.schemas.config import KafkaConfig


def tls_context(kafka: KafkaConfig) -> ssl.SSLContext:
    """A client TLS context: the configured CA (else the system's), a client certificate for mutual TLS."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_cafile)
    except (OSError, ssl.SSLError) as exc:
        raise KafkaSetupError("configuration", f"kafka.ssl_cafile ({kafka.ssl_cafile}) cannot be loaded as a "
                              f"PEM CA bundle: {_reason(exc)}") from None
    context.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_certfile is not None:
        # A callable even without a password: an encrypted key then fails here instead of OpenSSL
        # asking for a pass phrase on the terminal.
        secret = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else ""

        def password() -> str:
            return secret

        try:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile, password=password)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSetupError("configuration", f"the client certificate {kafka.ssl_certfile} (key "
                                  f"{kafka.ssl_keyfile or 'in the same file'}) cannot be loaded: {_reason(exc)}; "
                                  "check kafka.ssl_certfile, kafka.ssl_keyfile and kafka.ssl_key_password") from None
    return context


def connection_args(kafka: KafkaConfig) -> dict[str, Any]:
    """aiokafka's security arguments (the same for consumers, producers and admin clients)."""
    args: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        args["ssl_context"] = tls_context(kafka)
    if kafka.security_protocol.startswith("SASL_"):
        args["sasl_mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_mechanism == "OAUTHBEARER":
            args["sasl_oauth_token_provider"] = token_provider(kafka.oauth)
        else:
            args["sasl_plain_username"] = kafka.sasl_username
            args["sasl_plain_password"] = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return args


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(getattr(exc, "reason", None) or exc)
