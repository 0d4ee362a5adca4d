"""Status (issue 9) without a broker: up/down/stopped and uptime, the status
settings, what a heartbeat carries, and `cirrus status` parsing and printing."""
import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from kombu import Queue

from cirrus import heartbeat
from cirrus.config import ConfigError
from cirrus.instance import Identity
from services.requests import status
from tests.unit.test_cli_requests import run

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def ago(seconds):
    return NOW - timedelta(seconds=seconds)


@pytest.mark.parametrize("last_seen, stopped_at, expected", [
    (ago(0), None, "UP"),
    (ago(15), None, "UP"),                  # down_after itself is still up
    (ago(15.1), None, "DOWN"),
    (ago(3600), None, "DOWN"),
    (ago(1), ago(1), "STOPPED"),            # a clean stop, however recent
    (ago(100), ago(100), "STOPPED"),
])
def test_state_from_the_last_heartbeat(last_seen, stopped_at, expected):
    assert status.state(last_seen, stopped_at, NOW, down_after=15) == expected


def test_uptime_runs_to_now_while_up_and_stops_at_the_last_beat_otherwise():
    assert status.uptime(ago(90), ago(2), NOW, "UP") == 90
    assert status.uptime(ago(90), ago(30), NOW, "DOWN") == 60
    assert status.uptime(ago(90), ago(40), NOW, "STOPPED") == 50
    # a sender's clock ahead of the database's: never negative
    assert status.uptime(NOW + timedelta(seconds=2), NOW, NOW, "UP") == 0


def test_status_settings_have_defaults_and_name_a_bad_key():
    assert heartbeat.settings({}) == {"heartbeat_interval": 5, "down_after": 15,
                                      "forget_after": 3600}
    assert heartbeat.settings({"status": {"heartbeat_interval": 0.5, "down_after": 2}}) == \
        {"heartbeat_interval": 0.5, "down_after": 2, "forget_after": 3600}
    with pytest.raises(ConfigError, match=r"status.down_after: 'soon' is not a number"):
        heartbeat.settings({"status": {"down_after": "soon"}})
    with pytest.raises(ConfigError, match=r"status.heartbeat_interval: 0 is not"):
        heartbeat.settings({"status": {"heartbeat_interval": 0}})
    with pytest.raises(ConfigError, match=r"status.down_after \(5 s\) must be above "
                                          r"status.heartbeat_interval \(5 s\)"):
        heartbeat.settings({"status": {"down_after": 5}})


@pytest.fixture
def served():
    yield heartbeat.serving
    heartbeat.serving()


def test_a_heartbeat_names_a_sample_of_many_queues_and_hosts_with_their_counts(served):
    hosts = [f"sim-{i:04d}" for i in range(1, 2501)]
    served([f"cirrus.node.{h}" for h in hosts], hosts)
    who = Identity(service="node", name="simulator.1", host="m1", pid=7, version="0.1.0",
                   started_at=NOW.timestamp())
    beat = heartbeat.payload(who, 3)
    assert (beat["queue_count"], beat["host_count"]) == (2500, 2500)
    assert beat["queues"] == [f"cirrus.node.sim-{i:04d}" for i in range(1, 21)]
    assert beat["hosts"] == hosts[:heartbeat.SAMPLE] and len(json.dumps(beat)) < 2000
    assert (beat["name"], beat["beat"], beat["stopping"]) == ("simulator.1", 3, False)
    assert datetime.fromisoformat(beat["started_at"]) == NOW


def test_nameko_queues_are_the_shared_ones_only():
    extensions = [SimpleNamespace(queue=Queue("rpc-lifecycle", durable=True)),
                  SimpleNamespace(queue=Queue("evt-node-host.monitor--lifecycle.on_monitor")),
                  SimpleNamespace(queue=Queue("rpc.reply-lifecycle-1",
                                              queue_arguments={"x-expires": 300000})),
                  SimpleNamespace(queue=Queue("evt-broadcast", auto_delete=True)),
                  SimpleNamespace(queue=None), SimpleNamespace()]
    containers = [SimpleNamespace(extensions=extensions),
                  SimpleNamespace(extensions=extensions[:1])]
    assert heartbeat.nameko_queues(containers) == [
        "evt-node-host.monitor--lifecycle.on_monitor", "rpc-lifecycle"]


# ----------------------------------------------------------------- the CLI

def instance(name, service, state="UP", queues=(), queue_count=None, **more):
    return {"name": name, "service": service, "state": state, "host": "m1", "pid": 101,
            "version": "0.1.0", "uptime_seconds": 125.0, "last_seen_seconds": 1.5,
            "queues": list(queues), "queue_count": len(queues) if queue_count is None
            else queue_count, "hosts": [], "host_count": 0, **more}


def depth(name, messages=0, consumers=1):
    return {"name": name, "messages": messages, "consumers": consumers, "missing": False}


MISSING = {"name": "cirrus.node.gone", "messages": None, "consumers": None, "missing": True}
STATUS = {"heartbeat_interval": 5.0, "down_after": 15.0, "instances": [
    instance("lifecycle.1", "lifecycle", queues=[depth("rpc-lifecycle", 2)]),
    instance("lifecycle.2", "lifecycle", "DOWN", queues=[depth("rpc-lifecycle", 2)]),
    instance("gateway.1", "gateway"),
    instance("sim.1", "node", queues=[depth("cirrus.node.sim-0001", 4, 1), MISSING],
             queue_count=2500)]}


class Api:
    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def status(self, service=None):
        self.asked.append(service)
        return self.answer


def test_status_prints_each_process_then_each_queue_once(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, Api(STATUS), "status")
    assert (code, err) == (0, "")
    assert out == (
        "NAME         SERVICE    STATE  HOST  PID  VERSION  UPTIME  LAST HEARD  QUEUED\n"
        "lifecycle.1  lifecycle  UP     m1    101  0.1.0    2m05s   1.5s ago    2\n"
        "lifecycle.2  lifecycle  DOWN   m1    101  0.1.0    2m05s   1.5s ago    2\n"
        "gateway.1    gateway    UP     m1    101  0.1.0    2m05s   1.5s ago    -\n"
        "sim.1        node       UP     m1    101  0.1.0    2m05s   1.5s ago    "
        "4 (in 2 of 2500 queues)\n"
        "\n"
        "QUEUE                 MESSAGES  CONSUMERS  INSTANCES\n"
        "cirrus.node.gone      missing   -          sim.1\n"
        "cirrus.node.sim-0001  4         1          sim.1\n"
        "rpc-lifecycle         2         1          lifecycle.1,lifecycle.2\n"
        "\n"
        "heartbeats every 5 s; DOWN after 15 s without one\n")


def test_status_json_and_service_filter(capsys, monkeypatch):
    api = Api(STATUS)
    code, out, _ = run(capsys, monkeypatch, api, "status", "--json", "--service", "node")
    assert code == 0 and json.loads(out) == STATUS and api.asked == ["node"]
    run(capsys, monkeypatch, api, "status")
    assert api.asked == ["node", None]


def test_status_without_any_heartbeat_says_so(capsys, monkeypatch):
    empty = {"heartbeat_interval": 5.0, "down_after": 15.0, "instances": []}
    code, out, _ = run(capsys, monkeypatch, Api(empty), "status")
    assert (code, out) == (0, "no process has sent a heartbeat (is the requests service "
                              "running?)\n")
