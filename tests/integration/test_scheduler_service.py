"""The scheduler as a process, with lifecycle, on the real broker and database.

The test plays the node: it reports monitoring and reads the commands that a
placement sends to the host's queue."""
import pytest

from cirrus import messages
from tests.broker import FakeNodeTransport, join_node, rpc_proxy
from tests.procs import wait_until
from tests.scheduling import quiet_database, running


@pytest.fixture(scope="module")
def services(cirrus_env, tmp_path_factory):
    yield from running(cirrus_env, tmp_path_factory.mktemp("sched"))


@pytest.fixture
def rpc(services, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as proxy:
        yield proxy


def test_placement_waits_for_a_host_happens_on_the_event_and_explains_a_misfit(rpc, amqp_uri):
    vm = rpc.allocate(1, "sched-first", 1.0, 1, 512, {})
    wait_until(lambda: rpc.get_vm(vm["id"])["sched_message"], timeout=15,
               what="a scheduling message")
    assert rpc.get_vm(vm["id"])["sched_message"] == "No host is enabled and monitored"

    node = FakeNodeTransport(amqp_uri, "sched-a")
    host = rpc.create_host("sched-a")
    node.publish(messages.HOST_MONITOR, {"host": "sched-a", "monitoring": {
        "TOTALCPU": 800, "TOTALMEMORY": 4096 * 1024}})
    # the host becoming MONITORED is news: the waiting VM is placed at once
    cmd = node.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("clone", vm["id"])
    shown = rpc.get_vm(vm["id"])
    assert (shown["status"], shown["host"], shown["sched_message"]) == ("PROLOG", "sched-a", None)

    second = rpc.allocate(1, "sched-second", 2.0, 1, 256, {})
    cmd = node.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("clone", second["id"])
    assert rpc.get_host(host["id"])["cpu_usage"] == 300

    # a VM that fits nowhere stays PENDING with the reason: need/most free
    big = rpc.allocate(1, "sched-big", 16.0, 1, 256, {})
    wait_until(lambda: rpc.get_vm(big["id"])["sched_message"], timeout=15,
               what="a scheduling message")
    vm = rpc.get_vm(big["id"])
    assert vm["status"] == "PENDING"
    assert vm["sched_message"] == "Not enough CPU capacity: 1600/500"
    rpc.vm_action(big["id"], "terminate")


def test_a_vm_flagged_resched_is_live_migrated_to_another_host(rpc, amqp_uri):
    quiet_database()    # only this test's hosts take VMs
    node_a, host_a = join_node(rpc, amqp_uri, "resched-a")
    held = rpc.allocate(1, "sched-held", 1.0, 1, 256, {}, True)     # on HOLD: never placed
    vm = rpc.allocate(1, "sched-move", 1.0, 1, 512, {"SCHED_RANK": "PRIORITY"})
    for action in ("clone", "deploy"):
        cmd = node_a.next_command(timeout=15)
        assert (cmd["action"], cmd["vm_id"]) == (action, vm["id"])
        node_a.publish(messages.COMMAND_RESULT, messages.result(cmd, True, {"deploy_id": "d"}))
    wait_until(lambda: rpc.get_vm(vm["id"])["status"] == "RUNNING", what="RUNNING")

    # alone on its host, a rescheduled VM stays and says why
    rpc.vm_action(vm["id"], "resched")
    wait_until(lambda: rpc.get_vm(vm["id"])["sched_message"], timeout=15,
               what="a scheduling message")
    assert rpc.get_vm(vm["id"])["sched_message"] == "No other host is enabled and monitored"

    node_b, host_b = join_node(rpc, amqp_uri, "resched-b")
    # no better than where it is: it stays
    wait_until(lambda: rpc.get_vm(vm["id"])["sched_message"] ==
               "No host ranks higher than its current host resched-a", timeout=15,
               what="a scheduling message")
    rpc.update_host(host_b["id"], {"PRIORITY": "5"})
    # the change is news: the VM moves to the host it now prefers
    cmd = node_a.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("migrate", vm["id"])
    assert (cmd["args"]["dest_host"], cmd["args"]["dest_uri"]) == \
        ("resched-b", "qemu+tcp://resched-b/system")
    shown = rpc.get_vm(vm["id"])
    assert (shown["status"], shown["resched"], shown["sched_message"]) == ("MIGRATE", False, None)
    node_a.publish(messages.COMMAND_RESULT, messages.result(cmd, True))
    cmd = node_b.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("restore", vm["id"])
    node_b.publish(messages.COMMAND_RESULT, messages.result(cmd, True))
    wait_until(lambda: rpc.get_vm(vm["id"])["host"] == "resched-b"
               and rpc.get_vm(vm["id"])["status"] == "RUNNING", what="RUNNING on resched-b")
    assert [rpc.get_host(h["id"])["cpu_usage"] for h in (host_a, host_b)] == [0, 100]
    assert rpc.get_vm(held["id"])["status"] == "HOLD"
    assert node_a.queue.get(no_ack=True) is None and node_b.queue.get(no_ack=True) is None


def run_on(node, vm_id):
    """Answer the clone and deploy commands of a VM placed on ``node``."""
    for action in ("clone", "deploy"):
        cmd = node.next_command(timeout=15)
        assert (cmd["action"], cmd["vm_id"]) == (action, vm_id)
        node.publish(messages.COMMAND_RESULT, messages.result(cmd, True, {"deploy_id": "d"}))


def test_capacity_freed_by_a_vm_leaving_places_a_waiting_vm_at_once(rpc, amqp_uri):
    quiet_database()
    node, host = join_node(rpc, amqp_uri, "freed-a", cpu=200)
    first = rpc.allocate(1, "freed-first", 2.0, 1, 512, {})
    run_on(node, first["id"])
    wait_until(lambda: rpc.get_vm(first["id"])["status"] == "RUNNING", what="RUNNING")
    waiting = rpc.allocate(1, "freed-waiting", 1.0, 1, 512, {})
    wait_until(lambda: rpc.get_vm(waiting["id"])["sched_message"], timeout=15,
               what="a scheduling message")
    assert rpc.get_vm(waiting["id"])["sched_message"] == "Not enough CPU capacity: 100/0"

    rpc.vm_action(first["id"], "terminate")
    for action in ("shutdown", "delete"):
        cmd = node.next_command(timeout=15)
        assert (cmd["action"], cmd["vm_id"]) == (action, first["id"])
        node.publish(messages.COMMAND_RESULT, messages.result(cmd, True))
    # DONE freed the host; with no sweep for 600 s, only that event can place it
    cmd = node.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("clone", waiting["id"])
    assert rpc.get_host(host["id"])["cpu_usage"] == 100
