"""The lifecycle service alone, as a process, on the real broker and database.

The test plays the node: it reads driver commands from the host's queue and
answers them as a driver worker would.
"""
import pytest
from nameko.exceptions import RemoteError

from cirrus import messages
from tests.broker import FakeNodeTransport, drain, rpc_proxy, vm_events
from tests.procs import start_services, wait_until


@pytest.fixture(scope="module")
def lifecycle(cirrus_env, tmp_path_factory):
    [proc] = start_services(["lifecycle"], cirrus_env, tmp_path_factory.mktemp("lc"))
    yield proc
    proc.stop()


@pytest.fixture
def rpc(lifecycle, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as proxy:
        yield proxy


def test_a_vm_runs_through_driver_results_and_back_to_done(rpc, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "lc-node")
    host = rpc.create_host("lc-node")
    node.publish(messages.HOST_MONITOR, {"host": "lc-node", "monitoring": {
        "TOTALCPU": 800, "TOTALMEMORY": 8 * 1024 * 1024, "HYPERVISOR": "test"}})
    wait_until(lambda: rpc.get_host(host["id"])["state"] == "MONITORED", what="MONITORED")
    assert rpc.get_host(host["id"])["max_mem"] == 8192

    conn, seen = vm_events(amqp_uri)
    vm = rpc.allocate(1, "svc-vm", 1.0, 1, 256, {"MEMORY": "256"})
    assert rpc.deploy(vm["id"], host["id"])["outcome"] == "deployed"
    for action, info in [("clone", {}), ("deploy", {"deploy_id": f"cirrus-{vm['id']}"})]:
        cmd = node.next_command()
        assert (cmd["action"], cmd["vm_id"]) == (action, vm["id"])
        node.publish(messages.COMMAND_RESULT, messages.result(cmd, True, info))
    wait_until(lambda: rpc.get_vm(vm["id"])["status"] == "RUNNING", what="RUNNING")

    rpc.terminate(vm["id"], True)
    for action in ("cancel", "delete"):
        cmd = node.next_command()
        assert cmd["action"] == action
        node.publish(messages.COMMAND_RESULT, messages.result(cmd, True))
    wait_until(lambda: rpc.get_vm(vm["id"])["status"] == "DONE", what="DONE")

    statuses = drain(conn, seen, lambda s: [e["status"] for e in s if e["id"] == vm["id"]][-1:] == ["DONE"])
    keys = [e["key"] for e in seen if e["id"] == vm["id"]]
    assert keys == [f"VM/{k}/{vm['id']}" for k in (
        "PENDING/LCM_INIT", "ACTIVE/PROLOG", "ACTIVE/BOOT", "ACTIVE/RUNNING",
        "ACTIVE/SHUTDOWN", "ACTIVE/EPILOG", "DONE/LCM_INIT")]
    assert statuses
    assert rpc.get_host(host["id"])["cpu_usage"] == 0


def test_errors_keep_their_kind_across_rpc(rpc):
    with pytest.raises(RemoteError) as err:
        rpc.get_vm(999999)
    assert err.value.exc_type == "NotFound"
    with pytest.raises(RemoteError) as err:
        rpc.allocate(1, "x", 1.0, 1, 0, {})
    assert err.value.exc_type == "InvalidArgument" and "memory" in err.value.value


def test_a_message_left_in_the_outbox_by_a_crash_is_sent_by_the_periodic_flush(lifecycle, amqp_uri):
    """A process that commits and dies before publishing leaves its rows in the
    outbox; any lifecycle instance's timer sends them."""
    from cirrus import db, outbox
    conn, seen = vm_events(amqp_uri)
    with db.session_factory()() as s, s.begin():
        outbox.add_event(s, messages.LIFECYCLE, messages.VM_STATE,
                         {"id": -7, "status": "PENDING", "key": "VM/PENDING/LCM_INIT/-7"})
    drain(conn, seen, lambda s: any(e["id"] == -7 for e in s))
