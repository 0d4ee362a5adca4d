"""The issue's scenario through lifecycle and the scheduler as processes: 3
clusters of 10 hosts, VMs with requirements, cluster pins and a VM group with
anti-affinity, a VM that fits nowhere (reason shown), and a host added later
that makes it fit, placed at once: the sweep is off, so only events place.

The test plays the 30 nodes; it does not answer the clone commands, so every
placed VM stays in PROLOG holding its capacity."""
import pytest

from cirrus import messages
from tests.broker import FakeNodeTransport, rpc_proxy
from tests.procs import wait_until
from tests.scheduling import running


@pytest.fixture(scope="module")
def services(cirrus_env, tmp_path_factory):
    yield from running(cirrus_env, tmp_path_factory.mktemp("clusters"))


def monitor(node, name, cpu=400):
    node.publish(messages.HOST_MONITOR, {"host": name, "monitoring": {
        "TOTALCPU": cpu, "TOTALMEMORY": 4096 * 1024, "HYPERVISOR": "kvm"}})


def test_clusters_requirements_anti_affinity_and_a_late_host(services, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as rpc:
        clusters, hosts, nodes = {}, {}, {}
        for tier in ("gold", "silver", "bronze"):
            cluster = rpc.create_cluster(f"e2e-{tier}", {"TIER": tier})
            clusters[tier] = cluster["id"]
            for i in range(10):
                name = f"e2e-{tier}-{i}"
                nodes[name] = FakeNodeTransport(amqp_uri, name)
                hosts[name] = rpc.create_host(name)["id"]
                rpc.cluster_add_host(cluster["id"], hosts[name])
                rpc.update_host(hosts[name], {"RACK": f"r{i % 3}"})
        for name, node in nodes.items():
            monitor(node, name)
        wait_until(lambda: all(h["state"] == "MONITORED" for h in rpc.list_hosts()
                               if h["name"].startswith("e2e-")), what="30 hosts MONITORED")
        rpc.create_vmgroup(1, "e2e-web", [{"name": "db", "policy": "ANTI_AFFINED"},
                                          {"name": "app"}],
                           [{"policy": "ANTI_AFFINED", "roles": ["db", "app"]}])

        gold = [rpc.allocate(1, f"e2e-gold-{i}", 1.0, 1, 512, {
            "SCHED_REQUIREMENTS": 'TIER = "gold" & RACK = "r1"'})["id"] for i in range(5)]
        silver = [rpc.allocate(1, f"e2e-silver-{i}", 1.0, 1, 512, {
            "CLUSTER_ID": str(clusters["silver"]), "SCHED_RANK": "-RUNNING_VMS"})["id"]
            for i in range(3)]
        db_vms = [rpc.allocate(1, f"e2e-db-{i}", 1.0, 1, 512, {
            "CLUSTER_ID": str(clusters["bronze"]),
            "VMGROUP": {"VMGROUP_NAME": "e2e-web", "ROLE": "db"}})["id"] for i in range(3)]
        app_vms = [rpc.allocate(1, f"e2e-app-{i}", 1.0, 1, 512, {
            "CLUSTER_ID": str(clusters["bronze"]),
            "VMGROUP": {"VMGROUP_NAME": "e2e-web", "ROLE": "app"}})["id"] for i in range(2)]
        big = rpc.allocate(1, "e2e-big", 8.0, 1, 512, {})["id"]

        everyone = gold + silver + db_vms + app_vms
        wait_until(lambda: all(rpc.get_vm(v)["status"] == "PROLOG" for v in everyone),
                   timeout=30, what="13 VMs placed")
        wait_until(lambda: rpc.get_vm(big)["sched_message"], timeout=15, what="a reason")
        shown = {v: rpc.get_vm(v) for v in everyone + [big]}
        by_id = {i: n for n, i in hosts.items()}
        on = {v: by_id[shown[v]["host_id"]] for v in everyone}

        # requirements over cluster and host attributes: gold hosts on rack r1 (1, 4, 7)
        assert {on[v] for v in gold} <= {"e2e-gold-1", "e2e-gold-4", "e2e-gold-7"}
        # packing: all five on the first of them, which has room for four
        assert sorted(on[v] for v in gold) == ["e2e-gold-1"] * 4 + ["e2e-gold-4"]
        # the CLUSTER_ID pin, and a striping rank of the VM's own: three silver hosts
        assert len({on[v] for v in silver}) == 3
        assert all(on[v].startswith("e2e-silver-") for v in silver)
        # db VMs apart, app VMs never beside a db VM
        db_hosts, app_hosts = {on[v] for v in db_vms}, {on[v] for v in app_vms}
        assert len(db_hosts) == 3 and not db_hosts & app_hosts
        assert all(h.startswith("e2e-bronze-") for h in db_hosts | app_hosts)
        group = {r["name"]: sorted(r["vms"]) for r in
                 next(g for g in rpc.list_vmgroups() if g["name"] == "e2e-web")["roles"]}
        assert group == {"db": sorted(db_vms), "app": sorted(app_vms)}
        # nothing has 8 CPUs: the big VM waits with the reason
        assert (shown[big]["status"], shown[big]["sched_message"]) == \
            ("PENDING", "Not enough CPU capacity: 800/400")

        # a bigger host joins: the big VM goes there at once (no sweep runs)
        late = FakeNodeTransport(amqp_uri, "e2e-late")
        rpc.create_host("e2e-late")
        monitor(late, "e2e-late", cpu=1600)
        cmd = late.next_command(timeout=15)
        assert (cmd["action"], cmd["vm_id"]) == ("clone", big)
        vm = rpc.get_vm(big)
        assert (vm["status"], vm["host"], vm["sched_message"]) == ("PROLOG", "e2e-late", None)
        # every node got exactly the clones of the VMs placed on it
        for name, node in nodes.items():
            got = [cmd["vm_id"] for cmd in node.waiting_commands()]
            assert sorted(got) == sorted(v for v in everyone if on[v] == name)
        for v in everyone + [big]:
            rpc.vm_action(v, "recover", {"operation": "delete"})
