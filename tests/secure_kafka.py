"""Secured Kafka for tests: TLS and SASL listeners (fronts on loopback before embedded Tansu brokers).

Use: the session fixture `secure_cluster` (registered in tests/conftest.py) yields a SecureCluster:
  pki             Pki: ca_cert, server_cert/key (localhost + 127.0.0.1), client_cert/key, client_key_encrypted
                  + client_key_password, wrong_host_cert/key (wrong.example), untrusted_ca_cert,
                  untrusted_server_cert/key, untrusted_client_cert/key (all Paths under one temp folder)
  users           SASL users, name -> password: "alice", and "svc,imgstream=1" (SCRAM escapes , and =)
  oauth_token     the one OAUTHBEARER token the fronts accept
  sasl_ssl        Listener, SASL_SSL: TLS (server certificate) + PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER
  sasl_plaintext  Listener, SASL_PLAINTEXT: the same four mechanisms without TLS
  mtls            Listener, SSL: a client certificate signed by pki.ca_cert is required
  wrong_host      Listener, SSL: the server certificate (trusted CA) names only wrong.example
  untrusted       Listener, SSL: the server certificate comes from pki.untrusted_ca_cert (no broker of its own)
  listeners       the same Listeners by name; aiokafka_kwargs(listener, mechanism=, user=, password=, token=)
                  gives aiokafka client arguments that work there (override one to make it fail)
A Listener has .bootstrap (the front, "127.0.0.1:PORT"), .upstream (its Tansu's plaintext listener; Tansu
advertises the front, so clients come back through it), .security_protocol, .mechanisms and .front, whose
.events (FrontEvent kind/detail/mechanism/principal: authenticated, auth_failed, tls_failed, refused,
denied, no_upstream, error) say what the front saw; passwords never appear in them. Start: ~0.1 s for the
PKI and four Tansu brokers; stop: ~0.5 s. KafkaFront(...) on its own serves ad-hoc listeners (other mechanisms).

Authorization and missing topics: the function-scoped fixture `acl_listener` (~0.03 s to start) yields a
PLAINTEXT Listener with its own Tansu whose front answers as a Kafka cluster with ACLs and without topic
auto-creation, per `listener.acl`, an AclPolicy (tests/kafka_acl.py) that starts empty and may change
while clients run:
    acl_listener.acl.deny("imgstream.results", "write")   # or "read", "describe"; .allow(topic, ...) undoes
    acl_listener.acl.deny_group("imgstream")              # GROUP_AUTHORIZATION_FAILED; .allow_group(...)
    acl_listener.acl.hide("imgstream.dlq")                # UNKNOWN_TOPIC_OR_PARTITION; .reveal(...)
Each refusal adds a FrontEvent("denied", "write TOPIC: error 29"). acl_listener_running(policy, **front)
is the same as a context manager (pass tls=/mechanisms=/users= for a secured one). What aiokafka does on
each refusal is at the top of tests/kafka_acl.py.

What aiokafka 0.14 does on each failure, measured on loopback against these fronts (pinned by
tests/test_secure_kafka_fronts.py):

1. start() never retries, for producer, consumer and admin client alike. Every failure below, an
   unreachable broker included, ends start() at once (under 0.1 s on loopback; by aiokafka's code, not
   measured here, a blackholed address takes request_timeout_ms, 40 s by default, per bootstrap host) with
       aiokafka.errors.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', PORT, <AddressFamily...>)]")
   which has no __cause__ or __context__: the cause reaches only the "aiokafka" logger, as
       ERROR 'Unable connect to "HOST:PORT": <str(cause)>'      (failed while connecting), or
       WARNING 'Unable to request metadata from "HOST:PORT": ...'  (connected, first request failed).
   "Retries forever" is the caller's own loop. To tell the kinds apart, open one connection first with
   aiokafka.conn.create_conn(host, port, security_protocol=, ssl_context=, sasl_mechanism=, ...) (what
   bootstrap does) and send one MetadataRequest: that raises the cause itself:

   failure                              create_conn / first request raises
   -----------------------------------  ------------------------------------------------------------------
   wrong password or unknown user,      aiokafka.errors.SaslAuthenticationFailed (errno 58, not retriable):
     SCRAM-SHA-256/512                  "[Error 58] SaslAuthenticationFailed: Authentication failed during
                                        authentication due to invalid credentials with SASL mechanism
                                        SCRAM-SHA-256" (Kafka's own wording; unknown users fail at once)
   wrong password, PLAIN                SaslAuthenticationFailed: "... Authentication failed: Invalid
                                        username or password"
   mechanism not enabled                aiokafka.errors.UnsupportedSaslMechanismError (errno 33); its text
                                        is only the connection's repr, without the enabled mechanisms
   invalid OAUTHBEARER token            NO authentication error. A Kafka broker answers a bad token with an
                                        error challenge ('{"status":"invalid_token"}') and error code 0;
                                        aiokafka's OAuthAuthenticator ignores it and believes it logged in.
                                        create_conn succeeds; the first request gets the connection closed:
                                        KafkaConnectionError("Connection at HOST:PORT closed"). A real broker
                                        first answers that request with ILLEGAL_SASL_STATE; the front just
                                        closes. aiokafka alone cannot tell this from a dropped connection.
   untrusted CA (client trusts another  ssl.SSLCertVerificationError (an OSError!), verify_message "unable
     CA, or server cert from one)       to get local issuer certificate"
   wrong host name                      ssl.SSLCertVerificationError, verify_message "IP address mismatch,
                                        certificate is not valid for '127.0.0.1'." (by name: "Hostname
                                        mismatch, certificate is not valid for 'localhost'.")
   no client certificate (mTLS)         TLS 1.3: the client's handshake completes, then the server's alert
                                        arrives with the first response: KafkaConnectionError("Connection at
                                        HOST:PORT closed") whose __cause__ is ssl.SSLError with reason
                                        TLSV13_ALERT_CERTIFICATE_REQUIRED. start()'s log line keeps only
                                        "Connection ... closed". TLS 1.2: ssl.SSLError reason
                                        SSLV3_ALERT_HANDSHAKE_FAILURE from the handshake itself.
   client certificate of another CA     as above, reason TLSV1_ALERT_UNKNOWN_CA
   plaintext client on a TLS port       KafkaConnectionError("... closed") <- IncompleteReadError
   TLS client on a plaintext port       ConnectionResetError (the ClientHello reads as a too-large request)
   PLAINTEXT client on a SASL port      create_conn succeeds (ApiVersions is allowed before SASL); the first
                                        request: KafkaConnectionError("... closed")
   unreachable (closed port)            ConnectionRefusedError [Errno 111]

   ssl.SSLError and ssl.SSLCertVerificationError are OSErrors, like ConnectionRefusedError: test for them
   before OSError when classifying.
2. Client-side key problems come before any connection, from aiokafka.helpers.create_ssl_context: an
   encrypted key with a wrong password raises ssl.SSLError "[SSL] PEM lib"; with NO password OpenSSL
   prompts "Enter PEM pass phrase:" on the terminal (blocks when interactive, OSError EINVAL otherwise):
   always pass `password` (a callable is fine) when a key file may be encrypted.
3. The fronts fail at once, as above; they do not emulate Kafka's connection.failed.authentication.delay.ms
   (100 ms before a failed login is answered).
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context

from imgstream.producer.embedded_broker import EmbeddedBroker
from tests.kafka_acl import AclPolicy
from tests.kafka_front import FrontEvent, KafkaFront
from tests.pki import Pki, make_pki
from tests.sasl_server import ALL_MECHANISMS

__all__ = ["ALL_MECHANISMS", "AclPolicy", "FrontEvent", "KafkaFront", "Listener", "Pki", "SecureCluster",
           "StaticTokenProvider", "acl_listener", "acl_listener_running", "make_pki", "secure_cluster",
           "secure_cluster_running"]


class StaticTokenProvider(AbstractTokenProvider):
    """aiokafka's OAUTHBEARER token provider that always hands out one token."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token


@dataclass
class Listener:
    """One secured listener: a front and the Tansu broker behind it, which advertises the front."""

    name: str
    security_protocol: str
    front: KafkaFront
    broker: EmbeddedBroker | None  # None: it shares another listener's broker (handshakes never finish)

    @property
    def bootstrap(self) -> str:
        return self.front.address

    @property
    def upstream(self) -> str:
        assert self.front.upstream is not None
        return self.front.upstream

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return self.front.mechanisms

    @property
    def acl(self) -> AclPolicy:
        """The front's authorization policy (only on an ACL listener)."""
        assert self.front.acl is not None, f"listener {self.name} has no ACL policy"
        return self.front.acl


@dataclass
class SecureCluster:
    """The secured listeners, the PKI and the credentials that tests and the integrator's settings use."""

    pki: Pki
    users: dict[str, str]
    oauth_token: str
    sasl_ssl: Listener  # TLS (server auth) + SASL PLAIN, SCRAM-SHA-256/512, OAUTHBEARER
    sasl_plaintext: Listener  # SASL (all four) without TLS
    mtls: Listener  # SSL with a required client certificate signed by pki.ca_cert
    wrong_host: Listener  # SSL, the server certificate names only wrong.example
    untrusted: Listener  # SSL, the server certificate comes from pki.untrusted_ca_cert
    listeners: dict[str, Listener] = field(default_factory=dict)

    def aiokafka_kwargs(self, listener: Listener, *, mechanism: str | None = None, user: str = "alice",
                        password: str | None = None, token: str | None = None) -> dict[str, Any]:
        """aiokafka client arguments that succeed on `listener` (override user/password/token to fail)."""
        kwargs: dict[str, Any] = {"bootstrap_servers": listener.bootstrap,
                                  "security_protocol": listener.security_protocol}
        if listener.security_protocol in ("SSL", "SASL_SSL"):
            client = listener is self.mtls
            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.pki.ca_cert,
                certfile=self.pki.client_cert if client else None,
                keyfile=self.pki.client_key if client else None,
            )
        if listener.security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = mechanism or "SCRAM-SHA-512"
            if kwargs["sasl_mechanism"] == "OAUTHBEARER":
                kwargs["sasl_oauth_token_provider"] = StaticTokenProvider(token or self.oauth_token)
            else:
                kwargs["sasl_plain_username"] = user
                kwargs["sasl_plain_password"] = password if password is not None else self.users[user]
        return kwargs


def _fronted(name: str, protocol: str, front: KafkaFront) -> Listener:
    front.start()
    broker = EmbeddedBroker(advertised=front.address)
    try:
        broker.start()
    except BaseException:
        front.stop()
        raise
    front.upstream = broker.bootstrap
    return Listener(name, protocol, front, broker)


@contextlib.contextmanager
def secure_cluster_running(directory: Path) -> Iterator[SecureCluster]:
    """Generate a PKI under `directory` and run every listener kind, each before its own Tansu."""
    pki = make_pki(directory)
    users = {"alice": "alice-secret", "svc,imgstream=1": "p@ss,w=rd"}
    oauth_token = "valid-" + secrets.token_hex(8)

    def validate(token: str) -> bool:
        return hmac.compare_digest(token, oauth_token)

    sasl = {"mechanisms": ALL_MECHANISMS, "users": users, "oauth_validate": validate}
    started: list[Listener] = []
    try:
        for name, protocol, front in (
            ("sasl_ssl", "SASL_SSL", KafkaFront(tls=(pki.server_cert, pki.server_key), **sasl)),
            ("sasl_plaintext", "SASL_PLAINTEXT", KafkaFront(**sasl)),
            ("mtls", "SSL", KafkaFront(tls=(pki.server_cert, pki.server_key), client_ca=pki.ca_cert)),
            ("wrong_host", "SSL", KafkaFront(tls=(pki.wrong_host_cert, pki.wrong_host_key))),
        ):
            started.append(_fronted(name, protocol, front))
        # Nobody gets past its TLS handshake, so it needs no broker of its own (a client that trusts the
        # untrusted CA would reach sasl_ssl's broker without SASL, and its metadata points at sasl_ssl).
        untrusted_front = KafkaFront(tls=(pki.untrusted_server_cert, pki.untrusted_server_key),
                                     upstream=started[0].upstream).start()
        started.append(Listener("untrusted", "SSL", untrusted_front, None))
        by_name = {listener.name: listener for listener in started}
        yield SecureCluster(pki=pki, users=users, oauth_token=oauth_token, listeners=by_name, **by_name)
    finally:
        for listener in started:
            listener.front.stop()
            if listener.broker is not None:
                listener.broker.stop()


@pytest.fixture(scope="session")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    """Every secured listener kind for the whole session (four Tansu brokers; about 0.1 s to start)."""
    with secure_cluster_running(tmp_path_factory.mktemp("pki")) as cluster:
        yield cluster


@contextlib.contextmanager
def acl_listener_running(policy: AclPolicy | None = None, **front: Any) -> Iterator[Listener]:
    """A listener with its own Tansu whose front enforces `policy` (empty by default); `front`: TLS/SASL arguments."""
    protocol = ("SASL_" if front.get("mechanisms") else "") + ("SSL" if front.get("tls") else "PLAINTEXT")
    listener = _fronted("acl", protocol, KafkaFront(acl=policy if policy is not None else AclPolicy(), **front))
    try:
        yield listener
    finally:
        listener.front.stop()
        assert listener.broker is not None
        listener.broker.stop()


@pytest.fixture
def acl_listener() -> Iterator[Listener]:
    """A PLAINTEXT listener with ACLs: change `acl_listener.acl` to deny, hide or allow (its own Tansu)."""
    with acl_listener_running() as listener:
        yield listener
