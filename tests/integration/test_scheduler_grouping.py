"""A pass's placements leave grouped by host, on the real broker and database:
after the pass's first batch, each host's VMs go to lifecycle together, and
its node gets them in one message."""
import pytest

from cirrus import messages
from tests.broker import join_node, rpc_proxy
from tests.procs import start_services, wait_until
from tests.scheduling import running, scheduler_env


@pytest.fixture(scope="module")
def lifecycle(cirrus_env, tmp_path_factory):
    # the scheduler starts in the test, once the VMs wait
    yield from running(cirrus_env, tmp_path_factory.mktemp("grouping"), names=("lifecycle",))


def test_after_the_first_batch_each_host_gets_its_vms_of_a_pass_in_one_message(
        lifecycle, cirrus_env, amqp_uri, tmp_path):
    with rpc_proxy(amqp_uri, "lifecycle") as rpc:
        (node_a, host_a), (node_b, host_b) = (join_node(rpc, amqp_uri, name)
                                              for name in ("group-a", "group-b"))
        # striping: the VMs alternate between the hosts, a, b, a, b...
        vms = [rpc.allocate(1, f"group-{i}", 1.0, 1, 256, {"SCHED_RANK": "-RUNNING_VMS"})["id"]
               for i in range(8)]
        # batches of 2: sent as planned, each would hold one VM of each host
        scheduler, = start_services(["scheduler"], scheduler_env(
            cirrus_env, CIRRUS_SCHEDULER_BATCH="2", CIRRUS_SCHEDULER_SWEEP_INTERVAL="1"),
            tmp_path)
        try:
            wait_until(lambda: all(rpc.get_vm(vm)["status"] == "PROLOG" for vm in vms),
                       timeout=30, what="every VM placed")
        finally:
            scheduler.stop()
        assert rpc.get_host(host_a["id"])["running_vms"] == 4
    for node, first, rest in ((node_a, vms[0], vms[2::2]), (node_b, vms[1], vms[3::2])):
        sent = []
        while (message := node.queue.get(no_ack=True)) is not None:
            sent.append([cmd["vm_id"] for cmd in messages.commands_in(message.payload)])
        # the first batch left as soon as it was planned; then the host's three at once
        assert sent == [[first], rest], node.host
