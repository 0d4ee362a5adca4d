"""A cirrus-node worker as tests drive it: the process, and the test's side
of the broker (commands in, node events out)."""
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
                                     (messages.COMMAND_RESULTS, messages.HOST_MONITOR,
                                                         messages.VM_EVENT)])
        self.received = []
        self.result_messages = []   # how many results each command.results message held
        self.consumer = Consumer(self.channel, queues=[self.queue], callbacks=[self._got],
                                 accept=["json"])
        self.consumer.consume()

    def _got(self, body, message):
        key = message.delivery_info["routing_key"]
        if key == messages.COMMAND_RESULTS:     # a batch counts as each of its results
            self.result_messages.append(len(body["results"]))
            self.received.extend((messages.COMMAND_RESULT, result) for result in body["results"])
        else:
            self.received.append((key, body))
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
        self.env = env
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

    def start(host, *extra, env=None):
        node = Node({**cirrus_env, **(env or {})}, host, tmp_path, *extra)
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


def run_ok(bus, host, vm, action, timeout=15, **args):
    """Send one command and return the info of its successful result."""
    cmd = bus.send(host, messages.command(action, vm["id"], host, vm=vm, **args))
    result = bus.result(cmd, timeout)
    assert result["success"], result
    return result["info"]


def vm_states(report):
    return {v["VM_ID"]: v["STATE"] for v in report["monitoring"]["VMS"]}
