"""imgstream's commands on secured Kafka: real TLS and SASL handshakes through the fronts of tests/secure_kafka.py.

Round trips (topics create, worker, submit --wait, sink) over SASL_SSL and mutual TLS; refused settings
end each command within 30 s, naming the cause and the setting; the password never reaches a log.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from imgstream.sink.pgstore import embedding_table
from imgstream.kafka_clients import KafkaSetupError, open_admin
from imgstream.kafka_clients.tokens import CachedTokenProvider, oidc_fetcher
from imgstream.schemas.config import OAuthConfig, load_config
from tests.kafka_helpers import unique_topics
from tests.secure_kafka import KafkaFront, SecureCluster, _fronted
from tests.test_sink import count, db  # noqa: F401 - fixture: a fresh database
from tests.worker_procs import FACE_TASKS, WorkerProcs, small_photo

REPO = Path(__file__).resolve().parent.parent
PASSWORD_FILE_MARK = "never-in-a-log"


def secure_env(cluster: SecureCluster, listener_name: str, tmp_path: Path, *, password: str | None = None,
               cafile: Path | None = None, client_cert: bool = True) -> dict[str, str]:
    """IMGSTREAM_KAFKA__* for one listener; the SASL password travels as a file, as container secrets do."""
    listener = cluster.listeners[listener_name]
    env = {"IMGSTREAM_KAFKA__BOOTSTRAP": listener.bootstrap,
           "IMGSTREAM_KAFKA__SECURITY_PROTOCOL": listener.security_protocol}
    if listener.security_protocol.endswith("SSL"):
        env["IMGSTREAM_KAFKA__SSL_CAFILE"] = str(cafile or cluster.pki.ca_cert)
    if listener.name == "mtls" and client_cert:
        env["IMGSTREAM_KAFKA__SSL_CERTFILE"] = str(cluster.pki.client_cert)
        env["IMGSTREAM_KAFKA__SSL_KEYFILE"] = str(cluster.pki.client_key)
    if listener.security_protocol.startswith("SASL_"):
        secret = tmp_path / f"kafka-password-{uuid.uuid4().hex[:6]}"
        secret.write_text(password if password is not None else cluster.users["alice"])
        env.update({"IMGSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512", "IMGSTREAM_KAFKA__SASL_USERNAME": "alice",
                    "IMGSTREAM_KAFKA__SASL_PASSWORD_FILE": str(secret)})
    return env


def topic_env(topics) -> dict[str, str]:
    return {"IMGSTREAM_KAFKA__TOPICS__REQUESTS": topics.requests, "IMGSTREAM_KAFKA__TOPICS__REPLAY": topics.replay,
            "IMGSTREAM_KAFKA__TOPICS__RESULTS": topics.results, "IMGSTREAM_KAFKA__TOPICS__DLQ": topics.dlq}


async def imgstream(env: dict[str, str], *args: str, timeout_s: float = 240) -> tuple[int, str, str, float]:
    """Run the CLI with `env` (nothing else of ours inherited); (exit code, stdout, stderr, seconds)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")} | {"HF_HUB_OFFLINE": "1"} | env
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "imgstream", *args, cwd=REPO, env=full,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - started


@pytest.mark.parametrize("listener_name", ["sasl_ssl", "mtls"])
async def test_round_trip_through_topics_worker_submit_and_sink(secure_cluster, listener_name, tmp_path, db):
    env = secure_env(secure_cluster, listener_name, tmp_path)
    topics = unique_topics("sec")
    env |= topic_env(topics)
    code, out, err, _ = await imgstream(env, "topics", "create", "--partitions", "2")
    assert code == 0, err
    assert out.count(": created") == 5, out

    procs = WorkerProcs(tmp_path, env["IMGSTREAM_KAFKA__BOOTSTRAP"], topics, f"g-{uuid.uuid4().hex[:6]}")
    worker = procs.start(env={k: v for k, v in env.items() if k.startswith("IMGSTREAM_KAFKA__")
                              and k != "IMGSTREAM_KAFKA__BOOTSTRAP"})
    sink = None
    try:
        await worker.wait_for_log(r"connected to .* as group", timeout_s=120)
        image = small_photo(tmp_path / "astronaut.jpg")
        code, out, err, _ = await imgstream(
            env, "submit", str(image), "--tasks-json", orjson.dumps(FACE_TASKS).decode(), "--wait", "--json",
            "--no-progress", "--blob-dir", str(tmp_path / "blobs"))
        assert code == 0, err
        results = [orjson.loads(line) for line in out.splitlines()]
        assert {r["operation_id"] for r in results} == {"face", "face_loose"}
        assert all(r["status"] == "success" for r in results), results

        full = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")} | env
        sink = subprocess.Popen([sys.executable, "-m", "imgstream", "sink", "pgvector", "--dsn", db,
                                 "--group", f"sink-{uuid.uuid4().hex[:6]}", "--batch-ms", "50"],
                                cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while count(db, "results") < 2 and time.monotonic() < deadline and sink.poll() is None:
            await asyncio.sleep(0.2)
        assert count(db, "results") == 2, sink.poll()
    finally:
        if sink is not None:
            sink.send_signal(signal.SIGTERM)
            _, sink_err = sink.communicate(timeout=30)
            assert sink.returncode == 0, sink_err[-3000:]
            assert secure_cluster.users["alice"] not in sink_err
        assert await worker.terminate() == 0
        procs.report()
    assert secure_cluster.users["alice"] not in worker.log()
    front = secure_cluster.listeners[listener_name].front
    assert any(event.kind == "authenticated" for event in front.events) or listener_name == "mtls"


# (listener, how the settings are wrong, what the message must name)
REFUSALS = {
    "wrong password": ("sasl_ssl", {"password": "not-" + PASSWORD_FILE_MARK}, "kafka.sasl_password"),
    "untrusted CA": ("sasl_ssl", {"cafile": "untrusted"}, "kafka.ssl_cafile"),
    "wrong host name": ("wrong_host", {}, "kafka.ssl_check_hostname"),
    "missing client certificate": ("mtls", {"client_cert": False}, "kafka.ssl_certfile"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
async def test_refused_settings_end_every_command_within_30s_naming_the_setting(secure_cluster, refusal, tmp_path):
    listener_name, wrong, setting = REFUSALS[refusal]
    if wrong.get("cafile") == "untrusted":
        wrong = {"cafile": secure_cluster.pki.untrusted_ca_cert}
    env = secure_env(secure_cluster, listener_name, tmp_path, **wrong) | topic_env(unique_topics("ref"))
    env |= {"IMGSTREAM_MODELS__WEIGHTS": "random", "IMGSTREAM_MODELS__DEVICE": "cpu",
            "IMGSTREAM_MODELS__PRELOAD": "[]", "IMGSTREAM_LOG_LEVEL": "DEBUG"}
    commands = [("topics", "create"), ("submit", "https://example.org/a.jpg", "--task", "embed_clip_vit_b_32"),
                ("check",), ("worker",), ("sink", "pgvector", "--dsn", "postgresql://nobody@127.0.0.1:1/x")]
    for command in commands:
        code, out, err, took = await imgstream(env, *command, timeout_s=60)
        said = out + err
        assert code != 0, f"{command}: {said}"
        assert took < 30, f"{command} took {took:.1f}s"
        assert setting in said, f"{command}: {said}"
        assert "Traceback" not in said, f"{command}: {said}"
        assert PASSWORD_FILE_MARK not in said and secure_cluster.users["alice"] not in said


async def test_an_unreachable_broker_is_told_apart_from_a_refusal(tmp_path):
    from imgstream.producer.embedded_broker import find_free_port

    code, out, err, took = await imgstream({"IMGSTREAM_KAFKA__BOOTSTRAP": f"127.0.0.1:{find_free_port()}"},
                                           "topics", "create")
    assert code == 4 and "no Kafka broker answered" in err, err
    assert took < 30


async def test_check_reports_login_topics_and_access(secure_cluster, tmp_path):
    env = secure_env(secure_cluster, "sasl_ssl", tmp_path) | topic_env(unique_topics("chk"))
    code, out, _, _ = await imgstream(env, "check")
    assert code == 1, out
    assert out.splitlines()[0].startswith("ok    connect to ") and "SCRAM-SHA-512 as alice" in out, out
    assert out.count("missing (imgstream topics create makes it)") == 5, out
    assert (await imgstream(env, "topics", "create"))[0] == 0
    code, out, _, _ = await imgstream(env, "check")
    assert code == 0, out
    assert out.count("read allowed") == 5 and out.count("write allowed") == 5, out
    assert "FAIL" not in out


@pytest.fixture
async def token_endpoint(secure_cluster):
    """An OpenID Connect token endpoint on loopback: client credentials in, the fronts' token out."""
    issued: list[float] = []
    answer = {"expires_in": 3600, "token": secure_cluster.oauth_token}

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        user, _, secret = base64.b64decode(request.headers["Authorization"].split()[1]).decode().partition(":")
        if form.get("grant_type") != "client_credentials" or (urllib.parse.unquote(user),
                                                               urllib.parse.unquote(secret)) != ("imgstream", "s3c"):
            return web.json_response({"error": "invalid_client"}, status=401)
        issued.append(time.monotonic())
        return web.json_response({"access_token": answer["token"], "token_type": "bearer",
                                  "expires_in": answer["expires_in"]})

    app = web.Application()
    app.router.add_post("/oauth2/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/oauth2/token", issued, answer
    await runner.cleanup()


def oidc_env(cluster: SecureCluster, endpoint: str, secret: str) -> dict[str, str]:
    return {"IMGSTREAM_KAFKA__BOOTSTRAP": cluster.sasl_ssl.bootstrap, "IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "IMGSTREAM_KAFKA__SSL_CAFILE": str(cluster.pki.ca_cert), "IMGSTREAM_KAFKA__SASL_MECHANISM": "OAUTHBEARER",
            "IMGSTREAM_KAFKA__OAUTH__PROVIDER": "oidc", "IMGSTREAM_KAFKA__OAUTH__TOKEN_ENDPOINT_URL": endpoint,
            "IMGSTREAM_KAFKA__OAUTH__CLIENT_ID": "imgstream", "IMGSTREAM_KAFKA__OAUTH__CLIENT_SECRET": secret}


async def test_oauthbearer_with_oidc_client_credentials(secure_cluster, token_endpoint):
    endpoint, issued, _ = token_endpoint
    env = oidc_env(secure_cluster, endpoint, "s3c") | topic_env(unique_topics("oidc"))
    code, out, err, _ = await imgstream(env, "topics", "create")
    assert code == 0, err
    assert issued, "the token endpoint was never asked"
    code, out, err, took = await imgstream(oidc_env(secure_cluster, endpoint, "bad-secret-7f3a"), "check")
    assert code != 0 and "HTTP 401" in out + err and "kafka.oauth.client_secret" in out + err, out + err
    assert took < 30 and "bad-secret-7f3a" not in out + err


async def test_oidc_tokens_are_shared_and_renewed_before_they_expire(token_endpoint):
    endpoint, issued, answer = token_endpoint
    answer["expires_in"] = 2
    provider = CachedTokenProvider(oidc_fetcher(OAuthConfig(
        provider="oidc", token_endpoint_url=endpoint, client_id="imgstream", client_secret="s3c")), margin_s=1.0)
    tokens = await asyncio.gather(*(provider.token() for _ in range(5)))
    assert len(set(tokens)) == 1 and len(issued) == 1  # five connections at once share one fetch
    await provider.token()
    assert len(issued) == 1  # still fresh
    await asyncio.sleep(1.2)  # within the renewal margin now, though not expired yet
    await provider.token()
    assert len(issued) == 2


async def test_a_token_the_cluster_refuses_is_a_refused_login(secure_cluster, token_endpoint):
    endpoint, _, answer = token_endpoint
    answer["token"] = "a-token-of-another-issuer"
    kafka = load_config(environ=oidc_env(secure_cluster, endpoint, "s3c")).kafka
    with pytest.raises(KafkaSetupError) as refused:
        await open_admin(kafka)
    assert refused.value.kind == "authentication" and "refused the token" in refused.value.message


async def test_amazon_msk_iam_tokens_signed_by_aws_signer():
    seen: list[str] = []

    def msk_signed(token: str) -> bool:
        url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        seen.append(url)
        return (url.startswith("https://kafka.eu-west-1.amazonaws.com/") and query["Action"] == ["kafka-cluster:Connect"]
                and query["X-Amz-Credential"][0].startswith("AKIDEXAMPLEIMGSTREAM/")
                and len(query["X-Amz-Signature"][0]) == 64)

    listener = _fronted("msk", "SASL_PLAINTEXT", KafkaFront(mechanisms=("OAUTHBEARER",), oauth_validate=msk_signed))
    try:
        env = {"IMGSTREAM_KAFKA__BOOTSTRAP": listener.bootstrap, "IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
               "IMGSTREAM_KAFKA__SASL_MECHANISM": "OAUTHBEARER", "IMGSTREAM_KAFKA__OAUTH__PROVIDER": "aws_msk_iam",
               "IMGSTREAM_KAFKA__OAUTH__AWS_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIDEXAMPLEIMGSTREAM", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}
        env |= topic_env(unique_topics("msk"))
        code, out, err, _ = await imgstream(env, "topics", "create")
        assert code == 0, err
        assert any(event.kind == "authenticated" for event in listener.front.events)
    finally:
        listener.front.stop()
        assert listener.broker is not None
        listener.broker.stop()
