"""What can be checked of deploy/ without a container engine: every file parses, and the files
agree with each other and with the code (service names, ports, env vars, metric names)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Settings
from pipeline.devstack import nats_server_binary
from pipeline.metrics import Metrics
from pipeline.topology import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS = {f"PIPELINE_{name.upper()}" for name in Settings.model_fields}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def metric_names() -> set[str]:
    """Every sample name a worker exports (counters with _total, histograms with _bucket…)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_compose_runs_every_stage_as_its_own_split_worker() -> None:
    services = compose()["services"]
    for stage in STAGE_NAMES:
        assert services[stage]["command"] == ["run", "--mode", "split", "--stage", stage]
    assert services["migrate"]["command"] == ["migrate"]
    for infra in ("mosquitto", "nats-1", "postgres", "prometheus", "grafana"):
        assert infra in services


def test_compose_workers_wait_for_the_migration_and_set_only_real_settings() -> None:
    services = compose()["services"]
    for stage in STAGE_NAMES:
        depends = services[stage]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        env = services[stage]["environment"]
        assert set(env) <= SETTINGS, set(env) - SETTINGS
        hosts = [u.rsplit("@", 1)[1] for u in env["PIPELINE_NATS_URL"].split(",")]
        assert hosts == ["nats-1:4222", "nats-2:4222", "nats-3:4222"]
        assert "@mosquitto:1883" in env["PIPELINE_MQTT_URL"]
        assert "@postgres:5432/" in env["PIPELINE_DATABASE_URL"]


def test_compose_ships_no_secret_and_mounts_files_that_exist() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    for secret in (
        "BRIDGE_PASSWORD",
        "POSTGRES_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "NATS_PIPELINE_PASSWORD",
    ):
        assert re.search(rf"\$\{{{secret}:\?", text), f"{secret} must be required, not defaulted"
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source


def test_compose_mosquitto_uses_the_shipped_config_acl_and_generated_passwords() -> None:
    services = compose()["services"]
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    password_file = re.search(r"^password_file (\S+)", conf, re.M)
    acl_file = re.search(r"^acl_file (\S+)", conf, re.M)
    assert password_file
    assert acl_file
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["mosquitto"]["volumes"]}
    assert mounts[acl_file.group(1)] == "./mosquitto/acl"
    secrets_dir = str(Path(password_file.group(1)).parent)
    writer = services["mosquitto-passwords"]
    assert any(v.endswith(f":{secrets_dir}") for v in writer["volumes"])
    assert password_file.group(1) in "\n".join(writer["entrypoint"])


def test_prometheus_scrapes_every_stage_service_on_the_workers_http_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "messwerte")
    sd = job["dns_sd_configs"][0]
    assert set(sd["names"]) == set(STAGE_NAMES)
    port = compose()["services"]["persist"]["environment"]["PIPELINE_HTTP_PORT"]
    assert sd["port"] == int(port)
    assert job["metrics_path"] == "/metrics"


def test_grafana_dashboard_queries_only_metrics_the_workers_export() -> None:
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "messwerte.json").read_text())
    known = metric_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(?:zev|pipeline)_[a-z_]+", target["expr"]))
    assert used <= known, used - known
    # What the issue asks the dashboard to show: throughput, lag, rejects, aggregation, retries.
    for metric in (
        "pipeline_stage_messages_in_total",
        "pipeline_consumer_pending_messages",
        "pipeline_rejects_total",
        "zev_aggregation_runs_total",
        "zev_aggregation_duration_seconds_bucket",
        "pipeline_retry_queue_depth",
    ):
        assert metric in used, metric


def test_bess_dashboard_shows_the_fleet_from_exported_metrics_and_the_interval_table() -> None:
    sources = {
        d["uid"]: d
        for f in (DEPLOY / "grafana" / "provisioning" / "datasources").glob("*.yml")
        for d in yaml.safe_load(f.read_text())["datasources"]
    }
    assert "$MESSWERTE_DB_PASSWORD" in str(sources["messwerte-db"]["secureJsonData"])
    grafana_env = compose()["services"]["grafana"]["environment"]
    assert grafana_env["MESSWERTE_DB_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "bess.json").read_text())
    assert dashboard["title"] == "BESS fleet"
    known = metric_names()
    used, tables = set(), set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in sources
        for target in panel["targets"]:
            if "expr" in target:
                used |= set(re.findall(r"\b(?:zev|pipeline|bess)_[a-z_]+", target["expr"]))
            else:
                tables |= set(re.findall(r"FROM (\w+)", target["rawSql"]))
                assert "energy_" in target["rawSql"]
    assert used <= known, used - known
    assert tables == {"bess_interval"}
    for metric in (
        "bess_soc_percent",
        "bess_power_kw",
        "bess_cell_temperature_max_celsius",
        "bess_alarms_active",
        "pipeline_api_requests_total",
    ):
        assert metric in used, metric


def test_kubernetes_workers_probe_health_and_take_config_from_configmap_and_secret() -> None:
    docs = k8s_docs()
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert set(config["data"]) | set(secret["stringData"]) <= SETTINGS
    port = int(config["data"]["PIPELINE_HTTP_PORT"])
    deployments = {
        d["spec"]["template"]["spec"]["containers"][0]["args"][-1]: d
        for d in docs
        if d["kind"] == "Deployment"
    }
    assert set(deployments) == set(STAGE_NAMES)
    for stage, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ["run", "--mode", "split", "--stage", stage]
        refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert refs == {config["metadata"]["name"], secret["metadata"]["name"]}
        assert container["ports"][0]["containerPort"] == port
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    for deployment in deployments.values():
        # Design §14: every stage survives the loss of a replica and a node drain.
        assert deployment["spec"]["replicas"] >= 2
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] in budgets


def test_kubernetes_nats_is_a_three_node_statefulset_named_as_the_routes() -> None:
    docs = k8s_docs()
    nats = next(d for d in docs if d["kind"] == "StatefulSet")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["ordinals"]["start"] == 1  # pods nats-1 … nats-3, as the routes say
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "nats")
    assert service["spec"]["clusterIP"] == "None"
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert config["data"]["PIPELINE_STREAM_REPLICAS"] == "3"
    urls = secret["stringData"]["PIPELINE_NATS_URL"].split(",")
    assert [u.rsplit("@", 1)[1] for u in urls] == [f"nats-{n}.nats:4222" for n in (1, 2, 3)]


def test_compose_runs_three_nats_nodes_and_two_replicas_of_every_stage() -> None:
    services = compose()["services"]
    for node in ("nats-1", "nats-2", "nats-3"):
        assert services[node]["command"] == ["-c", "/etc/nats/nats-cluster.conf"]
        assert services[node]["networks"]["default"]["aliases"] == [f"{node}.nats"]
    for stage in STAGE_NAMES:
        assert services[stage]["deploy"]["replicas"] >= 2
        assert services[stage]["environment"]["PIPELINE_STREAM_REPLICAS"] == "3"


#: What nats-server reads from its environment in the shipped configurations.
NATS_PASSWORDS = {
    "NATS_PIPELINE_PASSWORD": "p",
    "NATS_ORG_A_PASSWORD": "a",
    "NATS_ORG_B_PASSWORD": "b",
}


def test_nats_cluster_config_is_valid_for_each_of_its_three_nodes(tmp_path: Path) -> None:
    # As deployed (a ConfigMap, or the compose mounts): the file next to tenants.conf.
    conf = tmp_path / "nats-cluster.conf"
    shutil.copy(DEPLOY / "nats" / "cluster" / "nats-cluster.conf", conf)
    shutil.copy(DEPLOY / "nats" / "tenants.conf", tmp_path / "tenants.conf")
    text = conf.read_text()
    routes = re.findall(r"nats-route://(nats-\d)\.", text)
    assert sorted(routes) == ["nats-1", "nats-2", "nats-3"]
    # Acknowledged writes survive crashes of nodes in one flush interval (Jepsen 2025).
    assert re.search(r"^\s*sync_interval:\s*always\s*$", text, re.M)
    for node in routes:
        check = subprocess.run(
            [nats_server_binary(), "-c", str(conf), "-t"],
            capture_output=True,
            text=True,
            env={**os.environ, **NATS_PASSWORDS, "SERVER_NAME": node},
        )
        assert check.returncode == 0, check.stderr + check.stdout


def test_dockerfile_exposes_the_http_and_api_ports_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 8000 8080$", text, re.M)
    assert "PIPELINE_HTTP_PORT=8000" in text
    assert "PIPELINE_API_PORT=8080" in text
    assert re.search(r'^ENTRYPOINT \["pipeline"\]$', text, re.M)


def test_readme_metrics_table_lists_exactly_what_the_workers_export() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `((?:zev|pipeline|bess)_[a-z_]+)` \|", readme, re.M))
    exported = {family.name for family in Metrics().registry.collect()}
    assert {name.removesuffix("_total") for name in listed} == exported
