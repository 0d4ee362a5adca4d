"""The gRPC gateway over real gRPC, in front of the real requests and
lifecycle services, on the real broker and database."""
import base64
import json
import signal
import socket
import subprocess
import sys
import threading

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cirrus import config
from cirrus.client import Client, ClientError
from cirrus.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc
from tests.procs import Proc

API = ["cirrus.v1.VirtualMachineService", "cirrus.v1.HostService",
       "cirrus.v1.TemplateService", "cirrus.v1.SessionService"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    procs = []
    for name in ("requests", "lifecycle"):
        proc = Proc(["cirrus-service", name], cirrus_env, logs / f"{name}.log").start()
        procs.append(proc)
    for proc, name in zip(procs, ("requests", "lifecycle")):
        proc.wait_for(f"{name} started")
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


# ----------------------------------------------------------------- templates

TEMPLATE = """NAME = "gw-small"   # a comment
CPU = 0.5
MEMORY = 96
DISK = [ IMAGE = "debian", SIZE = 1024 ]
DISK = [ IMAGE = "data" ]
"""


def test_templates_are_saved_instantiated_and_deleted(api):
    template = api.create_template(TEMPLATE)
    assert template["name"] == "gw-small"
    assert [d["IMAGE"] for d in template["body"]["DISK"]] == ["debian", "data"]
    assert 'IMAGE="data"' in template["text"].replace(" = ", "=")
    assert template["id"] in [t["id"] for t in api.list_templates()]
    assert api.get_template(template["id"])["body"] == template["body"]
    vm = api.instantiate_template(template["id"], name="gw-from-template", hold=True)
    assert (vm["name"], vm["cpu"], vm["memory"], vm["status"]) == (
        "gw-from-template", 0.5, 96, "HOLD")
    api.delete_template(template["id"])
    with pytest.raises(ClientError) as exc_info:
        api.get_template(template["id"])
    assert exc_info.value.code == "NOT_FOUND"


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
