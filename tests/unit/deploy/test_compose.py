"""Static checks of the container stack: docker-compose.yml, the Dockerfile and deploy/.

None of this needs a Docker engine.  The Compose file is read with PyYAML and its model checked
here; when the Compose v2 CLI is installed, `docker compose config` (client-side only: it
parses, interpolates and normalises the model) must accept it too, and so must the Python
`docker-compose` 1.29 (`docker-compose config`, schema validation included) when it is on PATH
or at `DOCKER_COMPOSE_V1`; when `promtool` is installed (Debian package `prometheus`) it checks
the Prometheus configuration and alert rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCES = GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_PROVISIONING / "dashboards" / "fraudstream.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fraudstream.json"

INFRA = {"kafka", "redis", "postgres", "prometheus", "grafana", "mlflow", "scorer-lb"}
# Services run from the project image, and the command each runs.
PROJECT_COMMANDS = {
    "scorer": "python -m serving",
    "feature-dataflow": "python -m streaming.features --processes 2",
    "stream-scorer": "python -m streaming.score",
    "producer": "python -m streaming.produce live --rate 2 --duration 86400",
    "history-compactor": "python -m training.compact_history --every-s 3600 --metrics-host "
                         "0.0.0.0 --metrics-port 9103",
}
ONE_SHOT = {"init", "train", "skew-audit"}
REQUIRED_SERVICES = INFRA | set(PROJECT_COMMANDS) | {"init"}
# Where Prometheus must find each service's metrics.
SCRAPE_TARGETS = {("scorer", 8000), ("feature-dataflow", 9101), ("feature-dataflow", 9102),
                  ("stream-scorer", 9102), ("history-compactor", 9103)}
DATA_DIR = "/var/lib/fraudstream/data"
MODEL_DIR = "/var/lib/fraudstream/models"
COMMON_ENV = {
    "REDIS_URL": "redis://redis:6379/0",
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "FRAUD_DATA_DIR": DATA_DIR,
    "SERVING_MODEL_DIR": "/var/lib/fraudstream/models",
}
# Every metric the dashboard may query (histograms by their base name).
DASHBOARD_METRICS = {
    "fraud_request_latency_seconds",
    "fraud_requests_total",
    "fraud_stream_freshness_seconds",
    "fraud_stream_events_total",
    "fraud_stream_dlq_total",
    "fraud_stream_lag_events",
    "fraud_score",
    "fraud_decisions_total",
    "fraud_feature_psi",
    "fraud_model_info",
    "fraud_challenger_info",
    "fraud_challenger_score_diff",
    "fraud_stream_dlq_failed_total",
}
# Metrics that both the HTTP and the stream scorer export: every query names its job.
SHARED_SCORING_METRICS = {"fraud_decisions_total", "fraud_score", "fraud_model_info",
                          "fraud_challenger_info", "fraud_feature_psi"}
SCORE_ROUTES = 'route=~"/v1/score.*"'
PREDICTION_LOG_DIR = "/var/lib/fraudstream/data/predictions"
# What the alert rules must cover (alert name -> metric its expression reads).
ALERTS = {
    "FraudScorerErrorRate": "fraud_requests_total",
    "FraudScorerLatencyP99": "fraud_request_latency_seconds_bucket",
    "FraudFeatureFreshness": "fraud_stream_freshness_seconds_bucket",
    "FraudStreamDeadLetters": "fraud_stream_dlq_total",
    "FraudFeatureDrift": "fraud_feature_psi",
    "FraudServingSkewStaleFeatures": "fraud_missing_features_total",
}
LATENCY_BUCKETS = "fraud_request_latency_seconds_bucket"
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Z][A-Z0-9_]*):\?[^}]+\}$")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
TEST_SECRETS = {"POSTGRES_PASSWORD": "pg-test-secret", "GRAFANA_ADMIN_PASSWORD": "gf-test-secret"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_line(service: dict[str, Any]) -> str:
    """The service's command as one string (the script, for `sh -c` commands)."""
    command = service.get("command", "")
    if isinstance(command, str):
        return command
    if command[:2] == ["sh", "-c"]:
        return command[2]
    return " ".join(command)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host_ip, published host port or range) of each published port."""
    result: list[tuple[str | None, str]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((port.get("host_ip"), str(port.get("published", ""))))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else None
        result.append((host_ip, parts[-2] if len(parts) >= 2 else ""))
    return result


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source of each volume entry (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    return mounts


def balanced(expr: str) -> bool:
    """Whether the (), [] and {} of a PromQL expression pair up (quoted strings skipped)."""
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


# --- docker-compose.yml ---------------------------------------------------------------------


def test_required_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert REQUIRED_SERVICES <= set(services), REQUIRED_SERVICES - set(services)


def test_every_dependency_waits_on_a_condition(services: dict[str, dict[str, Any]]) -> None:
    allowed = {"service_healthy", "service_completed_successfully", "service_started"}
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must be a mapping with conditions"
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert spec.get("condition") in allowed, f"{name} -> {dependency}: no condition"


def test_published_ports_bind_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = {name: published_ports(service) for name, service in services.items()}
    publishing = {name for name, ports in published.items() if ports}
    assert publishing == {"scorer-lb", "mlflow", "prometheus", "grafana"}
    for name, ports in published.items():
        assert services[name].get("network_mode") != "host", name
        for host_ip, _ in ports:
            assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip or 'all interfaces'}"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        if name in PROJECT_COMMANDS or name in ONE_SHOT:
            assert image.startswith("fraudstream:"), f"{name} must run the project image"
            assert service["build"]["context"] == ".", name
            continue
        repository, _, tag = image.split("@")[0].rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag not in {"latest", ""} and "$" not in image, f"{name}: {image} is not pinned"
        # an exact release (major.minor[.patch]), not a moving major tag such as `redis:7`
        assert re.match(r"^v?\d+\.\d+(\.\d+)?$", tag), f"{name}: {image} is not an exact version"
    assert "imagetools inspect" in COMPOSE_FILE.read_text(), "document the digest update path"


def test_project_services_run_expected_commands(services: dict[str, dict[str, Any]]) -> None:
    for name, expected in PROJECT_COMMANDS.items():
        assert command_line(services[name]) == expected, name
    init = command_line(services["init"])
    assert "feast -c feature_repo apply" in init and "python -m scoring.topics" in init
    assert init.index("feast") < init.index("scoring.topics"), "topics after the registry"


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in {"kafka", "redis", "postgres", "scorer"}:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} is one-shot: restart must be 'no'"
            continue
        healthcheck = service.get("healthcheck", {})
        assert healthcheck.get("test") and not healthcheck.get("disable"), name
    assert "/ready" in " ".join(services["scorer"]["healthcheck"]["test"])
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def test_no_literal_secrets(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    envs = {name: environment(service) for name, service in services.items()}
    envs["x-fraudstream-env"] = {k: str(v) for k, v in compose["x-fraudstream-env"].items()}
    for name, env in envs.items():
        for key, value in env.items():
            if SECRET_KEY.search(key):
                assert REQUIRED_VAR.match(value), f"{name}.{key} must be ${{VAR:?...}}: {value!r}"
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert REQUIRED_VAR.match(password), f"{name}.{key} embeds a literal password"
    assert "POSTGRES_PASSWORD" in environment(services["postgres"])
    assert "GF_SECURITY_ADMIN_PASSWORD" in environment(services["grafana"])


def test_required_variables_are_documented(compose: dict[str, Any]) -> None:
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", COMPOSE_FILE.read_text()))
    example = (ROOT / ".env.example").read_text()
    documented = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example, re.MULTILINE))
    assert required == {"POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
    assert required <= set(documented), required - set(documented)
    for name in required:
        assert documented[name] == "change-me", f".env.example must hold a placeholder for {name}"


def test_project_services_share_the_connection_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in set(PROJECT_COMMANDS) | ONE_SHOT:
        env = environment(services[name])
        assert COMMON_ENV.items() <= env.items(), f"{name} lacks the common environment"
        registry = env["FEAST_REGISTRY_URL"]
        assert registry.startswith("postgresql+psycopg://fraud:${POSTGRES_PASSWORD")
        assert registry.endswith("@postgres:5432/feast"), registry
        models = env["MODEL_REGISTRY_URL"]
        assert models.startswith("postgresql+psycopg://fraud:${POSTGRES_PASSWORD")
        assert models.endswith("@postgres:5432/mlflow"), models
        assert env["REDIS_MODE"] == "standalone", "the documented REDIS_MODE switch"


def test_scorer_replicas_are_behind_one_loopback_port(services: dict[str, dict[str, Any]]) -> None:
    scorer, lb = services["scorer"], services["scorer-lb"]
    assert scorer["deploy"]["replicas"] >= 2
    assert not published_ports(scorer), "replicas are reached through the load balancer"
    assert published_ports(lb) == [("127.0.0.1", "8000")]
    assert lb["depends_on"]["scorer"]["condition"] == "service_healthy"
    config = ROOT / volume_mounts(lb)["/etc/nginx/nginx.conf"]
    text = config.read_text()
    # every replica, re-resolved through Docker's DNS, on the port the scorer listens on
    assert re.search(r"^\s*server scorer:8000 resolve;", text, re.M), text
    assert "resolver 127.0.0.11" in text and "listen 8000;" in text
    assert text.count("{") == text.count("}")
    assert environment(scorer)["SERVING_WORKERS"].isdigit()
    assert scorer["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert scorer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert environment(scorer)["SERVING_HOST"] == "0.0.0.0"


def test_scorer_logs_predictions_where_the_skew_audit_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    scorer, audit = services["scorer"], services["skew-audit"]
    assert environment(scorer)["SERVING_PREDICTION_LOG_DIR"] == PREDICTION_LOG_DIR
    assert environment(audit)["SERVING_PREDICTION_LOG_DIR"] == PREDICTION_LOG_DIR
    assert PREDICTION_LOG_DIR.startswith(DATA_DIR + "/"), "on the shared data volume"
    for service in (scorer, audit):
        assert volume_mounts(service)[DATA_DIR] == "fraud-data"
    assert not any(v.endswith(f"{DATA_DIR}:ro") for v in scorer["volumes"]), "scorer writes it"
    assert command_line(audit).startswith("python -m training.skew_audit")
    report = command_line(audit).split("--report", 1)[1].split()[0]
    assert report.startswith(DATA_DIR + "/"), "the report must land on a writable volume"
    assert audit["profiles"] == ["jobs"]
    assert audit["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_the_model_registry_is_shared_and_writable(services: dict[str, dict[str, Any]]) -> None:
    """Registry writes (train, CLI, POST /admin/promote) go to MLflow on PostgreSQL, never to
    the read-only models mount; MLflow's own server shows the same registry; its version is the
    client's (one database schema)."""
    url = environment(services["scorer"])["MODEL_REGISTRY_URL"]
    assert url.startswith("postgresql+psycopg://"), "not a file under the read-only mount"
    for name in ("scorer", "stream-scorer"):
        assert f"models:{MODEL_DIR}:ro" in services[name]["volumes"], name
    assert f"models:{MODEL_DIR}" in services["train"]["volumes"], "train writes the artifact"
    mlflow = services["mlflow"]
    assert environment(mlflow)["MODEL_REGISTRY_URL"] == url
    assert '--backend-store-uri "$$MODEL_REGISTRY_URL"' in command_line(mlflow)
    assert mlflow["build"]["target"] == "mlflow"
    assert mlflow["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "python -m training.registry" in command_line(services["init"]), "schema, once"
    init_sql = ROOT / volume_mounts(services["postgres"])["/docker-entrypoint-initdb.d"]
    assert "CREATE DATABASE mlflow" in " ".join(p.read_text() for p in init_sql.glob("*.sql"))
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())
    server = re.search(r'"mlflow==([^"]+)"', DOCKERFILE.read_text())
    assert server and server.group(1) == pins["mlflow-skinny"], "server and client MLflow differ"
    assert mlflow["image"].endswith(":" + pins["mlflow-skinny"])


def test_init_runs_once_after_the_infrastructure(services: dict[str, dict[str, Any]]) -> None:
    init = services["init"]
    assert init["restart"] == "no"
    for dependency in ("kafka", "redis", "postgres"):
        assert init["depends_on"][dependency]["condition"] == "service_healthy", dependency


@pytest.mark.parametrize(
    ("name", "port_setting", "port"),
    [
        ("feature-dataflow", "STREAMING_METRICS_PORT", 9101),
        ("stream-scorer", "STREAMING_SCORE_METRICS_PORT", 9102),
    ],
)
def test_streaming_services(
    services: dict[str, dict[str, Any]], name: str, port_setting: str, port: int
) -> None:
    service = services[name]
    assert service["restart"] == "unless-stopped"
    assert service["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    env = environment(service)
    assert env[port_setting] == str(port)
    assert env["STREAMING_METRICS_HOST"] == "0.0.0.0", "metrics must be reachable from prometheus"
    assert f":{port}/" in " ".join(service["healthcheck"]["test"])


def test_volumes(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose["volumes"])
    for name, service in services.items():
        for target, source in volume_mounts(service).items():
            if not source.startswith("."):
                assert source in declared, f"{name} mounts undeclared volume {source}"
            else:
                assert (ROOT / source).exists(), f"{name} bind-mounts missing {source}"
            assert not target.startswith("/var/lib/fraudstream") or not source.startswith(".")
    for name in ("init", "feature-dataflow", "scorer", "history-compactor", "producer"):
        assert volume_mounts(services[name]).get(DATA_DIR) == "fraud-data", name
    assert f"fraud-data:{DATA_DIR}:ro" in services["producer"]["volumes"], "reads the bank"
    dataflow = services["feature-dataflow"]
    recovery = environment(dataflow)["STREAMING_RECOVERY_DIR"]
    assert recovery == "/var/lib/fraudstream/recovery"
    assert volume_mounts(dataflow)[recovery] in declared
    assert services["redis"]["command"][1:3] == ["--appendonly", "yes"]


def test_producer_only_in_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["producer"]["profiles"] == ["demo"]
    unprofiled = {name for name, service in services.items() if not service.get("profiles")}
    assert REQUIRED_SERVICES - {"producer"} <= unprofiled


# --- deploy/: Prometheus and Grafana ----------------------------------------------------------


def test_prometheus_scrapes_the_services(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets.update((host, int(dns["port"])) for host in dns["names"])
    assert {t for t in targets if t[0] != "localhost"} == SCRAPE_TARGETS
    assert {host for host, _ in SCRAPE_TARGETS} <= set(services)
    assert environment(services["scorer"])["SERVING_PORT"] == "8000"
    mounts = volume_mounts(services["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    # rule files are relative to prometheus.yml: the same layout locally and in the container
    assert config["rule_files"] == ["alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"


def test_alert_rules_cover_the_service_levels() -> None:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    rules = {r["alert"]: r for group in groups for r in group["rules"]}
    for alert, metric in ALERTS.items():
        assert alert in rules, alert
        assert metric in rules[alert]["expr"], (alert, rules[alert]["expr"])
    for name, rule in rules.items():
        assert balanced(rule["expr"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        if "fraud_request" in rule["expr"]:
            assert SCORE_ROUTES in rule["expr"], f"{name}: scoring routes only"


def promtool_or_skip() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return promtool


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run([promtool_or_skip(), "check", "rules", str(ALERT_RULES)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)}" in result.stdout or "SUCCESS" in result.stdout


def test_promtool_accepts_the_config() -> None:
    result = subprocess.run([promtool_or_skip(), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


def test_grafana_is_provisioned(services: dict[str, dict[str, Any]]) -> None:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    mounts = volume_mounts(services["grafana"])
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_dashboard_panels_query_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            found = re.findall(r"\bfraud_\w+", target["expr"])
            names = {re.sub(r"_(bucket|count|sum)$", "", metric) for metric in found}
            assert names and names <= DASHBOARD_METRICS, f"{panel['title']!r}: {target['expr']}"
            assert balanced(target["expr"]), f"unbalanced brackets: {target['expr']}"
            queried |= names
    assert queried == DASHBOARD_METRICS, DASHBOARD_METRICS - queried
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for quantile in ("0.50", "0.95", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile},") and LATENCY_BUCKETS in e for e in exprs
        ), quantile
    assert any("fraud_requests_total{" in e and 'status=~"5.."' in e for e in exprs)
    for expr in exprs:
        # HTTP metrics: the scoring routes only (not /health, /metrics, /admin)
        for selector in re.findall(r"\bfraud_request(?:s_total|_latency_seconds_bucket)(\{[^}]*\})?",
                                   expr):
            assert SCORE_ROUTES in selector, f"scoring panels must select the routes: {expr}"
        # metrics both scorers export: one job per query, so HTTP and stream stay apart
        for metric, selector in re.findall(r"\b(fraud_\w+)(\{[^}]*\})?", expr):
            if re.sub(r"_(bucket|count|sum)$", "", metric) in SHARED_SCORING_METRICS:
                assert 'job="' in selector, f"{metric} without a job: {expr}"
    decisions = [e for e in exprs if "fraud_decisions_total" in e]
    assert any('job="scorer"' in e for e in decisions)
    assert any('job="stream-scorer"' in e for e in decisions)


# --- Dockerfile and .dockerignore -------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    build_args = dict(args.partition("=")[::2] for op, args in instructions if op == "ARG")
    assert re.match(r"^python:3\.11\.\d+-slim-", build_args["PYTHON_IMAGE"]), "exact release"
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM") :]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "final stage runs as root"
    assert users[-1].split(":")[0] == "10001"
    healthcheck = " ".join(args for op, args in final if op == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck and "python" in healthcheck
    assert ("EXPOSE", "8000") in final
    env = " ".join(args for op, args in final if op == "ENV")
    assert "SERVING_HOST=0.0.0.0" in env, "`docker run -p` must reach the scorer"
    assert ("CMD", '["python", "-m", "serving"]') in final
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "pip install -c constraints.txt ." in runs
    for op, args in instructions:
        if op in {"ENV", "ARG"}:
            assert not SECRET_KEY.search(args), f"secret-like {op}: {args}"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    required = {".venv", "data", "artifacts", "reports", ".git", "tests", "**/__pycache__", ".env"}
    assert required <= ignored, required - ignored


# --- docker compose config (client-side; no engine needed) ------------------------------------


def compose_cli_or_skip() -> list[str]:
    """`docker compose` (the Compose v2 CLI plugin), or skip the test when it is not installed."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("Docker Compose v2 CLI plugin not installed (`docker compose version` failed)")
    return [docker, "compose"]


def run_compose_config(
    tmp_path: Path, secrets: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    compose_cli = compose_cli_or_skip()
    env_file = tmp_path / "empty.env"  # so a developer's .env cannot mask a missing variable
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in TEST_SECRETS} | secrets
    files = ["--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    profiles = ["--profile", "demo", "--profile", "jobs"]
    command = [*compose_cli, *files, *profiles, "config", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_compose_config_accepts_the_file(tmp_path: Path) -> None:
    result = run_compose_config(tmp_path, TEST_SECRETS, "--format", "json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert REQUIRED_SERVICES | {"train", "skew-audit"} == set(model["services"])
    registry = model["services"]["scorer"]["environment"]["FEAST_REGISTRY_URL"]
    password = TEST_SECRETS["POSTGRES_PASSWORD"]
    assert registry == f"postgresql+psycopg://fraud:{password}@postgres:5432/feast"
    assert model["services"]["scorer"]["deploy"]["replicas"] == 2


@pytest.mark.parametrize("missing", sorted(TEST_SECRETS))
def test_compose_config_requires_the_secrets(tmp_path: Path, missing: str) -> None:
    secrets = {k: v for k, v in TEST_SECRETS.items() if k != missing}
    result = run_compose_config(tmp_path, secrets, "--quiet")
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


# --- docker-compose 1.29 (the Python package): `docker-compose config` --------------------------


def compose_v1_or_skip() -> str:
    """The Python `docker-compose` 1.29 (at DOCKER_COMPOSE_V1, else on PATH), or skip.  It does
    not install into the project's virtualenv (it pins PyYAML<6); in a venv of its own:
    `pip install "cython<3" wheel && pip install --no-build-isolation pyyaml==5.4.1 &&
    pip install docker-compose==1.29.2`."""
    binary = os.environ.get("DOCKER_COMPOSE_V1") or shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose 1.29 not installed (set DOCKER_COMPOSE_V1 to its path)")
    return binary


def test_docker_compose_v1_validates_and_interpolates(tmp_path: Path) -> None:
    binary = compose_v1_or_skip()
    env_file = tmp_path / "empty.env"  # so a developer's .env cannot mask a missing variable
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in TEST_SECRETS} | TEST_SECRETS
    command = [binary, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE),
               "--env-file", str(env_file), "--profile", "demo", "--profile", "jobs", "config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)
    assert REQUIRED_SERVICES | {"train", "skew-audit"} == set(model["services"])
    password = TEST_SECRETS["POSTGRES_PASSWORD"]
    for name in ("scorer", "stream-scorer", "train", "mlflow"):
        url = model["services"][name]["environment"]["MODEL_REGISTRY_URL"]
        assert url == f"postgresql+psycopg://fraud:{password}@postgres:5432/mlflow", name
    assert model["services"]["scorer"]["deploy"]["replicas"] == 2
    missing = subprocess.run([*command, "-q"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"})
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr
