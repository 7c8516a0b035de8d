"""OAUTHBEARER token providers: OpenID Connect client credentials, and Amazon MSK IAM.

Tokens are fetched in a thread (an HTTP call, or AWS's credential chain, must not stall the
event loop), reused by every connection of the process, and renewed `refresh_margin_s`
before they expire.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

from aiokafka.abc import AbstractTokenProvider

from imgstream.kafka_clients.errors import KafkaSetupError
from imgstream.schemas.config import OAuthConfig

TOKEN_TIMEOUT_S = 10.0


class CachedTokenProvider(AbstractTokenProvider):
    """Calls `fetch()` (in a thread) for a (token, expires_at) pair, and reuses it until near expiry."""

    def __init__(self, fetch: Callable[[], tuple[str, float]], margin_s: float,
                 extensions: dict[str, str] | None = None) -> None:
        self._fetch = fetch
        self._margin_s = margin_s
        self._extensions = dict(extensions or {})
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self.fetches = 0

    def _loop_lock(self) -> asyncio.Lock:
        """A lock of the running loop (the provider outlives the loops of one-shot commands and tests)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    async def token(self) -> str:
        async with self._loop_lock():  # many connections at start share one fetch
            if self._token is None or time.time() >= self._expires_at - self._margin_s:
                self._token, self._expires_at = await asyncio.to_thread(self._fetch)
                self.fetches += 1
            return self._token

    def extensions(self) -> dict[str, str]:
        return self._extensions


def oidc_fetcher(config: OAuthConfig) -> Callable[[], tuple[str, float]]:
    """The client-credentials grant (RFC 6749 §4.4) against `token_endpoint_url`, client authenticated by
    HTTP Basic (§2.3.1)."""
    assert config.token_endpoint_url and config.client_id and config.client_secret
    endpoint, client_id = config.token_endpoint_url, config.client_id
    secret = config.client_secret.get_secret_value()
    form = {"grant_type": "client_credentials"}
    if config.scope:
        form["scope"] = config.scope
    body = urllib.parse.urlencode(form).encode()
    basic = base64.b64encode(f"{urllib.parse.quote(client_id)}:{urllib.parse.quote(secret)}".encode()).decode()

    def fetch() -> tuple[str, float]:
        request = urllib.request.Request(endpoint, data=body, method="POST", headers={
            "Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TOKEN_TIMEOUT_S) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            kind = "authentication" if exc.code in (400, 401, 403) else "configuration"
            raise KafkaSetupError(kind, f"the token endpoint {endpoint} answered HTTP {exc.code} to client "
                                  f"{client_id}: check kafka.oauth.client_id, kafka.oauth.client_secret and "
                                  "kafka.oauth.scope") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise KafkaSetupError("configuration", f"no token from {endpoint}: {exc}; check "
                                  "kafka.oauth.token_endpoint_url") from None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            raise KafkaSetupError("configuration", f"the token endpoint {endpoint} answered without an "
                                  "access_token")
        return str(token), time.time() + float(answer.get("expires_in") or 3600)

    return fetch


def msk_iam_fetcher(config: OAuthConfig) -> Callable[[], tuple[str, float]]:
    """Amazon MSK IAM: a token signed with the host's AWS credentials by AWS's own signer library."""
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
    except ImportError:
        raise KafkaSetupError("configuration", "kafka.oauth.provider aws_msk_iam needs AWS's signer: "
                              "pip install 'imgstream[msk]'") from None
    region = config.aws_region

    def fetch() -> tuple[str, float]:
        where = region or _default_region()
        try:
            token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(where)
        except Exception as exc:  # noqa: BLE001 - botocore's errors have no common base worth naming
            raise KafkaSetupError("authentication", f"no MSK IAM token: {type(exc).__name__}: {exc}; check the "
                                  "host's AWS credentials and kafka.oauth.aws_region") from None
        return token, expiry_ms / 1000.0

    return fetch


def _default_region() -> str:
    import boto3

    region = boto3.session.Session().region_name
    if not region:
        raise KafkaSetupError("configuration", "no AWS region for MSK IAM: set kafka.oauth.aws_region "
                              "(IMGSTREAM_KAFKA__OAUTH__AWS_REGION) or AWS_REGION")
    return region


_PROVIDERS: dict[tuple, CachedTokenProvider] = {}


def token_provider(config: OAuthConfig) -> CachedTokenProvider:
    """The process's one provider for `config` (every client of the process shares its tokens)."""
    key = (config.provider, config.token_endpoint_url, config.client_id,
           config.client_secret.get_secret_value() if config.client_secret else None, config.scope,
           config.aws_region, tuple(sorted(config.extensions.items())), config.refresh_margin_s)
    provider = _PROVIDERS.get(key)
    if provider is None:
        fetch = oidc_fetcher(config) if config.provider == "oidc" else msk_iam_fetcher(config)
        provider = _PROVIDERS[key] = CachedTokenProvider(fetch, config.refresh_margin_s, config.extensions)
    return provider
