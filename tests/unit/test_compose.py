"""docker-compose.yml, as Debian's docker-compose reads it (these machines have no
Docker engine, but `docker-compose config` parses and validates without one)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CIRRUS = {"migrate", "requests", "scheduler", "lifecycle", "gateway", "gate", "node-1", "node-2",
          "hosts"}
SCALABLE = {"requests", "scheduler", "lifecycle"}
ENV = {
    "CIRRUS_AMQP_URI": "amqp://guest:guest@rabbitmq:5672/",
    "CIRRUS_DATABASE_URL": "postgresql+psycopg2://postgres:cirrus@postgres:5432/cirrus",
}


@pytest.fixture(scope="module")
def compose():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (deploy/setup.sh installs it)")
    result = subprocess.run([binary, "--project-directory", str(REPO), "-f",
                             str(REPO / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_it_has_the_broker_the_database_and_every_cirrus_process(compose):
    assert set(compose["services"]) >= CIRRUS | {"rabbitmq", "postgres"}


def test_broker_and_database_have_healthchecks_the_others_wait_for(compose):
    services = compose["services"]
    for infra in ("rabbitmq", "postgres"):
        assert services[infra]["healthcheck"]["test"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in SCALABLE | {"gateway", "node-1", "node-2"}:
        depends = services[name]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name


def test_every_cirrus_service_runs_from_the_one_image_and_dockerfile(compose):
    for name in CIRRUS:
        service = compose["services"][name]
        assert service["image"] == "cirrus:dev", name
        assert Path(service["build"]["context"]) == REPO, name
        assert service["build"].get("dockerfile", "Dockerfile") == "Dockerfile", name
    assert (REPO / "Dockerfile").exists()


def test_configuration_is_through_cirrus_environment(compose):
    for name in CIRRUS:
        env = compose["services"][name]["environment"]
        assert {k: env[k] for k in ENV} == ENV, name
    assert compose["services"]["gateway"]["environment"]["CIRRUS_GATEWAY_ADDRESS"] == "0.0.0.0"


def test_scalable_services_have_no_fixed_name_or_host_port(compose):
    for name in SCALABLE:
        service = compose["services"][name]
        assert "container_name" not in service, name
        assert "ports" not in service, name


def test_gateway_is_published_and_the_nodes_run_the_embedded_driver(compose):
    services = compose["services"]
    assert [(p["published"], p["target"]) for p in services["gateway"]["ports"]] == [(50051, 50051)]
    assert [(p["published"], p["target"]) for p in services["gate"]["ports"]] == [(5030, 5030)]
    assert services["gate"]["environment"]["CIRRUS_GATE_ADDRESS"] == "0.0.0.0"
    for node in ("node-1", "node-2"):
        assert services[node]["command"] == [
            "cirrus-node", "--host", node, "--uri", "test:///default"]


def test_one_shots_migrate_and_register_both_hosts(compose):
    services = compose["services"]
    assert services["migrate"]["command"] == ["cirrus", "db", "upgrade"]
    hosts = services["hosts"]
    assert hosts["command"][:2] == ["cirrus-launch", "--hosts-only"]
    assert hosts["command"][hosts["command"].index("--nodes") + 1] == "node-1,node-2"
    assert hosts["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert services["gateway"]["healthcheck"]["test"]
    for one_shot in ("migrate", "hosts"):
        assert services[one_shot]["restart"] == "no"
