"""`cirrus status` on a whole cluster (issue 9): every process is listed UP
with its version and queues, a frozen driver worker goes DOWN and comes back,
and one killed with SIGKILL is replaced by the launcher's restart, with a new
pid and start time. Heartbeats every 0.5 s, DOWN after 3 s, so this is quick."""
import signal
from datetime import datetime

import pytest

import cirrus
from tests.e2e.conftest import Cluster
from tests.procs import wait_until

EVERY_PROCESS = {"requests.1": "requests", "scheduler.1": "scheduler",
                 "lifecycle.1": "lifecycle", "flow.1": "flow", "gateway.1": "gateway",
                 "gate.1": "gate", "gate.1/1": "gate", "node-1.1": "node"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    made.env.update({"CIRRUS_STATUS_HEARTBEAT_INTERVAL": "0.5",
                     "CIRRUS_STATUS_DOWN_AFTER": "3",
                     "CIRRUS_GATE_PROCESSES": "2"})     # a forked gate child beats too
    try:
        yield made.start()
    finally:
        made.stop()


def instances(cluster):
    return {i["name"]: i for i in cluster.json("status")["instances"]}


def when_all_up(cluster):
    def up():
        found = instances(cluster)
        ready = all(found.get(name, {}).get("state") == "UP" for name in EVERY_PROCESS)
        # the first beat of a Nameko service comes before it consumes anything
        return ready and found["lifecycle.1"]["queues"] and found
    return wait_until(up, timeout=30, interval=0.5, what="every process UP")


def test_every_process_is_up_with_its_version_and_queues(cluster):
    found = when_all_up(cluster)
    for name, service in EVERY_PROCESS.items():
        assert (found[name]["service"], found[name]["version"]) == (service, cirrus.__version__)
        assert found[name]["uptime_seconds"] > 0 and found[name]["last_seen_seconds"] < 3
    assert found["node-1.1"]["pid"] == cluster.pids("node-1.1")
    node = found["node-1.1"]
    assert (node["hosts"], node["host_count"], node["queue_count"]) == (["node-1"], 1, 1)
    [queue] = node["queues"]
    assert queue["name"] == "cirrus.node.node-1" and queue["consumers"] == 1
    assert isinstance(queue["messages"], int) and not queue["missing"]
    lifecycle = {q["name"]: q for q in found["lifecycle.1"]["queues"]}
    assert lifecycle["rpc-lifecycle"]["consumers"] >= 1
    assert found["gate.1/1"]["pid"] != found["gate.1"]["pid"]
    assert found["gateway.1"]["queues"] == []       # it consumes only queues of its own
    table = cluster.cli("status", "--service", "node").stdout
    assert "node-1.1" in table and "cirrus.node.node-1" in table and "lifecycle.1" not in table


def test_a_frozen_worker_goes_down_and_comes_back(cluster):
    before = when_all_up(cluster)["node-1.1"]
    pid = cluster.kill("node-1.1", signal.SIGSTOP)
    try:
        down = wait_until(lambda: (i := instances(cluster)["node-1.1"])["state"] == "DOWN" and i,
                          timeout=15, interval=0.5, what="node-1.1 DOWN")
    finally:
        cluster.kill("node-1.1", signal.SIGCONT)
    assert down["pid"] == pid and down["last_seen_seconds"] > 3
    back = wait_until(lambda: (i := instances(cluster)["node-1.1"])["state"] == "UP" and i,
                      timeout=15, interval=0.5, what="node-1.1 UP again")
    assert (back["pid"], back["started_at"]) == (pid, before["started_at"])


def test_a_killed_worker_is_replaced_with_a_new_start(cluster):
    before = when_all_up(cluster)["node-1.1"]
    old_pid = cluster.kill("node-1.1", signal.SIGKILL)

    def replaced():
        now = instances(cluster)["node-1.1"]
        return now["pid"] != old_pid and now["state"] == "UP" and now
    after = wait_until(replaced, timeout=30, interval=0.5, what="node-1.1 restarted")
    assert after["pid"] == cluster.pids("node-1.1")
    assert datetime.fromisoformat(after["started_at"]) > \
        datetime.fromisoformat(before["started_at"])
    assert after["uptime_seconds"] < before["uptime_seconds"] + 30
