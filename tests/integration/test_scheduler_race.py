"""Three schedulers over one lifecycle never over-commit a host: each plans
from its own view, and lifecycle's conditional reservation settles the race.

The test plays the nodes (FakeNodeTransport) and counts the commands each
host's queue receives."""
import time

import pytest
from sqlalchemy import func, select

from cirrus import db, messages
from cirrus.db.models import VirtualMachine
from tests.broker import FakeNodeTransport, rpc_proxy
from tests.procs import Proc, wait_until
from tests.scheduling import quiet_database, scheduler_env

SCHEDULERS = 3


@pytest.fixture(scope="module")
def services(cirrus_env, tmp_path_factory):
    quiet_database()
    # small batches: the schedulers interleave their calls to lifecycle; and
    # sweeps every 2 s, so that the three also race over the VMs left waiting
    env = scheduler_env(cirrus_env, CIRRUS_SCHEDULER_BATCH="2",
                        CIRRUS_SCHEDULER_SWEEP_INTERVAL="2")
    logs = tmp_path_factory.mktemp("race")
    procs = [Proc(["cirrus-service", "lifecycle"], env, logs / "lifecycle.log").start()]
    procs += [Proc(["cirrus-service", "scheduler"], env, logs / f"scheduler-{i}.log").start()
              for i in range(SCHEDULERS)]
    for proc in procs:
        proc.wait_for("started")
    yield procs
    for proc in procs:
        proc.stop()


def drain(node):
    """The VM ids of the clone commands waiting on a node's queue."""
    cmds = node.waiting_commands()
    assert {cmd["action"] for cmd in cmds} <= {"clone"}
    return [cmd["vm_id"] for cmd in cmds]


def test_three_schedulers_fill_hosts_exactly_and_never_beyond(services, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as rpc:
        # VMs first, hosts later: every scheduler sees all of them waiting at once
        vms = [rpc.allocate(1, f"race-{i}", 1.0, 1, 256, {})["id"] for i in range(20)]
        names = ["race-a", "race-b", "race-c"]
        nodes = {name: FakeNodeTransport(amqp_uri, name) for name in names}
        hosts = {name: rpc.create_host(name)["id"] for name in names}
        # race-c keeps one core for itself: it takes 3 one-CPU VMs, not 4
        rpc.update_host(hosts["race-c"], {"RESERVED_CPU": "100"})
        for name, node in nodes.items():
            node.publish(messages.HOST_MONITOR, {"host": name, "monitoring": {
                "TOTALCPU": 400, "TOTALMEMORY": 4096 * 1024}})

        def settled():
            shown = [rpc.get_vm(v) for v in vms]
            waiting = [v for v in shown if v["status"] == "PENDING"]
            return len(waiting) == 20 - 11 and all(v["sched_message"] for v in waiting)
        wait_until(settled, timeout=30, what="11 VMs placed and 9 waiting with a reason")
        # more sweeps of all three schedulers change nothing
        time.sleep(5)

        shown = {v: rpc.get_vm(v) for v in vms}
        placed = {name: sorted(v for v, vm in shown.items() if vm["host"] == name)
                  for name in names}
        assert [len(placed[n]) for n in names] == [4, 4, 3]
        for name in names:
            host = rpc.get_host(hosts[name])
            assert host["cpu_usage"] == 100 * len(placed[name])
            assert host["cpu_usage"] <= host["max_cpu"] - host["reserved_cpu"]
            # one clone command per VM placed there, none for a VM placed elsewhere
            assert sorted(drain(nodes[name])) == placed[name]
        waiting = [vm for vm in shown.values() if vm["status"] == "PENDING"]
        assert {vm["sched_message"] for vm in waiting} == {"Not enough CPU capacity: 100/0"}
    with db.session_factory()() as s:
        usage = dict(s.execute(select(VirtualMachine.host_id, func.sum(VirtualMachine.cpu))
                               .where(VirtualMachine.id.in_(vms),
                                      VirtualMachine.host_id.is_not(None))
                               .group_by(VirtualMachine.host_id)).all())
        assert {h: int(c * 100) for h, c in usage.items()} == \
            {hosts[n]: 100 * len(placed[n]) for n in names}
    with rpc_proxy(amqp_uri, "lifecycle") as rpc:
        for vm in waiting:
            rpc.vm_action(vm["id"], "terminate")
