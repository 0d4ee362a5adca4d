"""Every process of a cluster serves /metrics: each answers as itself, and
after a few VMs are created through the CLI and a few guests call the gate,
the key series of each have moved. Lifecycle runs twice and the gate as two
processes, so the work of scaled instances shows in each one's own series."""
import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import Cluster
from tests.scrape import scrape, total

VMS = 3
GATE_CALLS = 12
PROCESSES = {"requests.1", "scheduler.1", "lifecycle.1", "lifecycle.2", "flow.1", "gateway.1",
             "gate.1", "gate.1/1", "node-1.1"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), scale="lifecycle=2")
    cluster.env["CIRRUS_GATE_PROCESSES"] = "2"
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def scrape_all(cluster):
    return {name: scrape(url) for name, url in cluster.metrics_urls().items()}


def call_gate(cluster):
    """A guest without a token: refused (401), on a new connection each time
    so that both gate processes answer some."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{cluster.gate_port}/vm", timeout=10)
    except urllib.error.HTTPError as refused:
        return refused.code
    return 200


def moved(before, after, name, **labels):
    return total(after, name, **labels) - total(before, name, **labels)


def test_every_process_serves_its_metrics_and_the_key_series_move(cluster):
    before = scrape_all(cluster)
    assert set(before) == PROCESSES
    for name, samples in before.items():
        (labels, value), = samples["cirrus_instance_info"]
        assert (labels["name"], value) == (name, 1.0)

    # the CLI creates through RequestService.SubmitVm
    ids = [cluster.create_vm("--name", f"metrics-{i}", "--cpu", "0.1", "--memory", "32")
           for i in range(VMS)]
    cluster.wait_status(ids, "RUNNING", timeout=90)
    assert {call_gate(cluster) for _ in range(GATE_CALLS)} == {401}
    after = scrape_all(cluster)

    gateway = before["gateway.1"], after["gateway.1"]
    assert moved(*gateway, "cirrus_grpc_calls_total",
                 method="cirrus.v1.RequestService/SubmitVm", code="OK") == VMS
    assert moved(*gateway, "cirrus_grpc_seconds_count",
                 method="cirrus.v1.RequestService/SubmitVm") == VMS

    requests = before["requests.1"], after["requests.1"]
    assert moved(*requests, "cirrus_rpc_calls_total", service="requests", outcome="ok") >= VMS
    assert moved(*requests, "cirrus_rpc_seconds_count", service="requests") >= VMS

    scheduler = before["scheduler.1"], after["scheduler.1"]
    assert moved(*scheduler, "cirrus_scheduling_seconds_count") == VMS
    assert moved(*scheduler, "cirrus_events_handled_total", service="scheduler",
                 event="lifecycle.vm.state", outcome="ok") >= VMS

    # both lifecycles did some of the work; each reads the same VMs from the database
    for name in ("lifecycle.1", "lifecycle.2"):
        lifecycle = before[name], after[name]
        assert moved(*lifecycle, "cirrus_rpc_calls_total", service="lifecycle") + \
            moved(*lifecycle, "cirrus_events_handled_total", service="lifecycle") > 0, name
        assert total(after[name], "cirrus_vms", status="RUNNING") == VMS
        assert total(after[name], "cirrus_vms", status="PENDING") == 0
        assert total(after[name], "cirrus_outbox_rows_waiting") >= 0
    lifecycles = [(before[name], after[name]) for name in ("lifecycle.1", "lifecycle.2")]
    # results ready together come in one message: at least one, at most one per result
    assert 0 < sum(moved(*pair, "cirrus_events_handled_total", event="node.command.results")
                   for pair in lifecycles) <= 2 * VMS
    assert sum(moved(*pair, "cirrus_outbox_lag_seconds_count") for pair in lifecycles) >= VMS

    # flow's backstop ran; the broker kept these plain VMs' vm.state events from it
    flow = before["flow.1"], after["flow.1"]
    assert moved(*flow, "cirrus_timer_runs_total", service="flow") > 0
    assert moved(*flow, "cirrus_events_handled_total", event="lifecycle.vm.state") == 0

    node = before["node-1.1"], after["node-1.1"]
    assert moved(*node, "cirrus_driver_action_seconds_count", action="deploy",
                 outcome="success") == VMS

    gates = [(before[name], after[name]) for name in ("gate.1", "gate.1/1")]
    assert sum(moved(*pair, "cirrus_gate_requests_total", route="GET /vm", code="401")
               for pair in gates) == GATE_CALLS
