"""Why a client could not start: a setting to change (KafkaSetupError) or a broker that does not answer.

aiokafka reports every bootstrap failure as "Unable to bootstrap"; one direct connection to each
bootstrap broker, with the same security settings, shows the cause: a refused login, a certificate
we do not trust or that the broker does not accept, or a listener that speaks another protocol.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Iterator

from aiokafka import errors as kerrors
from aiokafka.conn import create_conn
from aiokafka.protocol.metadata import MetadataRequest

from imgstream.kafka_clients.errors import BrokerUnreachable, KafkaSetupError, explain_runtime_error
from imgstream.kafka_clients.security import connection_args
from imgstream.schemas.config import KafkaConfig

PROBE_TIMEOUT_MS = 10_000
# OpenSSL's reasons for "the broker wants a (different) client certificate", and for "not TLS at all".
_CLIENT_CERT_REQUIRED = ("CERTIFICATE_REQUIRED", "HANDSHAKE_FAILURE", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
_CLIENT_CERT_REFUSED = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR",
                        "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE")
_NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")


def bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    hosts = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        hosts.append((host.strip("[]") or item.strip(), int(port) if port.isdigit() else 9092))
    return hosts


async def diagnose(kafka: KafkaConfig, original: BaseException) -> KafkaSetupError | BrokerUnreachable:
    """The reason behind `original` (a failed start), found by connecting to each bootstrap broker."""
    if isinstance(original, KafkaSetupError):
        return original
    seen = []
    for host, port in bootstrap_hosts(kafka.bootstrap):
        try:
            await _probe(kafka, host, port)
        except KafkaSetupError as exc:
            return exc
        except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - whatever it is, it is classified
            setup = classify(exc, kafka, host, port)
            if setup is not None:
                return setup
            seen.append(f"{host}:{port}: {_brief(exc)}")
            continue
        seen.append(f"{host}:{port} answers")
    return BrokerUnreachable(f"{_brief(original)} ({'; '.join(seen)})")


async def _probe(kafka: KafkaConfig, host: str, port: int) -> None:
    """Connect (TLS, SASL) and ask for metadata, as a client's bootstrap does, letting the cause escape."""
    conn = await create_conn(host, port, client_id=f"{kafka.client_id}-probe",
                             request_timeout_ms=min(kafka.request_timeout_ms, PROBE_TIMEOUT_MS),
                             **connection_args(kafka))
    try:
        # Some refusals only show here: a missing client certificate under TLS 1.3, a refused OAUTHBEARER token.
        await conn.send(MetadataRequest([]))
    finally:
        conn.close()


def classify(exc: BaseException, kafka: KafkaConfig, host: str, port: int) -> KafkaSetupError | None:
    """A KafkaSetupError when `exc` (from connecting to host:port) needs a setting changed, else None."""
    where = f"{host}:{port}"
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            message = cause.verify_message or str(cause)
            if "hostname" in message.lower() or "ip address mismatch" in message.lower():
                return KafkaSetupError("tls", f"TLS: the certificate of {where} is not valid for the name "
                                       f"{host} ({message}): connect by a name the certificate lists "
                                       "(kafka.bootstrap), or set kafka.ssl_check_hostname=false")
            return KafkaSetupError("tls", f"TLS: the certificate of {where} is not trusted ({message}): set "
                                   "kafka.ssl_cafile (IMGSTREAM_KAFKA__SSL_CAFILE) to the CA that signed the "
                                   "brokers' certificates")
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or cause).upper()
            if any(r in reason for r in _NOT_TLS):
                return KafkaSetupError("tls", f"TLS: {where} does not speak TLS ({cause.reason}): check "
                                       f"kafka.security_protocol ({kafka.security_protocol}) and the port")
            if any(r in reason for r in _CLIENT_CERT_REQUIRED) and kafka.ssl_certfile is None:
                return KafkaSetupError("tls", f"TLS: {where} requires a client certificate (mutual TLS, "
                                       f"{cause.reason}): set kafka.ssl_certfile and kafka.ssl_keyfile")
            if any(r in reason for r in _CLIENT_CERT_REFUSED + _CLIENT_CERT_REQUIRED):
                return KafkaSetupError("tls", f"TLS: {where} refused our client certificate {kafka.ssl_certfile} "
                                       f"({cause.reason}): use one signed by a CA the cluster trusts "
                                       "(kafka.ssl_certfile, kafka.ssl_keyfile)")
            return KafkaSetupError("tls", f"TLS handshake with {where} failed ({cause.reason or cause}): check "
                                   "kafka.security_protocol and the kafka.ssl_* settings")
        if isinstance(cause, kerrors.UnsupportedSaslMechanismError):
            return KafkaSetupError("authentication", f"{where} does not offer SASL {kafka.sasl_mechanism} "
                                   f"({_brief(cause)}): set kafka.sasl_mechanism to one it offers")
        explained = explain_runtime_error(cause, f"{kafka.sasl_username or 'this client'} with "
                                          f"{kafka.sasl_mechanism} at {where}")
        if explained is not None:
            return explained
    return _closed_at_once(exc, kafka, where)


def _closed_at_once(exc: BaseException, kafka: KafkaConfig, where: str) -> KafkaSetupError | None:
    """A broker that accepts the connection, then closes it at the first request, refuses how we talk to it."""
    if not (isinstance(exc, kerrors.KafkaConnectionError) and "closed" in str(exc)):
        if kafka.security_protocol.endswith("SSL") and isinstance(exc, ConnectionResetError):
            return KafkaSetupError("tls", f"TLS: {where} reset the connection at the TLS handshake: it does not "
                                   f"speak TLS; check kafka.security_protocol ({kafka.security_protocol}) and the "
                                   "port")
        return None
    if kafka.sasl_mechanism == "OAUTHBEARER" and kafka.security_protocol.startswith("SASL_"):
        # Kafka answers a bad token with an error challenge that aiokafka takes for success, then closes.
        return KafkaSetupError("authentication", f"{where} closed the connection after the OAUTHBEARER login: "
                               "it refused the token; check kafka.oauth (provider, client id and secret, scope, "
                               "extensions)")
    return KafkaSetupError("configuration", f"{where} accepted the connection but closed it at the first "
                           f"request: its listener expects another protocol than {kafka.security_protocol} "
                           "(TLS, or a SASL login); check kafka.security_protocol and the port")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
