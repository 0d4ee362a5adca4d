"""Placement end to end (issue 4), driven through the CLI as an operator would:
30 simulated hosts (one ``cirrus-node --simulate 30``) in 3 clusters, VMs
with requirements over cluster and host attributes, a VM group whose roles
are anti-affined, a VM that fits nowhere and says why in ``cirrus vm show``,
and a host added later that takes it at once: the scheduler's sweep is set
far beyond the test's waits, so only the new host's event can have placed it."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import Cluster
from tests.procs import Proc, wait_until

HOSTS = 30
SIM_CORES = 16              # cirrus-node's --sim-cores default: 1600 CPU per host
SWEEP_INTERVAL = 900        # seconds: the backstop must not be what places anything here
TIERS = ("gold", "silver", "bronze")


def in_parallel(function, items, threads=4):
    """CLI calls four at a time: each is a process of its own."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


@pytest.fixture
def sim_cluster(tmp_path):
    cluster = Cluster(tmp_path, simulate=HOSTS)
    cluster.env["CIRRUS_SCHEDULER_SWEEP_INTERVAL"] = str(SWEEP_INTERVAL)
    cluster.start()
    late_nodes = []
    cluster.late_nodes = late_nodes
    yield cluster
    for node in late_nodes:
        node.stop()
    cluster.stop()


def host_name(index):
    return f"sim-{index:04d}"


def placed(cluster, vm_ids):
    """{vm id: host name} once every VM of ``vm_ids`` is RUNNING."""
    def running():
        vms = {vm["id"]: vm for vm in cluster.json("vm", "list")}
        if all(vms[i]["status"] == "RUNNING" for i in vm_ids):
            return {i: vms[i]["host"] for i in vm_ids}
        return None
    return wait_until(running, timeout=60, interval=0.5, what=f"VMs {vm_ids} RUNNING")


def cpu_shortfall(message):
    """(needed, most free) of "Not enough CPU capacity: 2400/1600", else None."""
    prefix = "Not enough CPU capacity: "
    if not (message or "").startswith(prefix):
        return None
    return tuple(float(number) for number in message[len(prefix):].split("/"))


def test_thirty_hosts_three_clusters_requirements_anti_affinity_and_a_late_host(
        sim_cluster, tmp_path):
    cluster = sim_cluster
    wait_until(lambda: sum(h["state"] == "MONITORED" for h in cluster.json("host", "list"))
               == HOSTS, timeout=60, interval=1, what=f"{HOSTS} simulated hosts MONITORED")

    # 3 clusters of 10 hosts, each cluster with a TIER of its own
    cluster_ids = {tier: int(cluster.cli("cluster", "create", tier, f"TIER={tier}").stdout)
                   for tier in TIERS}
    tier_of = {host_name(i): TIERS[(i - 1) // 10] for i in range(1, HOSTS + 1)}
    in_parallel(lambda host: cluster.cli("cluster", "addhost", tier_of[host], host), tier_of)
    # host attributes: two GPU hosts, one in gold and one in bronze
    gpu_hosts = {host_name(4), host_name(27)}
    for host in gpu_hosts:
        cluster.cli("host", "update", host, "GPU=yes")
    shown = cluster.json("host", "show", host_name(27))
    assert shown["cluster_id"] == cluster_ids["bronze"] and shown["template"]["GPU"] == "yes"

    def create(name, *options):
        return cluster.create_vm("--name", name, "--cpu", "1", "--memory", "64", *options)

    # requirements over the cluster's attributes, the host's, and both
    silver = [create(f"silver-{i}", "--requirements", 'TIER = "silver"') for i in range(3)]
    gpu_gold = create("gpu-gold", "--requirements", 'GPU = "yes" & TIER = "gold"')
    # either GPU host matches; the rank picks the highest host id
    gpu_any = create("gpu-any", "--requirements", 'GPU = "yes"', "--rank", "ID")
    # sim-0020 is the one host named sim-002* outside bronze
    not_bronze = create("not-bronze", "--requirements", '!(TIER = "bronze") & NAME = "sim-002*"')
    # the template's CLUSTER_ID is a requirement of its own
    in_bronze = tmp_path / "bronze.tpl"
    in_bronze.write_text(f'CPU = 1\nMEMORY = 64\nCLUSTER_ID = "{cluster_ids["bronze"]}"\n')
    bronze = cluster.create_vm("--file", in_bronze, "--name", "bronze")
    where = placed(cluster, silver + [gpu_gold, gpu_any, not_bronze, bronze])
    assert {tier_of[where[vm]] for vm in silver} == {"silver"}
    assert where[gpu_gold] == host_name(4)
    assert where[gpu_any] == host_name(27)
    assert where[not_bronze] == host_name(20)
    assert tier_of[where[bronze]] == "bronze"

    # a VM group: db and web never share a host, and no two db VMs share one;
    # all in gold, where the default packing policy would otherwise stack them
    cluster.cli("vmgroup", "create", "shop", "--role", "db:ANTI_AFFINED", "--role", "web",
                "--anti-affined", "db,web")
    roles = {create(f"{role}-{i}", "--vmgroup", f"shop:{role}",
                    "--requirements", 'TIER = "gold"'): role
             for role, count in (("db", 2), ("web", 4)) for i in range(count)}
    where = placed(cluster, list(roles))
    db_hosts = [where[vm] for vm, role in roles.items() if role == "db"]
    web_hosts = {where[vm] for vm, role in roles.items() if role == "web"}
    assert len(set(db_hosts)) == 2 and not set(db_hosts) & web_hosts
    assert {tier_of[host] for host in where.values()} == {"gold"}

    # a VM bigger than any host: PENDING, and vm show says why
    big_cpu = SIM_CORES * 1.5
    big = cluster.create_vm("--name", "too-big", "--cpu", str(big_cpu), "--memory", "64")
    reason = wait_until(lambda: cluster.json("vm", "show", big)["sched_message"],
                        timeout=30, interval=0.5, what=f"VM {big}'s reason to wait")
    assert cpu_shortfall(reason) == (big_cpu * 100, SIM_CORES * 100)
    view = cluster.cli("vm", "show", big).stdout
    assert any(line.split(None, 1) == ["SCHEDULER", reason] for line in view.splitlines())
    assert cluster.json("vm", "show", big)["status"] == "PENDING"

    # a host with twice the cores joins: created, then its node starts; its
    # first report makes it MONITORED and the scheduler places the VM at once
    cluster.cli("host", "create", "late-0001")
    started = time.monotonic()
    cluster.late_nodes.append(Proc(
        ["cirrus-node", "--simulate", "1", "--prefix", "late", "--sim-cores",
         str(SIM_CORES * 2)], cluster.env, cluster.tmp / "late-node.log").start())
    cluster.cli("vm", "wait", big, "--state", "RUNNING", "--timeout", "60")
    waited = time.monotonic() - started
    assert cluster.json("vm", "show", big)["host"] == "late-0001"
    # the sweep is 15 minutes away: the host's event placed it
    assert waited < SWEEP_INTERVAL / 10
    history = cluster.json("vm", "show", big)["history"]
    assert [h["action"] for h in history][:2] == ["allocate", "deploy"]
