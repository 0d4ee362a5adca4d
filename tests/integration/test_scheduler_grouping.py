"""A pass's placements leave grouped by host, on the real broker and database:
after the pass's first batch, each host's VMs go to lifecycle together, and
its node gets them in one message."""
import pytest

from tests.broker import join_node, rpc_proxy
from tests.procs import wait_until
from tests.scheduling import running


@pytest.fixture(scope="module")
def services(cirrus_env, tmp_path_factory):
    # batches of 2: sent as planned, each would hold one VM of each host
    yield from running(cirrus_env, tmp_path_factory.mktemp("grouping"),
                       CIRRUS_SCHEDULER_BATCH="2")


def test_after_the_first_batch_each_host_gets_its_vms_of_a_pass_in_one_message(
        services, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as rpc:
        cluster = rpc.create_cluster("grouping")
        (node_a, host_a), (node_b, host_b) = (join_node(rpc, amqp_uri, name)
                                              for name in ("group-a", "group-b"))
        for host in (host_a, host_b):
            rpc.cluster_add_host(cluster["id"], host["id"])
        # they wait until their cluster is READY; striping: then they alternate a, b, a...
        template = {"SCHED_REQUIREMENTS": 'READY = "yes"', "SCHED_RANK": "-RUNNING_VMS"}
        vms = [rpc.allocate(1, f"group-{i}", 1.0, 1, 256, template)["id"] for i in range(8)]
        wait_until(lambda: all(rpc.get_vm(vm)["sched_message"] for vm in vms), timeout=30,
                   what="every VM waiting for a matching host")
        # both hosts match in one transaction: one pass places the eight
        rpc.update_cluster(cluster["id"], {"READY": "yes"})
        wait_until(lambda: all(rpc.get_vm(vm)["status"] == "PROLOG" for vm in vms),
                   timeout=30, what="every VM placed")
        assert rpc.get_host(host_a["id"])["running_vms"] == 4
    for node, first, rest in ((node_a, vms[0], vms[2::2]), (node_b, vms[1], vms[3::2])):
        sent = [[cmd["vm_id"] for cmd in commands] for commands in node.waiting_messages()]
        # the first batch left as soon as it was planned, the host's other three
        # together (batches in flight commit in any order)
        assert sorted(sent) == sorted([[first], rest]), node.host
