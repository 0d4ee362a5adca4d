"""The gRPC gateway over real gRPC, in front of the real requests and
lifecycle services, on the real broker and database."""
import base64
import json
import signal
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cirrus import auth, config, db, messages
from cirrus.client import Client, ClientError
from cirrus.db.models import User
from cirrus.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc
from tests.broker import join_node, rpc_proxy
from tests.procs import Proc, free_port, start_services, wait_until

API = ["cirrus.v1.VirtualMachineService", "cirrus.v1.HostService",
       "cirrus.v1.TemplateService", "cirrus.v1.SessionService"]


def start_gateway(cirrus_env, log_dir):
    port = free_port()
    proc = Proc(["cirrus-gateway"], {**cirrus_env, "CIRRUS_GATEWAY_PORT": str(port)},
                log_dir / f"gateway-{port}.log").start()
    proc.wait_for("gateway listening")
    proc.wait_for("watching vm.state events")
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def services(cirrus_env, logs):
    # no scheduler: a VM stays PENDING until a test deploys it. The test plays the
    # nodes and sends no heartbeat, so hosts must not time out meanwhile.
    procs = start_services(["requests", "lifecycle"],
                           {**cirrus_env, "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "3600"}, logs)
    yield
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(services, cirrus_env, logs):
    proc, address = start_gateway(cirrus_env, logs)
    yield address
    proc.stop()


@pytest.fixture(scope="module")
def admin():
    auth = config.get()["auth"]
    return str(auth["admin_user"]), str(auth["admin_password"])


@pytest.fixture
def api(gateway, admin):
    with Client(gateway, username=admin[0], password=admin[1]) as client:
        yield client


@pytest.fixture
def channel(gateway):
    with grpc.insecure_channel(gateway) as chan:
        yield chan


def basic(user, password):
    return [("authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


def status_of(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as exc_info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)   # a stream fails when read
    return exc_info.value.code(), exc_info.value.details()


# ----------------------------------------------------------------- authentication

def test_missing_or_wrong_credentials_are_unauthenticated(channel, admin):
    hosts = host_pb2_grpc.HostServiceStub(channel)
    vms = vm_pb2_grpc.VirtualMachineServiceStub(channel)
    request = host_pb2.ListHostsRequest()
    code, details = status_of(hosts.List, request)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing authorization" in details
    for metadata, says in [
            ([("authorization", "Bearer not-a-token")], "unknown token"),
            (basic(admin[0], admin[1] + "x"), "wrong username or password"),
            (basic("nobody", "x"), "wrong username or password"),
            ([("authorization", "Basic %%%")], "malformed Basic"),
            ([("authorization", "Digest abc")], "unsupported authorization")]:
        code, details = status_of(hosts.List, request, metadata=metadata)
        assert (code, says in details) == (grpc.StatusCode.UNAUTHENTICATED, True), details
    # a stream is refused before it starts, too
    code, _ = status_of(vms.Watch, vm_pb2.WatchVmsRequest())
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_login_gives_a_token_that_works(gateway, admin):
    with Client(gateway, username=admin[0], password=admin[1]) as client:
        session = client.login()
    assert session["user"]["name"] == admin[0] and session["token"]
    with Client(gateway, token=session["token"]) as client:
        assert isinstance(client.list_hosts(), list)
    with Client(gateway, username=admin[0], password="wrong") as client:
        with pytest.raises(ClientError) as exc_info:
            client.login()
    assert exc_info.value.code == "UNAUTHENTICATED"


def test_the_request_id_comes_back(channel, admin):
    hosts = host_pb2_grpc.HostServiceStub(channel)
    _, call = hosts.List.with_call(host_pb2.ListHostsRequest(),
                                   metadata=basic(*admin) + [("x-request-id", "req-test-1")])
    assert ("x-request-id", "req-test-1") in [(m.key, m.value) for m in call.trailing_metadata()]
    _, call = hosts.List.with_call(host_pb2.ListHostsRequest(), metadata=basic(*admin))
    assert dict((m.key, m.value) for m in call.trailing_metadata())["x-request-id"]
    code, details = status_of(hosts.List, host_pb2.ListHostsRequest(),
                              metadata=basic(*admin) + [("x-request-id", "r" * 65)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("x-request-id")


# ----------------------------------------------------------------- grpcurl's needs

def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", *API]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_and_describes_the_services(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert set(API) | {"grpc.health.v1.Health"} <= services
    watch = DescriptorPool(database).FindServiceByName(
        "cirrus.v1.VirtualMachineService").methods_by_name["Watch"]
    assert watch.server_streaming and watch.output_type.full_name == "cirrus.v1.VmStateChange"


# ----------------------------------------------------------------- hosts

def test_host_create_list_show_and_a_duplicate(api):
    host = api.create_host("gw-node-1")
    assert host["name"] == "gw-node-1" and host["state"] == "INIT" and host["id"] > 0
    assert host["id"] in [h["id"] for h in api.list_hosts()]
    shown = api.get_host(host["id"])
    assert shown["name"] == "gw-node-1" and shown["last_monitored_at"] is None
    with pytest.raises(ClientError) as exc_info:
        api.create_host("gw-node-1")
    assert exc_info.value.code == "ALREADY_EXISTS" and "gw-node-1" in exc_info.value.details
    assert [h["name"] for h in api.list_hosts()].count("gw-node-1") == 1


def test_unknown_ids_are_not_found(api):
    for call in (api.get_vm, api.get_host, api.terminate_vm):
        with pytest.raises(ClientError) as exc_info:
            call(999999)
        assert exc_info.value.code == "NOT_FOUND" and "999999" in exc_info.value.details


# ----------------------------------------------------------------- VMs

def test_a_vm_with_no_memory_is_refused_and_nothing_is_kept(api):
    before = api.list_vms(include_done=True)
    for memory in (0, -1):
        with pytest.raises(ClientError) as exc_info:
            api.create_vm(name="no-memory", cpu=1, vcpu=1, memory=memory)
        assert exc_info.value.code == "INVALID_ARGUMENT"
        assert "memory" in exc_info.value.details.lower()
    assert api.list_vms(include_done=True) == before


def test_a_vm_is_created_and_shown_with_its_history(api):
    vm = api.create_vm(name="gw-held", cpu=0.5, vcpu=1, memory=64, hold=True)
    assert (vm["name"], vm["status"], vm["short_status"], vm["memory"]) == (
        "gw-held", "HOLD", "hold", 64)
    shown = api.get_vm(vm["id"])
    assert shown["host"] is None and shown["history"][-1]["to_status"] == "HOLD"
    assert vm["id"] in [v["id"] for v in api.list_vms()]


def test_a_retried_create_with_the_same_request_id_makes_one_vm(api):
    first = api.create_vm(name="gw-idem", memory=32, hold=True, request_id="gw-idem-1")
    again = api.create_vm(name="gw-idem", memory=32, hold=True, request_id="gw-idem-1")
    assert again["id"] == first["id"]


def test_watch_sends_the_current_state_then_the_changes(api):
    vm = api.create_vm(name="gw-watched", memory=32, hold=True)
    changes = []
    seen_current = threading.Event()

    def read():
        for change in api.watch_vms(vm["id"]):
            changes.append(change)
            seen_current.set()
            if change["status"] == "DONE":
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen_current.wait(10)
    api.terminate_vm(vm["id"])
    reader.join(10)
    assert [(c["status"], c["current"]) for c in changes] == [("HOLD", True), ("DONE", False)]
    assert changes[1]["key"] == f"VM/DONE/LCM_INIT/{vm['id']}"
    assert changes[1]["seq"] > changes[0]["seq"]


def test_watch_of_all_vms_and_wait(api):
    vm = api.create_vm(name="gw-waited", memory=32, hold=True)
    stream = api.watch_vms()
    current = [next(stream) for _ in api.list_vms()]
    assert vm["id"] in [c["id"] for c in current] and all(c["current"] for c in current)
    waiter = threading.Thread(target=lambda: result.append(api.wait_vm(vm["id"], "DONE", 10)))
    result = []
    waiter.start()
    api.terminate_vm(vm["id"])
    change = next(c for c in stream if c["id"] == vm["id"])
    assert change["status"] == "DONE" and not change["current"]
    stream.close()
    waiter.join(15)
    assert result and result[0]["status"] == "DONE"
    with pytest.raises(ClientError) as exc_info:
        api.wait_vm(vm["id"], "RUNNING", 5)
    assert exc_info.value.code == "FAILED_PRECONDITION" and "reached DONE" in exc_info.value.details


def test_watch_of_an_unknown_vm_is_not_found(api):
    with pytest.raises(ClientError) as exc_info:
        next(api.watch_vms(999999))
    assert exc_info.value.code == "NOT_FOUND"


# ----------------------------------------------------------------- VM actions

def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def refused(call, *args, **kwargs):
    """The ClientError of a call expected to fail."""
    with pytest.raises(ClientError) as exc_info:
        call(*args, **kwargs)
    return exc_info.value


@pytest.fixture(scope="module")
def user(gateway, services):
    """A plain user: (name, password)."""
    name, password = unique("gw-ann"), "ann-pw"
    with db.session_factory()() as session, session.begin():
        session.add(User(name=name, role="user", password_hash=auth.hash_password(password)))
    return name, password


@pytest.fixture
def ann(gateway, user):
    with Client(gateway, username=user[0], password=user[1]) as client:
        yield client


class Node:
    """A host played by the test: it answers the driver commands sent to it."""

    def __init__(self, api, amqp_uri):
        self.name = unique("gw-node")
        self.transport, self.host = join_node(api, amqp_uri, self.name)
        self.id = self.host["id"]

    def report(self, domains):
        """A monitoring report from the node, with the capacity join_node gave it."""
        self.transport.publish(messages.HOST_MONITOR, {"host": self.name, "monitoring": {
            "TOTALCPU": 400, "TOTALMEMORY": 4096 * 1024, "VMS": domains}})

    def answer(self, action, info=None):
        command = self.transport.next_command()
        assert command["action"] == action, command
        self.transport.publish(messages.COMMAND_RESULT, messages.result(command, True, info))
        return command


def wait_status(api, vm_id, status):
    return wait_until(lambda: (lambda vm: vm if vm["status"] == status else None)(
        api.get_vm(vm_id)), timeout=20, what=f"VM {vm_id} {status}")


def running_vm(api, node, name, owner=None):
    """A VM deployed on ``node`` by the admin ``api`` and RUNNING there."""
    vm = (owner or api).create_vm(name=name, cpu=0.5, vcpu=1, memory=256)
    assert api.vm_action(vm["id"], "deploy", host_id=api.host_id(node.name))["status"] == "PROLOG"
    node.answer("clone")
    node.answer("deploy", {"deploy_id": f"cirrus-{vm['id']}"})
    return wait_status(api, vm["id"], "RUNNING")


def test_hold_release_and_terminate_need_no_node(api):
    vm = api.create_vm(name="gw-pending", memory=32)
    assert vm["status"] == "PENDING"
    assert api.vm_action(vm["id"], "hold")["status"] == "HOLD"
    assert api.vm_action(vm["id"], "release")["status"] == "PENDING"
    done = api.vm_action(vm["id"], "terminate")
    assert (done["status"], done["state"]) == ("DONE", "DONE")
    assert [h["action"] for h in api.get_vm(vm["id"])["history"]] == [
        "allocate", "hold", "release", "terminate"]


def test_an_action_the_status_does_not_allow_names_both_states(api):
    vm = api.create_vm(name="gw-held-poweroff", memory=32, hold=True)
    error = refused(api.vm_action, vm["id"], "poweroff")
    assert error.code == "FAILED_PRECONDITION"
    assert error.details == (f"VM {vm['id']}: cannot poweroff a VM in HOLD; "
                             "it must be in one of: RUNNING, UNKNOWN")
    error = refused(api.vm_action, vm["id"], "suspend")
    assert error.code == "FAILED_PRECONDITION" and "in HOLD" in error.details
    assert api.get_vm(vm["id"])["seq"] == vm["seq"]     # nothing moved
    api.terminate_vm(vm["id"])
    error = refused(api.vm_action, vm["id"], "release")
    assert error.code == "FAILED_PRECONDITION" and "in DONE" in error.details


@pytest.mark.parametrize("action,options,says", [
    ("explode", {}, "unknown action 'explode'"),
    ("suspend", {"hard": True}, "hard: does not apply to suspend"),
    ("hold", {"live": True}, "live: does not apply to hold"),
    ("migrate", {}, "host_id: migrate needs the host"),
    ("recover", {}, "operation: recover needs one of"),
    ("recover", {"operation": "undo"}, "unknown recover operation 'undo'"),
])
def test_a_bad_action_or_option_is_invalid_argument(api, action, options, says):
    vm = api.create_vm(name="gw-bad-action", memory=32, hold=True)
    error = refused(api.vm_action, vm["id"], action, **options)
    assert error.code == "INVALID_ARGUMENT" and says in error.details, error.details
    assert api.get_vm(vm["id"])["status"] == "HOLD"


def test_owners_act_on_their_vms_and_only_admins_choose_hosts(api, ann, user):
    mine = ann.create_vm(name="gw-ann-vm", memory=32)
    assert mine["owner"] == user[0]
    assert ann.vm_action(mine["id"], "hold")["status"] == "HOLD"
    for action, options in (("deploy", {"host_id": 1}), ("migrate", {"host_id": 1})):
        error = refused(ann.vm_action, mine["id"], action, **options)
        assert error.code == "PERMISSION_DENIED" and action in error.details
    theirs = api.create_vm(name="gw-admin-vm", memory=32, hold=True)
    for call in (lambda: ann.vm_action(theirs["id"], "release"),
                 lambda: ann.terminate_vm(theirs["id"])):
        error = refused(call)
        assert (error.code, error.details) == ("NOT_FOUND", f"VM {theirs['id']} does not exist")
    assert api.get_vm(theirs["id"])["status"] == "HOLD"
    # an administrator acts on anyone's VM
    assert api.vm_action(mine["id"], "release")["status"] == "PENDING"
    for call in (lambda: ann.offline_host(1), lambda: ann.flush_host(1),
                 lambda: ann.update_host(1, ha="none"), lambda: ann.create_host("gw-nope")):
        assert refused(call).code == "PERMISSION_DENIED"


def currents(stream, count):
    """The first ``count`` messages of a Watch stream (its current states), by VM id."""
    return {c["id"]: c for c in (next(stream) for _ in range(count))}


def test_watch_filters_by_status_and_by_user(api, ann, user):
    held = api.create_vm(name="gw-w-held", memory=32, hold=True)
    pending = api.create_vm(name="gw-w-pending", memory=32)
    anns = ann.create_vm(name="gw-w-ann", memory=32, hold=True)
    on_hold = api.watch_vms(status="hold")
    current = currents(on_hold, sum(vm["status"] == "HOLD" for vm in api.list_vms()))
    assert {held["id"], anns["id"]} <= set(current) and pending["id"] not in current
    assert all(c["status"] == "HOLD" and c["current"] for c in current.values())
    api.vm_action(held["id"], "release")        # into PENDING: not sent
    api.vm_action(pending["id"], "hold")        # into HOLD: sent
    change = next(on_hold)
    assert (change["id"], change["status"], change["current"]) == (pending["id"], "HOLD", False)
    on_hold.close()

    anns_held = api.watch_vms(user=user[0], status="HOLD")
    current = currents(anns_held, sum(vm["status"] == "HOLD" for vm in ann.list_vms()))
    assert anns["id"] in current and {c["id"] for c in current.values()} <= {
        vm["id"] for vm in ann.list_vms()}
    api.vm_action(held["id"], "hold")           # the admin's VM: not sent
    ann.vm_action(anns["id"], "release")        # into PENDING: not sent
    ann.vm_action(anns["id"], "hold")
    change = next(anns_held)
    assert (change["id"], change["status"], change["current"]) == (anns["id"], "HOLD", False)
    anns_held.close()


def test_watch_filters_are_checked(api, ann, user):
    for stream, code, says in [
            (api.watch_vms(status="SLEEPING"), "INVALID_ARGUMENT", "unknown VM status 'SLEEPING'"),
            (api.watch_vms(user="gw-nobody"), "NOT_FOUND", "user 'gw-nobody' does not exist"),
            (ann.watch_vms(user="admin"), "PERMISSION_DENIED", "for administrators")]:
        error = refused(next, stream)
        assert error.code == code and says in error.details, error.details
    vm = ann.create_vm(name="gw-w-self", memory=32, hold=True)
    assert next(ann.watch_vms(vm["id"], user=user[0]))["id"] == vm["id"]   # naming oneself


@pytest.fixture(scope="module")
def node(gateway, admin, amqp_uri):
    with Client(gateway, username=admin[0], password=admin[1]) as client:
        yield Node(client, amqp_uri)


def test_a_vm_on_a_node_is_powered_off_resumed_and_shown_with_its_stay(api, node):
    vm = running_vm(api, node, "gw-poweroff")
    # a state word: every ACTIVE status, not POWEROFF
    active = api.watch_vms(status="active")
    assert vm["id"] in currents(active, sum(v["state"] == "ACTIVE" for v in api.list_vms()))
    assert api.vm_action(vm["id"], "poweroff", hard=True)["status"] == "SHUTDOWN_POWEROFF"
    node.answer("cancel")
    wait_status(api, vm["id"], "POWEROFF")
    assert api.vm_action(vm["id"], "resume")["status"] == "BOOT_POWEROFF"
    node.answer("deploy")
    shown = wait_status(api, vm["id"], "RUNNING")
    assert [next(active)["status"] for _ in range(3)] == [
        "SHUTDOWN_POWEROFF", "BOOT_POWEROFF", "RUNNING"]
    active.close()
    [stay] = shown["stays"]
    assert (stay["host"], stay["host_id"], stay["end"], stay["reason"]) == (
        node.name, node.id, None, None)
    assert stay["running_seconds"] > 0 and stay["start"]
    assert shown["monitoring"] is None and shown["metrics"] == []
    assert shown["resched"] is False and shown["target_host"] is None
    # what the node reports of the VM: its latest values and a series
    node.report([{"DEPLOY_ID": f"cirrus-{vm['id']}", "VM_ID": vm["id"], "STATE": "RUNNING",
                  "CPU": 12.5, "MEMORY": 262144, "NETRX": 10, "NETTX": 20,
                  "DISKRDBYTES": 30, "DISKWRBYTES": 40}])
    shown = wait_until(lambda: (lambda v: v if v["metrics"] else None)(api.get_vm(vm["id"])),
                       what="the VM's metrics")
    assert shown["monitoring"]["CPU"] == 12.5 and shown["monitoring"]["STATE"] == "RUNNING"
    [sample] = shown["metrics"]
    assert (sample["cpu"], sample["memory"], sample["netrx"], sample["diskwrbytes"]) == (
        12.5, 262144, 10, 40)
    assert sample["at"]
    api.vm_action(vm["id"], "terminate", hard=True)
    node.answer("cancel")
    node.answer("delete")
    [stay] = wait_status(api, vm["id"], "DONE")["stays"]
    assert stay["end"] and stay["reason"] == "terminate_hard"


def test_watch_shows_each_vm_of_placements_made_together(api, amqp_uri):
    """A scheduler's batch of placements is one lifecycle transaction, whose
    VMs' changes travel as one message: the stream shows each of them."""
    node = Node(api, amqp_uri)      # its own: the module's node gets no stray clones
    vms = sorted(api.create_vm(name=unique("gw-batch"), cpu=0.5, vcpu=1, memory=64)["id"]
                 for _ in range(2))
    stream = api.watch_vms()
    assert set(vms) <= currents(stream, len(api.list_vms())).keys()
    with rpc_proxy(amqp_uri, "lifecycle") as lifecycle:
        assert [a["outcome"] for a in lifecycle.deploy_many([[vm, node.id] for vm in vms])] \
            == ["deployed", "deployed"]
    changes = []
    reader = threading.Thread(target=lambda: changes.extend(
        next(c for c in stream if c["id"] in vms) for _ in vms), daemon=True)
    reader.start()
    reader.join(15)
    assert not reader.is_alive(), f"the stream showed {changes} of VMs {vms}"
    stream.close()
    assert sorted(c["id"] for c in changes) == vms
    assert {(c["status"], c["current"]) for c in changes} == {("PROLOG", False)}


def test_migrate_to_the_host_it_is_on_is_refused(api, node):
    vm = running_vm(api, node, "gw-nomove")
    error = refused(api.vm_action, vm["id"], "migrate", host_id=node.id, live=True)
    assert error.code == "FAILED_PRECONDITION" and node.name in error.details
    assert refused(api.host_id, "gw-no-such-host").code == "NOT_FOUND"
    api.vm_action(vm["id"], "recover", operation="delete")
    node.answer("delete")
    wait_status(api, vm["id"], "DONE")


def test_accounting_users_see_their_own_and_admins_anyones(api, ann, user, node):
    vm = running_vm(api, node, "gw-acct", owner=ann)
    theirs = running_vm(api, node, "gw-acct-admin")
    own = ann.accounting()
    assert [v["id"] for v in own["vms"]] == [vm["id"]]
    [line] = own["vms"]
    assert line["owner"] == user[0] and line["hours"] > 0
    assert line["cpu_hours"] == pytest.approx(0.5 * line["hours"])
    assert line["memory_gb_hours"] == pytest.approx(0.25 * line["hours"])
    assert [u["owner"] for u in own["users"]] == [user[0]]
    assert ann.accounting(user=user[0])["vms"][0]["id"] == vm["id"]
    error = refused(ann.accounting, user="admin")
    assert error.code == "PERMISSION_DENIED" and "accounting" in error.details
    everyone = api.accounting()
    assert {vm["id"], theirs["id"]} <= {v["id"] for v in everyone["vms"]}
    assert [v["id"] for v in api.accounting(user=user[0])["vms"]] == [vm["id"]]
    assert refused(api.accounting, user="gw-nobody").code == "NOT_FOUND"
    # a window before the VMs existed has nothing; a window is echoed back
    start = datetime(2020, 1, 1, tzinfo=timezone.utc)
    before = api.accounting(start=start, end=start + timedelta(days=1))
    assert before["vms"] == [] and before["start"].startswith("2020-01-01T00:00:00")
    error = refused(api.accounting, start=start, end=start - timedelta(hours=1))
    assert error.code == "INVALID_ARGUMENT" and "end" in error.details
    for each in (vm, theirs):
        api.vm_action(each["id"], "recover", operation="delete")
        node.answer("delete")


def test_hosts_are_created_with_ha_updated_flushed_and_taken_offline(api, amqp_uri):
    host = api.create_host(unique("gw-ha"), ha="reschedule")
    assert host["ha"] == "reschedule"
    assert api.update_host(host["id"], ha="none")["ha"] == "none"
    error = refused(api.update_host, host["id"], ha="sometimes")
    assert error.code == "INVALID_ARGUMENT" and "ha" in error.details
    error = refused(api.update_host, host["id"])
    assert error.code == "INVALID_ARGUMENT" and "nothing to update" in error.details
    assert api.get_host(host["id"])["ha"] == "none"
    assert api.create_host(unique("gw-plain"))["ha"] == "none"

    busy = Node(api, amqp_uri)
    vm = running_vm(api, busy, "gw-flushed")
    error = refused(api.offline_host, busy.id)
    assert error.code == "FAILED_PRECONDITION" and "still has VMs" in error.details
    assert api.flush_host(busy.id)["state"] == "DISABLED"
    assert api.get_vm(vm["id"])["resched"] is True
    api.vm_action(vm["id"], "recover", operation="delete")
    busy.answer("delete")
    wait_status(api, vm["id"], "DONE")
    assert api.offline_host(busy.id)["state"] == "OFFLINE"
    assert api.enable_host(busy.id)["state"] != "OFFLINE"
    assert refused(api.offline_host, 999999).code == "NOT_FOUND"


# ----------------------------------------------------------------- templates

TEMPLATE = """NAME = "gw-small"   # a comment
CPU = 0.5
MEMORY = 96
DISK = [ SOURCE = "/var/lib/images/debian.qcow2", SIZE = 1024 ]
DISK = [ SOURCE = "/var/lib/images/data.img" ]
"""


def test_templates_are_saved_instantiated_and_deleted(api):
    template = api.create_template(TEMPLATE)
    assert template["name"] == "gw-small"
    assert [d["SOURCE"] for d in template["body"]["DISK"]] == [
        "/var/lib/images/debian.qcow2", "/var/lib/images/data.img"]
    assert 'SOURCE="/var/lib/images/data.img"' in template["text"].replace(" = ", "=")
    assert template["id"] in [t["id"] for t in api.list_templates()]
    assert api.get_template(template["id"])["body"] == template["body"]
    vm = api.instantiate_template(template["id"], name="gw-from-template", hold=True)
    assert (vm["name"], vm["cpu"], vm["memory"], vm["status"]) == (
        "gw-from-template", 0.5, 96, "HOLD")
    api.delete_template(template["id"])
    with pytest.raises(ClientError) as exc_info:
        api.get_template(template["id"])
    assert exc_info.value.code == "NOT_FOUND"


def test_instantiating_a_template_that_names_an_unknown_image_is_refused(api):
    template = api.create_template('NAME = "gw-no-image"\nCPU = 0.5\nMEMORY = 96\n'
                                   'DISK = [ IMAGE = "no-such-image" ]\n')
    before = len(api.list_vms())
    with pytest.raises(ClientError) as exc_info:
        api.instantiate_template(template["id"], hold=True)
    assert exc_info.value.code == "NOT_FOUND"
    assert "no-such-image" in exc_info.value.details
    assert len(api.list_vms()) == before
    api.delete_template(template["id"])


def test_a_template_syntax_error_names_the_line_and_column(api):
    before = api.list_templates()
    with pytest.raises(ClientError) as exc_info:
        api.create_template('NAME = "x"\nCPU = [ broken\n')
    assert exc_info.value.code == "INVALID_ARGUMENT"
    assert "line 2" in exc_info.value.details and "column" in exc_info.value.details
    assert api.list_templates() == before


# ----------------------------------------------------------------- the CLI over the gateway

def cirrus(gateway, env, *argv):
    return subprocess.run([sys.executable, "-m", "cirrus.cli", "--address", gateway, *argv],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_cli_logs_in_and_uses_the_token(gateway, cirrus_env, admin, tmp_path):
    env = {**cirrus_env, "HOME": str(tmp_path), "CIRRUS_PASSWORD": admin[1]}
    done = cirrus(gateway, env, "login", "--user", admin[0])
    assert done.returncode == 0, done.stderr
    token = (tmp_path / ".config" / "cirrus" / "token").read_text().strip()
    # the token, not the password, authenticates what follows
    env["CIRRUS_PASSWORD"] = "wrong"
    created = cirrus(gateway, env, "vm", "create", "--name", "gw-cli", "--memory", "48", "--hold")
    assert created.returncode == 0, created.stderr
    vm_id = int(created.stdout)
    shown = json.loads(cirrus(gateway, env, "vm", "show", str(vm_id), "--json").stdout)
    assert {"id", "name", "state", "lcm_state", "host", "history"} <= set(shown)
    assert (shown["id"], shown["state"], shown["host"]) == (vm_id, "HOLD", None)
    table = cirrus(gateway, env, "vm", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "OWNER", "STAT", "HOST", "CPU", "MEM"]
    assert [str(vm_id), "gw-cli", admin[0], "hold", "-", "1", "48M"] in [r.split() for r in table]
    missing = cirrus(gateway, env, "vm", "show", "999999")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "cirrus: NOT_FOUND: VM 999999 does not exist"
    env["CIRRUS_TOKEN"] = token + "x"
    refused = cirrus(gateway, env, "host", "list")
    assert (refused.returncode, refused.stderr.split(":")[:2]) == (1, ["cirrus", " UNAUTHENTICATED"])


def test_the_cli_acts_on_vms_and_hosts_and_shows_refusals_as_they_are(gateway, cirrus_env, admin,
                                                                      tmp_path, api):
    env = {**cirrus_env, "HOME": str(tmp_path), "CIRRUS_USER": admin[0],
           "CIRRUS_PASSWORD": admin[1]}
    vm_id = int(cirrus(gateway, env, "vm", "create", "--name", "gw-cli-act", "--memory", "32",
                       "--hold").stdout)
    not_allowed = cirrus(gateway, env, "vm", "poweroff", str(vm_id), "--hard")
    assert (not_allowed.returncode, not_allowed.stderr) == (
        1, f"cirrus: FAILED_PRECONDITION: VM {vm_id}: cannot poweroff hard a VM in HOLD; "
           "it must be in one of: RUNNING, UNKNOWN\n")
    released = cirrus(gateway, env, "vm", "release", str(vm_id))
    assert released.stdout == f"VM {vm_id} (gw-cli-act): release accepted; now PENDING\n"
    assert json.loads(cirrus(gateway, env, "vm", "hold", str(vm_id), "--json").stdout)[
        "status"] == "HOLD"
    recovered = cirrus(gateway, env, "vm", "recover", str(vm_id), "--delete")
    assert recovered.returncode == 0 and recovered.stdout.endswith("now DONE\n")

    name = unique("gw-cli-host")
    host_id = int(cirrus(gateway, env, "host", "create", name, "--ha", "reschedule").stdout)
    updated = cirrus(gateway, env, "host", "update", name, "--ha", "none")
    assert updated.stdout == f"host {host_id} ({name}) updated; ha none\n"
    assert json.loads(cirrus(gateway, env, "host", "show", name, "--json").stdout)["ha"] == "none"
    assert "HA           none" in cirrus(gateway, env, "host", "show", str(host_id)).stdout
    assert cirrus(gateway, env, "host", "offline", name).stdout.endswith("state OFFLINE\n")
    missing = cirrus(gateway, env, "host", "flush", "gw-no-such-host")
    assert (missing.returncode, missing.stderr) == (
        1, "cirrus: NOT_FOUND: host 'gw-no-such-host' does not exist\n")
    migrate = cirrus(gateway, env, "vm", "migrate", str(vm_id), "gw-no-such-host")
    assert "host 'gw-no-such-host' does not exist" in migrate.stderr


def test_the_cli_accounts_and_refuses_bad_times(gateway, cirrus_env, admin, tmp_path, api, node):
    env = {**cirrus_env, "HOME": str(tmp_path), "CIRRUS_USER": admin[0],
           "CIRRUS_PASSWORD": admin[1]}
    vm = running_vm(api, node, "gw-cli-acct")
    report = json.loads(cirrus(gateway, env, "accounting", "--user", admin[0], "--json").stdout)
    assert vm["id"] in [v["id"] for v in report["vms"]]
    table = cirrus(gateway, env, "accounting", "--start", "2020-01-01").stdout.splitlines()
    assert table[0] == "VM usage from 2020-01-01 00:00:00 to now (UTC)"
    assert [str(vm["id"]), "gw-cli-acct", admin[0]] in [r.split()[:3] for r in table]
    bad = cirrus(gateway, env, "accounting", "--end", "2026-02-30")
    assert bad.returncode == 2 and "argument --end: invalid time '2026-02-30'" in bad.stderr
    backwards = cirrus(gateway, env, "accounting", "--start", "2026-02-01", "--end", "2026-01-01")
    assert backwards.returncode == 1 and "INVALID_ARGUMENT: end: must be after start" in \
        backwards.stderr
    api.vm_action(vm["id"], "recover", operation="delete")
    node.answer("delete")


def frames(text):
    return [frame.splitlines() for frame in text.strip().split("\n\n")]


def test_vm_top_prints_a_table_and_redraws_it_on_a_change(gateway, cirrus_env, admin, tmp_path,
                                                         api):
    env = {**cirrus_env, "HOME": str(tmp_path), "CIRRUS_USER": admin[0],
           "CIRRUS_PASSWORD": admin[1]}
    once = frames(cirrus(gateway, env, "vm", "top", "--once").stdout)
    assert len(once) == 1
    assert once[0][1].split() == ["ID", "NAME", "OWNER", "STAT", "HOST", "CPU", "MEM", "UCPU",
                                  "UMEM"]
    assert len(once[0]) - 2 == len(api.list_vms())
    top = subprocess.Popen([sys.executable, "-m", "cirrus.cli", "--address", gateway, "vm", "top",
                            "--iterations", "2", "--delay", "0.2", "--status", "HOLD"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = []
        while (line := top.stdout.readline()) != "\n":
            first.append(line)
        vm = api.create_vm(name="gw-topped", memory=32, hold=True)
        rest, err = top.communicate(timeout=30)
    finally:
        top.kill()
    assert top.returncode == 0, err
    assert str(vm["id"]) not in [line.split()[0] for line in first[2:]]
    [second] = frames(rest)
    assert [str(vm["id"]), "gw-topped", admin[0], "hold"] in [r.split()[:4] for r in second]
    assert all(r.split()[3] == "hold" for r in second[2:])


# ----------------------------------------------------------------- stopping

def test_sigterm_ends_open_streams_and_stops_the_gateway(services, cirrus_env, logs, admin):
    proc, address = start_gateway(cirrus_env, logs)
    try:
        with Client(address, username=admin[0], password=admin[1]) as client:
            stream = client.watch_vms()
            for _ in client.list_vms():
                next(stream)
            proc.popen.send_signal(signal.SIGTERM)
            assert list(stream) == []     # the stream ends cleanly
            assert proc.popen.wait(timeout=15) == 0
        assert "gateway stopped" in proc.output()
    finally:
        proc.stop()
