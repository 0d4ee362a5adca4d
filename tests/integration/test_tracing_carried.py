"""Request ids across the broker and the database: a service call's request id
reaches the events its outbox publishes, a driver command carries it and its
result brings it back, and batched work moves each VM under its own."""
import json
import logging
import socket
import uuid

import pytest
from kombu import Connection, Consumer, Queue
from nameko.standalone.rpc import ClusterRpcProxy
from sqlalchemy import select

from cirrus import logs, messages, tracing
from cirrus.db.models import Host, Outbox, VirtualMachine
from cirrus.errors import FailedPrecondition
from services.lifecycle import logic
from tests.broker import join_node
from tests.node_worker import Bus, a_vm, start_node  # noqa: F401 (fixture)
from tests.procs import start_services, wait_until
from tests.vm_devices import admin_id, factory, host, outbox_commands  # noqa: F401 (fixtures)


def sent(s, vm_id):
    """(kind, what, request id) of what the outbox holds for a VM, in order."""
    out = []
    for row in s.scalars(select(Outbox).order_by(Outbox.id)):
        if row.exchange == messages.COMMANDS.name:
            out.extend(("command", cmd["action"], cmd["request_id"])
                       for cmd in messages.commands_in(row.payload) if cmd["vm_id"] == vm_id)
        elif row.routing_key.startswith(messages.VM_STATE + "."):
            # a change in a message of several names its own request
            out.extend(("event", event["status"],
                        event.get(tracing.KEY) or row.headers.get(tracing.HEADER))
                       for event in messages.events_in(row.payload) if event["id"] == vm_id)
    return out


def committed(factory, work):
    """Run ``work(session)`` in a transaction, then write the lines it held."""
    with factory() as s:
        with s.begin():
            answer = work(s)
        tracing.committed(s)
    return answer


def test_batched_work_moves_each_vm_under_its_own_request(factory, admin_id, host, caplog):
    made = {}
    for name in ("a", "b"):
        with tracing.bound(f"create-{name}"):
            made[name] = committed(factory, lambda s: logic.allocate(
                s, admin_id, f"trace-{name}", 1, 1, 64, {}).id)
    with factory() as s:
        assert {vm_id: s.get(VirtualMachine, vm_id).last_request_id
                for vm_id in made.values()} == {made["a"]: "create-a", made["b"]: "create-b"}
    with caplog.at_level(logging.INFO, logger="cirrus.lifecycle"):
        with tracing.bound("the-scheduler-pass"):
            committed(factory, lambda s: logic.deploy_many(s, [[made["a"], host],
                                                              [made["b"], host]]))
        with factory() as s:
            clones = {cmd["vm_id"]: cmd for cmd in outbox_commands(s)
                      if cmd["action"] == "clone" and cmd["vm_id"] in made.values()}
        with tracing.bound("one-result-handler"):    # its batch holds both results
            committed(factory, lambda s: logic.handle_results(
                s, [messages.result(clone, True) for clone in clones.values()]))
        with tracing.bound("terminate-a"), pytest.raises(FailedPrecondition):
            committed(factory, lambda s: logic.vm_action(s, made["a"], "terminate"))
    with factory() as s:
        assert sent(s, made["a"]) == [
            ("event", "PENDING", "create-a"), ("command", "clone", "create-a"),
            ("event", "PROLOG", "create-a"), ("command", "deploy", "create-a"),
            ("event", "BOOT", "create-a")]
        assert sent(s, made["b"]) == [
            ("event", "PENDING", "create-b"), ("command", "clone", "create-b"),
            ("event", "PROLOG", "create-b"), ("command", "deploy", "create-b"),
            ("event", "BOOT", "create-b")]
        # a BOOT VM cannot be terminated: the refused action left it as it was
        assert s.get(VirtualMachine, made["a"]).last_request_id == "create-a"
    lines = [(r.vm_id, r.request_id, r.getMessage()) for r in caplog.records
             if r.name == "cirrus.lifecycle"]
    assert lines == [
        (made["a"], "create-a", f"VM {made['a']}: PENDING -> PROLOG (deploy); clone sent to "
                                f"{host_name(factory, host)}"),
        (made["b"], "create-b", f"VM {made['b']}: PENDING -> PROLOG (deploy); clone sent to "
                                f"{host_name(factory, host)}"),
        (made["a"], "create-a", f"VM {made['a']}: PROLOG -> BOOT (prolog_success); deploy "
                                f"sent to {host_name(factory, host)}"),
        (made["b"], "create-b", f"VM {made['b']}: PROLOG -> BOOT (prolog_success); deploy "
                                f"sent to {host_name(factory, host)}")]


def host_name(factory, host_id):
    with factory() as s:
        return s.get(Host, host_id).name


def test_a_user_action_takes_the_vm_to_its_request(factory, admin_id):
    with tracing.bound("create-c"):
        vm_id = committed(factory, lambda s: logic.allocate(s, admin_id, "c", 1, 1, 64, {},
                                                            hold=True).id)
    with tracing.bound("release-c"):
        committed(factory, lambda s: logic.vm_action(s, vm_id, "release"))
    with factory() as s:
        assert s.get(VirtualMachine, vm_id).last_request_id == "release-c"
        assert sent(s, vm_id) == [("event", "HOLD", "create-c"), ("event", "PENDING", "release-c")]


# ---------------------------------------------------------------- through the broker

class Listener:
    """Messages of one exchange and routing key, with their headers; a
    message of several VM state changes is taken change by change."""

    def __init__(self, amqp_uri, exchange, routing_key):
        self.conn = Connection(amqp_uri)
        self.got = []
        queue = Queue(exchange=exchange, routing_key=routing_key, exclusive=True,
                      auto_delete=True)
        self.consumer = Consumer(self.conn, [queue], accept=["json"], callbacks=[
            lambda body, message: (self.got.extend((one, message.headers)
                                                   for one in messages.events_in(body)),
                                   message.ack())])
        self.consumer.consume()

    def wait_for(self, match, timeout=20):
        def found():
            try:
                self.conn.drain_events(timeout=0.2)
            except socket.timeout:
                pass
            return next(((body, headers) for body, headers in self.got if match(body)), None)
        return wait_until(found, timeout, interval=0, what="a matching message")

    def close(self):
        self.conn.release()


@pytest.fixture(scope="module")
def lifecycle_logs(cirrus_env, tmp_path_factory):
    """lifecycle as a process writing its log file into a directory of its own."""
    log_dir = tmp_path_factory.mktemp("logs")
    env = {**cirrus_env, "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "600",
           "CIRRUS_LOGGING_DIR": str(log_dir), "CIRRUS_INSTANCE": "lifecycle.7"}
    [proc] = start_services(["lifecycle"], env, tmp_path_factory.mktemp("lc"))
    yield log_dir
    proc.stop()


def test_a_calls_request_id_reaches_the_events_and_commands_it_causes(lifecycle_logs,
                                                                      amqp_uri):
    events = Listener(amqp_uri, messages.event_exchange(messages.LIFECYCLE),
                      messages.VM_STATE_ANY[0])
    request_id = f"svc-{uuid.uuid4().hex[:8]}"
    rpc_config = {"AMQP_URI": amqp_uri, "serializer": "json"}
    try:
        with ClusterRpcProxy(rpc_config) as plain:
            node, host = join_node(plain.lifecycle, amqp_uri, f"trace-{uuid.uuid4().hex[:6]}")
        with ClusterRpcProxy(rpc_config, context_data={"request_id": request_id}) as proxy:
            vm = proxy.lifecycle.allocate(1, "traced", 0.1, 1, 64, {})
            assert proxy.lifecycle.deploy(vm["id"], host["id"])["outcome"] == "deployed"
        body, headers = events.wait_for(lambda b: b["id"] == vm["id"] and b["status"] == "PENDING")
        assert headers[tracing.HEADER] == request_id
        clone = node.next_command()
        assert (clone["action"], clone["request_id"]) == ("clone", request_id)
        # the node's answer, and the next command, keep the request
        node.publish(messages.COMMAND_RESULT, messages.result(clone, True))
        deploy = node.next_command()
        assert (deploy["action"], deploy["request_id"]) == ("deploy", request_id)
        body, headers = events.wait_for(lambda b: b["id"] == vm["id"] and b["status"] == "BOOT")
        assert headers[tracing.HEADER] == request_id
    finally:
        events.close()
    lines = wait_until(lambda: [r for r in logs.gather(request_id, logs.sources(
        [str(lifecycle_logs)], None))[0] if r.get("vm_id") == vm["id"]], what="log lines")
    assert {line["instance"] for line in lines} == {"lifecycle.7"}
    assert any("PENDING -> PROLOG (deploy); clone sent to" in line["msg"] for line in lines)
    assert (lifecycle_logs / "lifecycle.7.jsonl").exists()


class HeaderBus(Bus):
    """The node's events with their headers too."""

    def _got(self, body, message):
        self.headers = getattr(self, "headers", [])
        self.headers.append((body, message.headers))
        super()._got(body, message)


def test_a_driver_command_carries_its_request_and_the_result_brings_it_back(start_node,
                                                                            amqp_uri):
    bus = HeaderBus(amqp_uri)
    host = f"node-{uuid.uuid4().hex[:6]}"
    node = start_node(host)
    try:
        vm = a_vm()
        cmd = bus.send(host, messages.command("deploy", vm["id"], host, "drv-req", vm=vm))
        result = bus.result(cmd)
        assert result["success"] and result["request_id"] == "drv-req"
        # the node's command.results message; holding one result, it carries its request id
        [headers] = [h for body, h in bus.headers
                     if any(r["command_id"] == cmd["id"] for r in body.get("results", ()))]
        assert headers[tracing.HEADER] == "drv-req"
        # the domain starting is reported as a request of its own
        event = bus.wait_for(lambda k, b: k == messages.VM_EVENT and b["vm_id"] == vm["id"])
        assert event["request_id"] and event["request_id"] != "drv-req"
    finally:
        bus.close()
    done = [logs.parse_line(text) for text in node.output().splitlines()
            if "deploy of VM" in text]
    assert [(d["request_id"], d["vm_id"], d["service"]) for d in done] == [
        ("drv-req", vm["id"], "node")]
    assert json.loads(json.dumps(done[0]))["msg"] == f"deploy of VM {vm['id']} done"
