"""The simulated backend at scale, end to end: one ``cirrus-node --simulate``
process serves 500 hosts (registered by itself), 2,000 VMs are created through
the SDK, all run, spread so that every host is exactly full, and all are
terminated to DONE with every host's capacity given back.

CIRRUS_SIM_HOSTS and CIRRUS_SIM_VMS change the sizes (VMs a multiple of hosts).
At 500/2,000 it takes 4.5 to 7 minutes on the shared 2-core machine: the
simulator uses under a tenth of a core; the time goes to lifecycle's creates
and terminates (gateway Create 0.3-1.7 s, Terminate ~0.7 s at 8 clients)."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import Cluster
from tests.procs import wait_until

HOSTS = int(os.environ.get("CIRRUS_SIM_HOSTS", 500))
VMS = int(os.environ.get("CIRRUS_SIM_VMS", 2000))
CORES, MEMORY_MB = 16, 32768            # cirrus-node's --sim-cores and --sim-memory defaults


@pytest.fixture
def sim_cluster(tmp_path):
    cluster = Cluster(tmp_path, simulate=HOSTS).start()
    yield cluster
    cluster.stop()


def in_parallel(function, items, threads=8):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


def wait_all(client, ids, status, timeout):
    def reached():
        vms = {vm["id"]: vm["status"] for vm in client.list_vms(include_done=True)}
        return all(vms.get(i) == status for i in ids)
    wait_until(reached, timeout, interval=3, what=f"{len(ids)} VMs {status}")


def test_500_simulated_hosts_run_2000_vms_and_give_everything_back(sim_cluster):
    assert VMS % HOSTS == 0, "CIRRUS_SIM_VMS must be a multiple of CIRRUS_SIM_HOSTS"
    per_host = VMS // HOSTS
    client = sim_cluster.client(timeout=60)
    names = [f"sim-{i:04d}" for i in range(1, HOSTS + 1)]
    assert sorted(h["name"] for h in client.list_hosts()) == names
    wait_until(lambda: all(h["state"] == "MONITORED" for h in client.list_hosts()),
               timeout=60, interval=1, what=f"{HOSTS} simulated hosts MONITORED")

    # sized so that the VMs fill every host exactly: the scheduler must use them all
    cpu, memory = CORES / per_host, MEMORY_MB // per_host
    ids = in_parallel(lambda i: client.create_vm(name=f"s{i}", cpu=cpu, memory=memory)["id"],
                      range(VMS))
    assert len(set(ids)) == VMS
    wait_all(client, ids, "RUNNING", timeout=240)

    placed = {}
    for vm in client.list_vms():
        placed.setdefault(vm["host"], []).append(vm["id"])
    hosts = client.list_hosts()
    assert sorted(placed) == names
    for host in hosts:
        on_it = len(placed[host["name"]])
        assert on_it == per_host, (host["name"], on_it)
        assert host["cpu_usage"] == round(cpu * 100) * on_it <= host["max_cpu"] == CORES * 100
        assert host["mem_usage"] == memory * on_it <= host["max_mem"] == MEMORY_MB
    # and the simulator's own reports agree: each host runs its VMs, with usage to show
    def reported():
        return all(len(h["monitoring"].get("VMS", [])) == per_host
                   for h in client.list_hosts())
    wait_until(reported, timeout=60, interval=2, what="every host reporting its VMs")
    sample = client.get_host(hosts[0]["id"])["monitoring"]
    assert sorted(vm["VM_ID"] for vm in sample["VMS"]) == sorted(placed[hosts[0]["name"]])
    assert all(vm["STATE"] == "RUNNING" and vm["CPU"] > 0 for vm in sample["VMS"])
    assert sample["USEDMEMORY"] >= memory * per_host * 1024 and sample["USEDCPU"] > 0
    shown = sim_cluster.cli("host", "show", hosts[0]["name"]).stdout
    assert "DS_LOCATION_FREE_MB" in shown and "NETRX" in shown and "USEDCPU" in shown

    in_parallel(lambda vm_id: client.terminate_vm(vm_id), ids)
    wait_all(client, ids, "DONE", timeout=240)
    for host in client.list_hosts():
        assert (host["cpu_usage"], host["mem_usage"], host["running_vms"]) == (0, 0, 0), host
