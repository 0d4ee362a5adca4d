"""The lifecycle service alone, as a process, on the real broker and database.

The test plays the node: it reads driver commands from the host's queue and
answers them as a driver worker would.
"""
import pytest
from nameko.exceptions import RemoteError

from cirrus import messages
from tests.broker import FakeNodeTransport, drain, join_node, rpc_proxy, vm_events
from tests.procs import start_services, wait_until


@pytest.fixture(scope="module")
def lifecycle(cirrus_env, tmp_path_factory):
    # the test's fake nodes report when they join, not every few seconds: do
    # not let host failure detection fence them in the middle of a test
    env = {**cirrus_env, "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "600"}
    [proc] = start_services(["lifecycle"], env, tmp_path_factory.mktemp("lc"))
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

    rpc.vm_action(vm["id"], "terminate", {"hard": True})
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


def reply(node, vm_id, action, success=True, info=None):
    """Take the next command off the node's queue, check it, and answer it."""
    cmd = node.next_command()
    assert (cmd["action"], cmd["vm_id"]) == (action, vm_id)
    node.publish(messages.COMMAND_RESULT,
                 messages.result(cmd, success, info, None if success else "simulated failure"))
    return cmd


def wait_status(rpc, vm_id, status):
    wait_until(lambda: rpc.get_vm(vm_id)["status"] == status, what=status)
    return rpc.get_vm(vm_id)


def started_vm(rpc, node, host, name):
    vm = rpc.allocate(1, name, 1.0, 1, 256, {})
    assert rpc.deploy(vm["id"], host["id"])["outcome"] == "deployed"
    reply(node, vm["id"], "clone")
    reply(node, vm["id"], "deploy", info={"deploy_id": f"cirrus-{vm['id']}"})
    return wait_status(rpc, vm["id"], "RUNNING")


def test_poweroff_and_resume_through_vm_action(rpc, amqp_uri):
    node, host = join_node(rpc, amqp_uri, "lc-power")
    vm = started_vm(rpc, node, host, "svc-power")
    shown = rpc.vm_action(vm["id"], "poweroff", {"hard": True})
    assert shown["status"] == "SHUTDOWN_POWEROFF"
    reply(node, vm["id"], "cancel")
    wait_status(rpc, vm["id"], "POWEROFF")
    assert rpc.get_host(host["id"])["cpu_usage"] == 100     # a powered-off VM keeps its place
    assert rpc.vm_action(vm["id"], "resume")["status"] == "BOOT_POWEROFF"
    reply(node, vm["id"], "deploy", info={"deploy_id": f"cirrus-{vm['id']}"})
    wait_status(rpc, vm["id"], "RUNNING")
    with pytest.raises(RemoteError) as err:
        rpc.vm_action(vm["id"], "resume")
    assert err.value.exc_type == "FailedPrecondition"
    assert f"VM {vm['id']}: cannot resume a VM in RUNNING" in err.value.value
    with pytest.raises(RemoteError) as err:
        rpc.vm_action(vm["id"], "poweroff", {"softly": True})
    assert err.value.exc_type == "InvalidArgument" and "softly" in err.value.value


def test_a_cold_migration_sends_each_command_to_the_right_host(rpc, amqp_uri):
    node_a, host_a = join_node(rpc, amqp_uri, "lc-mig-a")
    node_b, host_b = join_node(rpc, amqp_uri, "lc-mig-b")
    vm = started_vm(rpc, node_a, host_a, "svc-migrate")
    shown = rpc.vm_action(vm["id"], "migrate", {"host_id": host_b["id"]})
    assert (shown["status"], shown["target_host"]) == ("SAVE_MIGRATE", "lc-mig-b")
    assert [rpc.get_host(h["id"])["cpu_usage"] for h in (host_a, host_b)] == [100, 100]
    reply(node_a, vm["id"], "save", info={"checkpoint": "/ds/x/checkpoint", "vm_dir": "/ds/x"})
    mv = reply(node_b, vm["id"], "mv")
    assert (mv["args"]["direction"], mv["args"]["from_dir"]) == ("in", "/ds/x")
    restore = reply(node_b, vm["id"], "restore", info={"deploy_id": f"cirrus-{vm['id']}"})
    assert restore["args"]["vm"]["runtime"]["checkpoint"] == "/ds/x/checkpoint"
    shown = wait_status(rpc, vm["id"], "RUNNING")
    assert (shown["host"], shown["target_host"]) == ("lc-mig-b", None)
    assert [rpc.get_host(h["id"])["cpu_usage"] for h in (host_a, host_b)] == [0, 100]
    # nothing was left for host a
    assert node_a.queue.get(no_ack=True) is None


def test_recover_retry_sends_the_command_again(rpc, amqp_uri):
    node, host = join_node(rpc, amqp_uri, "lc-retry")
    vm = started_vm(rpc, node, host, "svc-retry")
    rpc.vm_action(vm["id"], "suspend")
    first = reply(node, vm["id"], "save", success=False)
    shown = wait_status(rpc, vm["id"], "RUNNING")       # a failed save leaves it running
    assert "save failed: simulated failure" in shown["error"]
    rpc.vm_action(vm["id"], "stop")
    lost = node.next_command()          # the node dies with it: no answer comes
    assert lost["action"] == "save"
    shown = rpc.vm_action(vm["id"], "recover", {"operation": "retry"})
    assert shown["status"] == "SAVE_STOP"
    again = reply(node, vm["id"], "save")
    assert again["id"] not in (first["id"], lost["id"])
    reply(node, vm["id"], "mv")
    wait_status(rpc, vm["id"], "STOPPED")
    # the late answer to the lost command changes nothing
    node.publish(messages.COMMAND_RESULT, messages.result(lost, True))
    rpc.vm_action(vm["id"], "terminate")
    reply(node, vm["id"], "delete")
    shown = wait_status(rpc, vm["id"], "DONE")
    assert [h["to"] for h in rpc.get_vm(vm["id"])["history"]][-6:] == [
        "SAVE_STOP", "SAVE_STOP", "EPILOG_STOP", "STOPPED", "EPILOG", "DONE"]
