"""The TLS and SASL fronts: real aiokafka clients, configured with aiokafka's own arguments, through real handshakes.

What aiokafka raises for each failure is pinned here, because the client module classifies on it
(the findings are summarised at the top of tests/secure_kafka.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed, UnsupportedSaslMechanismError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from imgstream.producer.embedded_broker import read_frame
from tests.kafka_helpers import FAST_GROUP
from tests.secure_kafka import (
    ALL_MECHANISMS,
    KafkaFront,
    Listener,
    SecureCluster,
    StaticTokenProvider,
)

# Every failure below must end well within this: aiokafka does not retry a refused start().
FAILS_WITHIN_S = 10.0


@pytest.fixture(autouse=True)
def _fronts_raise_nothing(secure_cluster: SecureCluster) -> Iterator[None]:
    """A bug in a front shows as a dropped connection; its events tell it apart."""
    yield
    errors = [e for listener in secure_cluster.listeners.values() for e in listener.front.events if e.kind == "error"]
    assert not errors


async def _round_trip(kwargs: dict[str, Any], *, group: bool = False) -> list[bytes]:
    """Produce three records and read them back with the same connection settings."""
    topic = f"secure-{uuid.uuid4().hex[:12]}"
    producer = AIOKafkaProducer(acks="all", **kwargs)
    await asyncio.wait_for(producer.start(), FAILS_WITHIN_S)
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"record-{i}".encode(), key=b"k")
    finally:
        await producer.stop()
    group_kwargs = {"group_id": f"g-{uuid.uuid4().hex[:8]}", **FAST_GROUP} if group else {"group_id": None}
    consumer = AIOKafkaConsumer(topic, auto_offset_reset="earliest", **group_kwargs, **kwargs)
    await asyncio.wait_for(consumer.start(), FAILS_WITHIN_S)
    values: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while len(values) < 3:
                batches = await consumer.getmany(timeout_ms=200)
                values += [record.value for batch in batches.values() for record in batch]
    finally:
        await consumer.stop()
    return values


def _authenticated(listener: Listener, mechanism: str) -> set[str | None]:
    return {e.principal for e in listener.front.events if e.kind == "authenticated" and e.mechanism == mechanism}


async def _connect(kwargs: dict[str, Any]) -> None:
    """One aiokafka connection with these settings, as a client's bootstrap makes it, then closed."""
    host, _, port = kwargs["bootstrap_servers"].rpartition(":")
    settings = {k: v for k, v in kwargs.items() if k != "bootstrap_servers"}
    conn = await asyncio.wait_for(create_conn(host, int(port), **settings), FAILS_WITHIN_S)
    try:
        await asyncio.wait_for(conn.send(MetadataRequest([])), FAILS_WITHIN_S)
    finally:
        conn.close()


async def _start_fails(kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture) -> str:
    """Start a producer that must be refused; return the aiokafka log, where alone the cause is told."""
    caplog.clear()
    producer = AIOKafkaProducer(**kwargs)
    try:
        with caplog.at_level(logging.WARNING, logger="aiokafka"):
            with pytest.raises(KafkaConnectionError, match="Unable to bootstrap from") as raised:
                await asyncio.wait_for(producer.start(), FAILS_WITHIN_S)
    finally:
        await producer.stop()
    # The exception carries no cause: start() swallows it and logs it.
    assert raised.value.__cause__ is None
    return caplog.text


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mechanism", ALL_MECHANISMS)
async def test_round_trip_over_sasl_ssl(secure_cluster: SecureCluster, mechanism: str) -> None:
    listener = secure_cluster.sasl_ssl
    kwargs = {
        "bootstrap_servers": listener.bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_context": create_ssl_context(cafile=secure_cluster.pki.ca_cert),
        "sasl_mechanism": mechanism,
    }
    if mechanism == "OAUTHBEARER":
        kwargs["sasl_oauth_token_provider"] = StaticTokenProvider(secure_cluster.oauth_token)
    else:
        kwargs |= {"sasl_plain_username": "alice", "sasl_plain_password": secure_cluster.users["alice"]}

    assert await _round_trip(kwargs) == [b"record-0", b"record-1", b"record-2"]
    assert _authenticated(listener, mechanism) == {"oauth" if mechanism == "OAUTHBEARER" else "alice"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_round_trip_over_sasl_plaintext(secure_cluster: SecureCluster, mechanism: str) -> None:
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_plaintext, mechanism=mechanism)
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"

    assert await _round_trip(kwargs) == [b"record-0", b"record-1", b"record-2"]
    assert "alice" in _authenticated(secure_cluster.sasl_plaintext, mechanism)


async def test_scram_user_name_with_comma_and_equals_sign(secure_cluster: SecureCluster) -> None:
    # RFC 5802 escapes ',' and '=' in the name as =2C and =3D; the front must undo it.
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_ssl, mechanism="SCRAM-SHA-256",
                                            user="svc,imgstream=1")
    await _connect(kwargs)
    assert "svc,imgstream=1" in _authenticated(secure_cluster.sasl_ssl, "SCRAM-SHA-256")


async def test_round_trip_over_mutual_tls(secure_cluster: SecureCluster) -> None:
    pki = secure_cluster.pki
    kwargs = {
        "bootstrap_servers": secure_cluster.mtls.bootstrap,
        "security_protocol": "SSL",
        "ssl_context": create_ssl_context(cafile=pki.ca_cert, certfile=pki.client_cert, keyfile=pki.client_key),
    }
    assert await _round_trip(kwargs) == [b"record-0", b"record-1", b"record-2"]


async def test_mutual_tls_with_an_encrypted_client_key(secure_cluster: SecureCluster) -> None:
    pki = secure_cluster.pki
    context = create_ssl_context(cafile=pki.ca_cert, certfile=pki.client_cert, keyfile=pki.client_key_encrypted,
                                 password=pki.client_key_password)
    await _connect({"bootstrap_servers": secure_cluster.mtls.bootstrap, "security_protocol": "SSL",
                    "ssl_context": context})


def test_an_encrypted_client_key_with_a_wrong_password_is_refused_before_connecting(
    secure_cluster: SecureCluster,
) -> None:
    pki = secure_cluster.pki
    with pytest.raises(ssl.SSLError, match="PEM lib"):
        create_ssl_context(cafile=pki.ca_cert, certfile=pki.client_cert, keyfile=pki.client_key_encrypted,
                           password="not-the-password")


async def test_consumer_group_over_sasl_ssl(secure_cluster: SecureCluster) -> None:
    # The group coordinator is a second connection, to the address the metadata lists: the front again.
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_ssl, mechanism="SCRAM-SHA-512")
    assert await _round_trip(kwargs, group=True) == [b"record-0", b"record-1", b"record-2"]


async def test_metadata_lists_the_front_not_the_broker_behind_it(secure_cluster: SecureCluster) -> None:
    for listener in (secure_cluster.sasl_ssl, secure_cluster.mtls, secure_cluster.sasl_plaintext):
        admin = AIOKafkaAdminClient(**secure_cluster.aiokafka_kwargs(listener))
        await admin.start()
        try:
            cluster = await admin.describe_cluster()
        finally:
            await admin.close()
        assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("127.0.0.1", listener.front.port)]
        assert listener.upstream != listener.bootstrap


async def test_hostname_check_off_accepts_a_certificate_for_another_host(secure_cluster: SecureCluster) -> None:
    # What ssl_check_hostname=false is for; the CA is still checked.
    context = create_ssl_context(cafile=secure_cluster.pki.ca_cert)
    context.check_hostname = False
    kwargs = {"bootstrap_servers": secure_cluster.wrong_host.bootstrap, "security_protocol": "SSL",
              "ssl_context": context}
    assert await _round_trip(kwargs) == [b"record-0", b"record-1", b"record-2"]


# ----------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("mechanism", "message"),
    [
        ("SCRAM-SHA-256", "Authentication failed during authentication due to invalid credentials with SASL "
                          "mechanism SCRAM-SHA-256"),
        ("SCRAM-SHA-512", "Authentication failed during authentication due to invalid credentials with SASL "
                          "mechanism SCRAM-SHA-512"),
        ("PLAIN", "Authentication failed: Invalid username or password"),
    ],
)
async def test_wrong_password_is_an_authentication_error(
    secure_cluster: SecureCluster, mechanism: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-password-" + uuid.uuid4().hex
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_ssl, mechanism=mechanism, password=wrong)

    with pytest.raises(SaslAuthenticationFailed) as raised:
        await _connect(kwargs)
    assert raised.value.errno == 58
    assert str(raised.value) == f"[Error 58] SaslAuthenticationFailed: {message}"

    log = await _start_fails(kwargs, caplog)
    assert f"SaslAuthenticationFailed: {message}" in log
    assert wrong not in log
    failures = [e for e in secure_cluster.sasl_ssl.front.events if e.kind == "auth_failed"]
    assert failures[-1].mechanism == mechanism
    assert failures[-1].principal == "alice"
    assert not any(wrong in e.detail for e in failures)


async def test_unknown_scram_user_is_refused_at_the_first_message(secure_cluster: SecureCluster) -> None:
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_ssl, mechanism="SCRAM-SHA-512")
    kwargs["sasl_plain_username"] = "mallory"
    with pytest.raises(SaslAuthenticationFailed, match="invalid credentials with SASL mechanism SCRAM-SHA-512"):
        await _connect(kwargs)


async def test_unsupported_mechanism_names_error_33(secure_cluster: SecureCluster) -> None:
    with KafkaFront(mechanisms=("SCRAM-SHA-512",), users=secure_cluster.users,
                    upstream=secure_cluster.sasl_plaintext.upstream) as front:
        kwargs = {"bootstrap_servers": front.address, "security_protocol": "SASL_PLAINTEXT",
                  "sasl_mechanism": "PLAIN", "sasl_plain_username": "alice", "sasl_plain_password": "x"}
        with pytest.raises(UnsupportedSaslMechanismError) as raised:
            await _connect(kwargs)
        assert raised.value.errno == 33
        # aiokafka's message does not list them, but the answer does.
        with socket.create_connection(("127.0.0.1", front.port), timeout=5) as sock:
            error, mechanisms = _raw_handshake(sock, "PLAIN", version=1)
    assert (error, mechanisms) == (33, ["SCRAM-SHA-512"])


async def test_invalid_oauth_token_looks_like_a_dropped_connection_to_aiokafka(
    secure_cluster: SecureCluster, caplog: pytest.LogCaptureFixture
) -> None:
    # As a Kafka broker does, the front answers a bad token with an error challenge and no error code;
    # aiokafka ignores the challenge, believes it logged in, and its next request ends the connection.
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_ssl, mechanism="OAUTHBEARER", token="expired")
    events = secure_cluster.sasl_ssl.front.events
    logins_before = sum(e.kind == "authenticated" for e in events)
    with pytest.raises(KafkaConnectionError, match="closed"):
        await _connect(kwargs)
    log = await _start_fails(kwargs, caplog)
    assert "Unable to request metadata" in log
    assert "SaslAuthenticationFailed" not in log
    assert sum(e.kind == "authenticated" for e in events) == logins_before
    assert any(e.kind == "refused" and "api_key=3" in e.detail for e in events)


@pytest.mark.parametrize("case", ["client trusts another CA", "server certificate from an untrusted CA"])
async def test_untrusted_ca_is_a_certificate_verification_error(
    secure_cluster: SecureCluster, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    pki = secure_cluster.pki
    if case == "client trusts another CA":
        kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_ssl)
        kwargs["ssl_context"] = create_ssl_context(cafile=pki.untrusted_ca_cert)
    else:
        kwargs = {"bootstrap_servers": secure_cluster.untrusted.bootstrap, "security_protocol": "SSL",
                  "ssl_context": create_ssl_context(cafile=pki.ca_cert)}

    with pytest.raises(ssl.SSLCertVerificationError) as raised:
        await _connect(kwargs)
    assert raised.value.verify_message == "unable to get local issuer certificate"
    assert "CERTIFICATE_VERIFY_FAILED" in await _start_fails(kwargs, caplog)


async def test_wrong_host_name_is_a_certificate_verification_error(
    secure_cluster: SecureCluster, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = {"bootstrap_servers": secure_cluster.wrong_host.bootstrap, "security_protocol": "SSL",
              "ssl_context": create_ssl_context(cafile=secure_cluster.pki.ca_cert)}
    with pytest.raises(ssl.SSLCertVerificationError) as raised:
        await _connect(kwargs)
    assert raised.value.verify_message == "IP address mismatch, certificate is not valid for '127.0.0.1'."
    assert "IP address mismatch" in await _start_fails(kwargs, caplog)


@pytest.mark.parametrize(
    ("client_cert", "alert", "server_saw"),
    [
        (False, "TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        (True, "TLSV1_ALERT_UNKNOWN_CA", "CERTIFICATE_VERIFY_FAILED"),
    ],
    ids=["missing client certificate", "client certificate from an untrusted CA"],
)
async def test_refused_client_certificate_arrives_as_a_tls_alert(
    secure_cluster: SecureCluster, client_cert: bool, alert: str, server_saw: str, caplog: pytest.LogCaptureFixture
) -> None:
    # TLS 1.3: the client's handshake completes before the server checks its certificate, so the
    # alert arrives with the first response: a KafkaConnectionError whose cause is the ssl.SSLError.
    pki = secure_cluster.pki
    context = create_ssl_context(
        cafile=pki.ca_cert,
        certfile=pki.untrusted_client_cert if client_cert else None,
        keyfile=pki.untrusted_client_key if client_cert else None,
    )
    kwargs = {"bootstrap_servers": secure_cluster.mtls.bootstrap, "security_protocol": "SSL", "ssl_context": context}
    with pytest.raises(KafkaConnectionError, match="closed") as raised:
        await _connect(kwargs)
    assert isinstance(raised.value.__cause__, ssl.SSLError)
    assert raised.value.__cause__.reason == alert
    assert any(e.kind == "tls_failed" and server_saw in e.detail for e in secure_cluster.mtls.front.events)
    # start() logs only "Connection ... closed": the alert is lost on the way.
    log = await _start_fails(kwargs, caplog)
    assert "closed" in log
    assert alert not in log


async def test_missing_client_certificate_over_tls_1_2_fails_in_the_handshake(secure_cluster: SecureCluster) -> None:
    context = create_ssl_context(cafile=secure_cluster.pki.ca_cert)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    kwargs = {"bootstrap_servers": secure_cluster.mtls.bootstrap, "security_protocol": "SSL", "ssl_context": context}
    with pytest.raises(ssl.SSLError) as raised:
        await _connect(kwargs)
    assert raised.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


async def test_requests_before_authentication_close_the_connection(secure_cluster: SecureCluster) -> None:
    kwargs = {"bootstrap_servers": secure_cluster.sasl_plaintext.bootstrap, "security_protocol": "PLAINTEXT"}
    # ApiVersions is answered (relayed from the broker); the Metadata request that follows is not.
    with pytest.raises(KafkaConnectionError, match="closed"):
        await _connect(kwargs)
    refused = [e for e in secure_cluster.sasl_plaintext.front.events if e.kind == "refused"]
    assert any("api_key=3" in e.detail for e in refused)


async def test_tls_client_on_a_plaintext_port_is_dropped_at_once(secure_cluster: SecureCluster) -> None:
    # The ClientHello reads as a ~370 MB request, which a broker refuses without waiting for it.
    kwargs = secure_cluster.aiokafka_kwargs(secure_cluster.sasl_plaintext) | {
        "security_protocol": "SASL_SSL", "ssl_context": create_ssl_context(cafile=secure_cluster.pki.ca_cert)}
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await _connect(kwargs)


# ------------------------------------------------------------- protocol versions aiokafka never sends


def _send_request(sock: socket.socket, api_key: int, version: int, body: bytes, *, flexible: bool = False) -> bytes:
    client_id = b"raw"
    header = struct.pack(">hhih", api_key, version, 99, len(client_id)) + client_id + (b"\0" if flexible else b"")
    sock.sendall(struct.pack(">i", len(header) + len(body)) + header + body)
    response = read_frame(sock)
    assert struct.unpack_from(">i", response)[0] == 99
    return response[5:] if flexible else response[4:]


def _raw_handshake(sock: socket.socket, mechanism: str, version: int) -> tuple[int, list[str]]:
    body = _send_request(sock, 17, version, struct.pack(">h", len(mechanism)) + mechanism.encode())
    error, count = struct.unpack_from(">hi", body)
    names, pos = [], 6
    for _ in range(count):
        (size,) = struct.unpack_from(">h", body, pos)
        names.append(body[pos + 2:pos + 2 + size].decode())
        pos += 2 + size
    return error, names


def _authenticate_v2(sock: socket.socket, token: bytes) -> tuple[int, str | None, bytes]:
    """SaslAuthenticate v2, the flexible encoding (librdkafka and the Java client send it)."""
    body = _send_request(sock, 36, 2, bytes([len(token) + 1]) + token + b"\0", flexible=True)
    (error,) = struct.unpack_from(">h", body)
    size = body[2]
    message = body[3:3 + size - 1].decode() if size else None
    pos = 3 + max(size - 1, 0)
    auth_size = body[pos]
    return error, message, body[pos + 1:pos + auth_size]


@pytest.mark.parametrize(("password", "expected"), [
    ("alice-secret", (0, None, b"")),
    ("wrong", (58, "Authentication failed: Invalid username or password", b"")),
])
def test_sasl_authenticate_v2(secure_cluster: SecureCluster, password: str, expected: tuple[Any, ...]) -> None:
    host, _, port = secure_cluster.sasl_plaintext.bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        assert _raw_handshake(sock, "PLAIN", version=1) == (0, list(ALL_MECHANISMS))
        assert _authenticate_v2(sock, f"\0alice\0{password}".encode()) == expected


def test_sasl_handshake_v0_takes_bare_tokens(secure_cluster: SecureCluster) -> None:
    host, _, port = secure_cluster.sasl_plaintext.bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        assert _raw_handshake(sock, "PLAIN", version=0) == (0, list(ALL_MECHANISMS))
        token = b"\0alice\0alice-secret"
        sock.sendall(struct.pack(">i", len(token)) + token)
        assert read_frame(sock) == b""
        # Authenticated: Kafka requests now reach the broker.
        metadata = _send_request(sock, 3, 0, struct.pack(">i", 0))
        assert struct.unpack_from(">i", metadata)[0] == 1  # one broker


def test_invalid_oauth_token_then_control_a_is_error_58(secure_cluster: SecureCluster) -> None:
    host, _, port = secure_cluster.sasl_plaintext.bootstrap.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        _raw_handshake(sock, "OAUTHBEARER", version=1)
        first = _authenticate_v2(sock, b"n,,\x01auth=Bearer expired\x01\x01")
        assert first == (0, None, b'{"status":"invalid_token"}')
        assert _authenticate_v2(sock, b"\x01") == (58, '{"status":"invalid_token"}', b"")
        with pytest.raises(ConnectionError):
            read_frame(sock)
