"""The server side of Kafka's SASL mechanisms: PLAIN, SCRAM-SHA-256/512 and OAUTHBEARER, as a broker answers them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ALL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")

# The messages a Kafka broker (SaslServerAuthenticator) sends with error 58.
_SCRAM_FAILED = "Authentication failed during authentication due to invalid credentials with SASL mechanism {}"
_PLAIN_FAILED = "Authentication failed: Invalid username or password"
_OAUTH_INVALID = '{"status":"invalid_token"}'
SCRAM_ITERATIONS = 4096  # Kafka's minimum, and RFC 7677's


class SaslFailed(Exception):
    """The client's SASL exchange failed; the message is what the broker tells it (error 58)."""


class PlainServer:
    """RFC 4616: one message `authzid NUL user NUL password`."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = users
        self.principal: str | None = None
        self.complete = False

    def step(self, data: bytes) -> bytes:
        parts = data.decode("utf-8", "replace").split("\0")
        if len(parts) != 3:
            raise SaslFailed(f"Invalid SASL/PLAIN response: expected 3 tokens, got {len(parts)}")
        authzid, user, password = parts
        self.principal = user
        if authzid and authzid != user:
            raise SaslFailed("Authentication failed: Client requested an authorization id that is different "
                             "from username")
        expected = self._users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            raise SaslFailed(_PLAIN_FAILED)
        self.complete = True
        return b""


_SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


@dataclass(frozen=True)
class ScramCredential:
    """A SCRAM user as a broker stores it (RFC 5802 section 3): salt and keys, never the password."""

    salt: bytes
    stored_key: bytes
    server_key: bytes


def scram_credential(mechanism: str, password: str, salt: bytes, iterations: int = SCRAM_ITERATIONS
                     ) -> ScramCredential:
    """Derive the stored credential of `password` for `mechanism`."""
    name = _SCRAM_HASHES[mechanism]
    salted = hashlib.pbkdf2_hmac(name, password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", name).digest()
    return ScramCredential(salt, hashlib.new(name, client_key).digest(), hmac.new(salted, b"Server Key", name).digest())


def _scram_attributes(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or len(key) != 1:
            raise SaslFailed(f"Invalid SCRAM message attribute {item[:20]!r}")
        pairs.append((key, value))
    return pairs


def _scram_unescape(name: str) -> str:
    # RFC 5802 5.1: ',' and '=' travel as '=2C' and '=3D'; any other '=' is malformed.
    out, i = [], 0
    while i < len(name):
        if name[i] == "=":
            code = name[i:i + 3]
            if code not in ("=2C", "=3D"):
                raise SaslFailed("Invalid SCRAM user name encoding")
            out.append("," if code == "=2C" else "=")
            i += 3
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


class ScramServer:
    """The server side of SCRAM-SHA-256/512 (RFC 5802, RFC 7677), without channel binding, as Kafka."""

    def __init__(self, mechanism: str, credential: Callable[[str], ScramCredential | None],
                 iterations: int = SCRAM_ITERATIONS) -> None:
        self._mechanism = mechanism
        self._hash = _SCRAM_HASHES[mechanism]
        self._credential_of = credential
        self._iterations = iterations
        self._credential: ScramCredential | None = None
        self._stage = 0
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.principal: str | None = None
        self.complete = False

    def _fail(self) -> SaslFailed:
        return SaslFailed(_SCRAM_FAILED.format(self._mechanism))

    def step(self, data: bytes) -> bytes:
        text = data.decode("utf-8", "replace")
        if self._stage == 0:
            self._stage = 1
            return self._client_first(text)
        if self._stage == 1:
            self._stage = 2
            return self._client_final(text)
        raise SaslFailed("Unexpected SCRAM message after the exchange completed")

    def _client_first(self, text: str) -> bytes:
        flag, sep1, rest = text.partition(",")
        authzid, sep2, bare = rest.partition(",")
        if not (sep1 and sep2) or flag not in ("n", "y"):
            # "p=...": the client wants channel binding, which Kafka does not offer either.
            raise SaslFailed(f"Invalid SCRAM client first message (channel binding flag {flag[:10]!r})")
        self._gs2_header = f"{flag},{authzid},"
        attributes = _scram_attributes(bare)
        if len(attributes) < 2 or attributes[0][0] != "n" or attributes[1][0] != "r" or not attributes[1][1]:
            raise SaslFailed("Invalid SCRAM client first message")
        self.principal = _scram_unescape(attributes[0][1])
        self._client_first_bare = bare
        self._credential = self._credential_of(self.principal)
        if self._credential is None:
            raise self._fail()  # Kafka refuses an unknown user at once, as here
        self._nonce = attributes[1][1] + secrets.token_urlsafe(18)
        salt = base64.b64encode(self._credential.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._iterations}"
        return self._server_first.encode()

    def _client_final(self, text: str) -> bytes:
        assert self._credential is not None
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise SaslFailed("Invalid SCRAM client final message: no proof")
        attributes = dict(_scram_attributes(without_proof))
        try:
            binding = base64.b64decode(attributes.get("c", ""), validate=True).decode()
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            raise SaslFailed("Invalid SCRAM client final message: bad base64") from None
        if binding != self._gs2_header or attributes.get("r") != self._nonce:
            raise SaslFailed("Invalid SCRAM client final message: channel binding or nonce mismatch")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_signature = hmac.new(self._credential.stored_key, auth_message, self._hash).digest()
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=False))
        if len(proof) != len(client_signature) or not hmac.compare_digest(
            hashlib.new(self._hash, client_key).digest(), self._credential.stored_key
        ):
            raise self._fail()
        self.complete = True
        server_signature = hmac.new(self._credential.server_key, auth_message, self._hash).digest()
        return b"v=" + base64.b64encode(server_signature)


class OAuthBearerServer:
    """RFC 7628's initial client response, `n,,\\x01auth=Bearer <token>\\x01...\\x01\\x01`, as Kafka checks it.

    An invalid token is answered like Kafka's OAuthBearerSaslServer does: an error JSON challenge
    *without* an error code, and error 58 only once the client acknowledges it with `\\x01`.
    """

    def __init__(self, validate: Callable[[str], bool] | None) -> None:
        self._validate = validate
        self._error_sent = False
        self.principal: str | None = None
        self.complete = False

    def step(self, data: bytes) -> bytes:
        if self._error_sent:
            raise SaslFailed(_OAUTH_INVALID)
        text = data.decode("utf-8", "replace")
        header, sep, rest = text.partition("\x01")
        if not sep or not header.startswith(("n,", "y,")) or not rest.endswith("\x01\x01"):
            raise SaslFailed("Invalid OAUTHBEARER initial client response")
        pairs = dict(item.split("=", 1) for item in rest[:-2].split("\x01") if "=" in item)
        scheme, _, token = pairs.get("auth", "").partition(" ")
        if scheme.lower() != "bearer" or not token or self._validate is None or not self._validate(token):
            self._error_sent = True
            return _OAUTH_INVALID.encode()
        self.principal = "oauth"
        self.complete = True
        return b""


SaslServer = PlainServer | ScramServer | OAuthBearerServer
