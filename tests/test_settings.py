"""Settings refuse what they do not know, keep secrets secret, and refuse combinations that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from imgstream.schemas.config import ConfigError, Settings, WorkerConfig, load_config
from imgstream.schemas.settings_doc import render_tables

REPO = Path(__file__).resolve().parent.parent
SASL = {"IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "IMGSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "IMGSTREAM_KAFKA__SASL_USERNAME": "alice"}


def _error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    return str(caught.value)


@pytest.mark.parametrize("variable, named, suggested", [
    ("IMGSTREAM_KAFKA__BOOTSTRAP_SERVERS", "kafka.bootstrap_servers", "IMGSTREAM_KAFKA__BOOTSTRAP"),
    ("IMGSTREAM_MAX_INFLIGHT", "max_inflight", "IMGSTREAM_MAX_IN_FLIGHT"),
    ("IMGSTREAM_SESSION_TIMEOUT_MS", "session_timeout_ms", "IMGSTREAM_KAFKA__SESSION_TIMEOUT_MS"),
    ("IMGSTREAM_MODELS__BATCHING__CLIP__MAX_BATCHSIZE", "models.batching.clip.max_batchsize",
     "IMGSTREAM_MODELS__BATCHING__CLIP__MAX_BATCH_SIZE"),
    ("IMGSTREAM_KAFKA__PRODUCER__COMPRESSION", "kafka.producer.compression",
     "IMGSTREAM_KAFKA__PRODUCER__COMPRESSION_TYPE"),
])
def test_an_unknown_variable_is_named_with_the_closest_valid_one(variable, named, suggested):
    message = _error({variable: "5"})
    assert f"unknown setting {named} ({variable})" in message, message
    assert "did you mean" in message and suggested in message, message


def test_an_unknown_batched_model_is_refused():
    message = _error({"IMGSTREAM_MODELS__BATCHING__CLIPP__MAX_BATCH_SIZE": "8"})
    assert "clipp is not a batched model; did you mean clip?" in message, message


def test_every_configuration_model_forbids_extra_keys():
    def models(model: type[BaseModel]) -> set[type[BaseModel]]:
        found = {model}
        for field in model.model_fields.values():
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    found |= models(candidate)
        return found

    everything = models(WorkerConfig)
    assert len(everything) > 10, everything
    loose = [m.__name__ for m in everything if m.model_config.get("extra") != "forbid"]
    assert not loose, f"configuration models that ignore unknown keys: {loose}"
    assert all(issubclass(m, Settings) for m in everything)


def test_a_secret_is_read_from_its_file_and_never_shown(tmp_path):
    secret_file = tmp_path / "kafka-password"
    secret_file.write_text("s3cr3t-from-file\n")
    config = load_config(environ={**SASL, "IMGSTREAM_KAFKA__SASL_PASSWORD_FILE": str(secret_file)})
    assert config.kafka.sasl_password is not None
    assert config.kafka.sasl_password.get_secret_value() == "s3cr3t-from-file"
    for shown in (repr(config), str(config), config.model_dump_json(), render_tables(config)):
        assert "s3cr3t" not in shown


def test_a_secret_keeps_its_text_as_given():
    # A password that looks like JSON stays a string (no parsing of secrets).
    config = load_config(environ={**SASL, "IMGSTREAM_KAFKA__SASL_PASSWORD": "12345"})
    assert config.kafka.sasl_password.get_secret_value() == "12345"


def test_an_unreadable_secret_file_names_the_variable(tmp_path):
    message = _error({**SASL, "IMGSTREAM_KAFKA__SASL_PASSWORD_FILE": str(tmp_path / "missing")})
    assert "IMGSTREAM_KAFKA__SASL_PASSWORD_FILE" in message and "cannot read the secret file" in message


def test_the_file_form_is_only_for_secrets():
    message = _error({"IMGSTREAM_KAFKA__BOOTSTRAP_FILE": "/etc/hostname"})
    assert "unknown setting kafka.bootstrap_file" in message, message


@pytest.mark.parametrize("environ, expected", [
    ({"IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "IMGSTREAM_KAFKA__SASL_USERNAME": "u",
      "IMGSTREAM_KAFKA__SASL_PASSWORD": "never-logged"}, "PLAIN over SASL_PLAINTEXT would send the password"),
    ({"IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "IMGSTREAM_KAFKA__SASL_USERNAME": "u"},
     "kafka.sasl_password is unset"),
    ({"IMGSTREAM_KAFKA__SSL_CAFILE": "/etc/ssl/ca.pem"}, "kafka.ssl_cafile is set but kafka.security_protocol is "
     "PLAINTEXT"),
    ({"IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "IMGSTREAM_KAFKA__SASL_MECHANISM": "OAUTHBEARER"},
     "kafka.oauth.provider is unset"),
    ({"IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "IMGSTREAM_KAFKA__SASL_MECHANISM": "OAUTHBEARER",
      "IMGSTREAM_KAFKA__OAUTH__PROVIDER": "oidc", "IMGSTREAM_KAFKA__OAUTH__CLIENT_ID": "c"},
     "kafka.oauth.token_endpoint_url is unset"),
    ({"IMGSTREAM_KAFKA__SSL_KEYFILE": "/k.pem", "IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SSL"},
     "kafka.ssl_keyfile is set without kafka.ssl_certfile"),
])
def test_settings_that_cannot_work_together_are_refused(environ, expected):
    message = _error(environ)
    assert expected in message, message
    assert "never-logged" not in message


def test_plain_without_tls_is_allowed_only_when_asked():
    config = load_config(environ={"IMGSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                                  "IMGSTREAM_KAFKA__SASL_USERNAME": "u", "IMGSTREAM_KAFKA__SASL_PASSWORD": "p",
                                  "IMGSTREAM_KAFKA__SASL_PLAIN_OVER_PLAINTEXT": "true"})
    assert config.kafka.sasl_plain_over_plaintext


def test_client_tuning_defaults():
    kafka = load_config(environ={}).kafka
    assert (kafka.producer.acks, kafka.producer.compression_type, kafka.producer.enable_idempotence) == \
        ("all", "zstd", "auto")
    assert (kafka.consumer.auto_offset_reset, kafka.consumer.isolation_level) == ("earliest", "read_committed")
    tuned = load_config(environ={"IMGSTREAM_KAFKA__CONSUMER__AUTO_OFFSET_RESET": "latest",
                                 "IMGSTREAM_KAFKA__PRODUCER__LINGER_MS": "20"}).kafka
    assert (tuned.consumer.auto_offset_reset, tuned.producer.linger_ms) == ("latest", 20)


def _cli(*args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSTREAM_")} | (environ or {})
    return subprocess.run([sys.executable, "-m", "imgstream", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("command", [["worker"], ["topics", "create"], ["check"], ["sink", "pgvector"]])
def test_an_unknown_variable_is_a_usage_error_for_every_command(command):
    run = _cli(*command, environ={"IMGSTREAM_KAFKA__BOOTSTRAP_SERVERS": "b:9092"})
    assert run.returncode == 2, run.stderr
    assert "unknown setting kafka.bootstrap_servers" in run.stderr and "IMGSTREAM_KAFKA__BOOTSTRAP" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unknown_flag_is_a_usage_error_with_the_closest_flag():
    run = _cli("worker", "--http-prot", "8080")
    assert run.returncode == 2, run.stderr
    assert "unknown flag --http-prot (did you mean --http-port?)" in run.stderr, run.stderr
    run = _cli("topics", "create", "--partitons=3")
    assert run.returncode == 2 and "did you mean --partitions?" in run.stderr, run.stderr


def test_help_never_shows_a_secret():
    environ = {**SASL, "IMGSTREAM_KAFKA__SASL_PASSWORD": "help-must-not-show"}
    for command in ([], ["worker"], ["check"], ["submit"], ["sink", "pgvector"]):
        run = _cli(*command, "--help", environ=environ)
        assert run.returncode == 0, run.stderr
        assert "help-must-not-show" not in run.stdout + run.stderr


def test_every_imgstream_variable_the_deployment_sets_is_a_setting():
    import re

    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    checked = 0
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        given = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in environment.items()
                 if k.startswith("IMGSTREAM_")}
        try:
            load_config(environ=given)
        except ConfigError as exc:
            raise AssertionError(f"docker-compose.yml service {name}: {exc}") from None
        checked += bool(given)
    assert checked >= 4, checked
