"""The node worker as a process, on the real broker and libvirt's test:///default.

Commands go to the node's durable queue; results and monitoring come back as
Nameko events, read here through an exclusive queue bound to the node events
exchange."""
import datetime
import itertools
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from kombu import Connection, Consumer, Producer, Queue, binding

from cirrus import config, messages

_ids = itertools.count(100)


class Bus:
    """The test's side of the broker: publish commands, collect events."""

    def __init__(self, amqp_uri):
        self.conn = Connection(amqp_uri)
        self.channel = self.conn.channel()
        self.producer = Producer(self.channel)
        events = messages.event_exchange(messages.NODE)
        self.queue = Queue(f"test-node-events-{uuid.uuid4().hex[:6]}", exclusive=True,
                           bindings=[binding(events, routing_key=key) for key in
                                     (messages.COMMAND_RESULT, messages.HOST_MONITOR)])
        self.received = []
        self.consumer = Consumer(self.channel, queues=[self.queue], callbacks=[self._got],
                                 accept=["json"])
        self.consumer.consume()

    def _got(self, body, message):
        self.received.append((message.delivery_info["routing_key"], body))
        message.ack()

    def send(self, host, body, **kwargs):
        queue = messages.node_queue(host)
        self.producer.publish(body, exchange=messages.COMMANDS, routing_key=host,
                              declare=[queue], delivery_mode=2,
                              **({"serializer": "json"} | kwargs))
        return body

    def wait_for(self, match, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key, body in self.received:
                if match(key, body):
                    return body
            try:
                self.conn.drain_events(timeout=0.2)
            except socket.timeout:
                pass
        raise AssertionError(f"no matching event within {timeout} s; got {self.received[-5:]}")

    def result(self, cmd, timeout=15):
        return self.wait_for(lambda key, body: key == messages.COMMAND_RESULT
                             and body["command_id"] == cmd["id"], timeout)

    def results_of(self, cmd):
        return [body for key, body in self.received
                if key == messages.COMMAND_RESULT and body["command_id"] == cmd["id"]]

    def monitor_after(self, host, since, timeout=15):
        return self.wait_for(lambda key, body: key == messages.HOST_MONITOR
                             and body["host"] == host and body["at"] > since, timeout)

    def close(self):
        self.conn.release()


class Node:
    """A cirrus-node process."""

    def __init__(self, env, host, log_dir, *extra):
        self.host = host
        self.log_path = log_dir / f"{host}-{uuid.uuid4().hex[:4]}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.drivers.worker", "--host", host, *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=config.REPO_ROOT)

    def output(self):
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=40)
        self.log.close()
        return self.proc.returncode


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def a_vm(**template):
    return {"id": next(_ids), "name": "w", "cpu": 1, "vcpu": 1, "memory": 64,
            "template": template, "deploy_id": None}


@pytest.fixture
def bus(amqp_uri):
    b = Bus(amqp_uri)
    yield b
    b.close()


@pytest.fixture
def start_node(cirrus_env, tmp_path):
    nodes = []

    def start(host, *extra):
        node = Node(cirrus_env, host, tmp_path, *extra)
        nodes.append(node)
        return node
    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    started = start_node(host)
    # the first monitoring report comes right at start
    bus.wait_for(lambda key, body: key == messages.HOST_MONITOR and body["host"] == host)
    return started


def vm_states(report):
    return {v["VM_ID"]: v["STATE"] for v in report["monitoring"]["VMS"]}


def test_first_monitoring_report_comes_at_start(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    start_node(host)
    report = bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host,
                          timeout=10)
    mon = report["monitoring"]
    assert mon["HYPERVISOR"] == "test"
    assert mon["TOTALCPU"] == 1600 and mon["TOTALMEMORY"] == 3 * 1024 * 1024
    assert mon["FREEMEMORY"] + mon["USEDMEMORY"] == mon["TOTALMEMORY"]
    assert mon["VMS"] == []      # the test driver's own "test" domain is not listed
    # and again every monitor_interval (1 s in the tests)
    bus.monitor_after(host, report["at"], timeout=5)


def test_deploy_poll_shutdown_delete(node, bus):
    vm = a_vm(OS={"KERNEL": "/boot/vmlinuz"})

    def run(action):
        cmd = bus.send(node.host, messages.command(action, vm["id"], node.host, vm=vm))
        result = bus.result(cmd)
        assert result["success"], result
        assert (result["action"], result["vm_id"], result["host"]) == (action, vm["id"], node.host)
        return result["info"]

    assert run("clone")["disks"] == []
    assert run("deploy") == {"deploy_id": f"cirrus-{vm['id']}"}
    vm["deploy_id"] = f"cirrus-{vm['id']}"
    assert run("poll")["STATE"] == "RUNNING"
    assert vm_states(bus.monitor_after(node.host, now_iso()))[vm["id"]] == "RUNNING"
    run("shutdown")
    assert run("poll")["STATE"] == "POWEROFF"
    run("delete")
    assert run("poll") == {"STATE": "GONE"}
    assert vm["id"] not in vm_states(bus.monitor_after(node.host, now_iso()))


def test_a_duplicate_deploy_is_harmless(node, bus):
    vm = a_vm()
    cmd = messages.command("deploy", vm["id"], node.host, vm=vm)
    bus.send(node.host, cmd)
    bus.send(node.host, cmd)
    bus.wait_for(lambda k, b: len(bus.results_of(cmd)) == 2)
    first, second = bus.results_of(cmd)
    assert first["success"] and second["success"]
    assert first["info"] == second["info"] == {"deploy_id": f"cirrus-{vm['id']}"}
    report = bus.monitor_after(node.host, now_iso())
    assert [v["VM_ID"] for v in report["monitoring"]["VMS"]].count(vm["id"]) == 1


def test_bad_commands_get_a_failure_naming_the_problem(node, bus):
    vm = a_vm()
    unknown = bus.send(node.host, {**messages.command("deploy", vm["id"], node.host, vm=vm),
                                   "action": "explode"})
    result = bus.result(unknown)
    assert not result["success"] and "unknown action 'explode'" in result["error"]

    no_vm = bus.send(node.host, {"id": "c-1", "action": "deploy", "vm_id": 1, "host": node.host,
                                 "args": {}})
    assert "args.vm" in bus.result(no_vm)["error"]

    bus.send(node.host, b"{not json", serializer=None, content_type="application/json",
             content_encoding="utf-8")
    garbled = bus.wait_for(lambda k, b: k == messages.COMMAND_RESULT and b["command_id"] is None)
    assert not garbled["success"] and "not a JSON object" in garbled["error"]

    # and the worker is still serving
    ok = bus.send(node.host, messages.command("poll", vm["id"], node.host, vm=vm))
    assert bus.result(ok)["success"]


def test_driver_failures_carry_their_message(node, bus):
    missing = a_vm(DISK={"SOURCE": "/nonexistent/cirrus/base.img"})
    clone = bus.send(node.host, messages.command("clone", missing["id"], node.host, vm=missing))
    result = bus.result(clone)
    assert not result["success"]
    assert "/nonexistent/cirrus/base.img" in result["error"]

    refused = a_vm(OS={"ARCH": "bogus"})
    deploy = bus.send(node.host, messages.command("deploy", refused["id"], node.host, vm=refused))
    result = bus.result(deploy)
    assert not result["success"]
    assert "Unknown architecture bogus" in result["error"]


def test_a_command_sent_while_the_worker_is_down_runs_when_it_starts(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    vm = a_vm()
    cmd = bus.send(host, messages.command("deploy", vm["id"], host, vm=vm))
    time.sleep(0.5)
    assert bus.results_of(cmd) == []
    start_node(host)
    assert bus.result(cmd)["info"] == {"deploy_id": f"cirrus-{vm['id']}"}


def test_a_command_the_worker_dies_on_is_redelivered(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    first = start_node(host, "--backend", "simulated", "--sim-delay", "3")
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    vm = a_vm()
    cmd = bus.send(host, messages.command("deploy", vm["id"], host, vm=vm))
    time.sleep(1)               # the command is running...
    first.stop(signal.SIGKILL)  # ...when the worker dies
    assert bus.results_of(cmd) == []
    second = start_node(host, "--backend", "simulated")
    result = bus.result(cmd)
    assert result["success"] and result["info"] == {"deploy_id": f"cirrus-{vm['id']}"}
    assert "redelivered command " + cmd["id"] in second.output()


def test_sigterm_stops_it_cleanly(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    node = start_node(host)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    assert node.stop(signal.SIGTERM) == 0
    assert "stopped" in node.output()


def broker_connections(name):
    """rabbitmqctl's ids of the connections a client opened under ``name``."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                            capture_output=True, text=True, check=True).stdout
    pids = [line.split()[0] for line in listed.splitlines() if name in line]
    assert pids, f"no broker connection named {name}"
    return pids


def close_broker_connections(pids):
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: broker went away"],
                       check=True, capture_output=True)


def test_it_reconnects_when_the_broker_drops_it(node, bus):
    close_broker_connections(broker_connections(f"cirrus-node:{node.host}"))
    vm = a_vm()
    cmd = bus.send(node.host, messages.command("deploy", vm["id"], node.host, vm=vm))
    assert bus.result(cmd, timeout=20)["success"]
    assert "reconnecting" in node.output()


def test_a_command_running_when_the_broker_drops_it_is_answered(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    node = start_node(host, "--backend", "simulated", "--sim-delay", "3")
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    connections = broker_connections(f"cirrus-node:{host}")
    vm = a_vm()
    cmd = bus.send(host, messages.command("deploy", vm["id"], host, vm=vm))
    time.sleep(0.3)
    close_broker_connections(connections)   # while the command runs
    assert bus.results_of(cmd) == []
    # answered once when it finishes, and again when its delivery, unacked on
    # the lost channel, comes back: lifecycle keeps only the first
    assert bus.result(cmd, timeout=20)["success"]
    bus.wait_for(lambda k, b: len(bus.results_of(cmd)) == 2, timeout=20)
    assert "redelivered command " + cmd["id"] in node.output()
