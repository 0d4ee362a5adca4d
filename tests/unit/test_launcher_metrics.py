"""cirrus-launch's metrics ports and Prometheus targets file."""
import io
import json
import socket
import sys

import pytest

from cirrus.launcher import (Console, LaunchError, ProcessSpec, Supervisor, cluster_specs,
                             free_ports, metrics_ports, metrics_targets, serve_metrics)
from tests.procs import wait_until

PY = sys.executable


def test_one_of_each_gets_the_ports_of_its_service_in_start_order():
    ports = metrics_ports(cluster_specs(None, ["node-1"]), 9400)
    assert ports == {"requests.1": 9401, "scheduler.1": 9402, "lifecycle.1": 9403,
                     "flow.1": 9404, "gateway.1": 9405, "gate.1": 9406, "node-1.1": 9407}


def test_scaled_services_and_a_gate_of_several_processes_shift_what_follows():
    specs = cluster_specs({"lifecycle": 2}, ["n1", "n2"], simulate=(10, "sim"))
    ports = metrics_ports(specs, 10000, gate_processes=3)
    assert ports["lifecycle.1"] == 10003 and ports["lifecycle.2"] == 10004
    assert ports["gate.1"] == 10007         # and its processes 10008, 10009
    assert [ports["n1.1"], ports["n2.1"], ports["simulator.1"]] == [10010, 10011, 10012]


def test_base_zero_picks_free_ports_a_gate_a_run_of_them():
    ports = metrics_ports(cluster_specs(None, ["n1"]), 0, gate_processes=2)
    assert len(set(ports.values())) == len(ports) and 0 not in ports.values()
    for port in (ports["gate.1"], ports["gate.1"] + 1, ports["n1.1"]):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))      # still free: nothing kept them


def test_free_ports_are_consecutive():
    first = free_ports(3)
    socks = [socket.socket() for _ in range(3)]
    try:
        for offset, sock in enumerate(socks):
            sock.bind(("127.0.0.1", first + offset))
    finally:
        for sock in socks:
            sock.close()


def test_a_base_too_high_for_the_cluster_is_refused_naming_the_process():
    with pytest.raises(LaunchError, match="--metrics-port 65531: gateway.1 would get port 65536"):
        metrics_ports(cluster_specs(None, ["node-1"]), 65531)


def test_targets_name_every_process_and_its_service():
    specs = cluster_specs(None, ["n1"], simulate=(5, "sim"))
    groups = metrics_targets(specs, metrics_ports(specs, 9400, 2), 2, "127.0.0.1")
    found = {g["labels"]["instance"]: (g["targets"], g["labels"]["cirrus_service"])
             for g in groups}
    assert found["gate.1"] == (["127.0.0.1:9406"], "gate")
    assert found["gate.1/1"] == (["127.0.0.1:9407"], "gate")
    assert found["n1.1"] == (["127.0.0.1:9408"], "node")
    assert found["simulator.1"] == (["127.0.0.1:9409"], "node")
    assert len(found) == 9


def test_serve_metrics_writes_the_targets_file_from_the_configuration(tmp_path):
    path = tmp_path / "deeper" / "targets.json"
    cfg = {"metrics": {"base_port": 9500, "address": "0.0.0.0", "targets_file": str(path)},
           "gate": {"processes": 2}}
    specs = cluster_specs(None, ["n1"])
    ports = serve_metrics(specs, cfg)
    assert ports["requests.1"] == 9501 and ports["n1.1"] == 9508
    groups = json.loads(path.read_text())
    assert groups == metrics_targets(specs, ports, 2, "127.0.0.1")
    assert not list(path.parent.glob("*.tmp"))
    assert serve_metrics(specs, cfg, base=9600, targets_file=str(tmp_path / "b.json")) \
        ["requests.1"] == 9601


def test_each_instance_gets_its_own_variables():
    output = io.StringIO()
    printer = [PY, "-c", "import os, time; print('port', os.environ['CIRRUS_METRICS_PORT'], "
               "flush=True); time.sleep(120)"]
    sup = Supervisor([ProcessSpec("printer", printer, count=2)], Console(output),
                     instance_env={"printer.1": {"CIRRUS_METRICS_PORT": "9411"},
                                   "printer.2": {"CIRRUS_METRICS_PORT": "9412"}}).start()
    try:
        wait_until(lambda: output.getvalue().count("port") == 2, 10, 0.05, "both printed")
    finally:
        sup.stop(timeout=2)
    assert "printer.1 | port 9411" in output.getvalue()
    assert "printer.2 | port 9412" in output.getvalue()


def test_deploy_prometheus_reads_the_targets_file_the_launcher_writes():
    import yaml
    from cirrus import config
    scrape_config, = yaml.safe_load((config.REPO_ROOT / "deploy" / "prometheus.yml")
                                    .read_text())["scrape_configs"]
    written = config.load(environ={})["metrics"]["targets_file"]
    assert scrape_config["file_sd_configs"][0]["files"] == [written]
