"""Several copies of each service, and a service killed mid-flight: every VM
is placed once, no host is over-committed, and nothing is lost."""
import signal
from concurrent.futures import ThreadPoolExecutor

from cirrus.client import Client
from tests.procs import wait_until


def client_for(cluster):
    admin = Client(f"127.0.0.1:{cluster.port}", username="admin", password="cirrus")
    return Client(f"127.0.0.1:{cluster.port}", token=admin.login()["token"])


def create_many(client, n, prefix, cpu, memory, threads=6):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(
            lambda i: client.create_vm(name=f"{prefix}-{i}", cpu=cpu, memory=memory)["id"],
            range(n)))


def wait_all(client, ids, status, timeout=180):
    def reached():
        vms = {vm["id"]: vm["status"] for vm in client.list_vms(include_done=True)}
        return all(vms.get(i) == status for i in ids)
    wait_until(reached, timeout, interval=0.5, what=f"{len(ids)} VMs {status}")


def transitions(vm):
    return [(h["from_status"], h["to_status"]) for h in vm["history"]]


DEPLOY_PATH = [("INIT", "PENDING"), ("PENDING", "PROLOG"), ("PROLOG", "BOOT"),
               ("BOOT", "RUNNING")]


def test_two_schedulers_and_two_lifecycles_place_every_vm_once(make_cluster):
    cluster = make_cluster(nodes=("two-a", "two-b"), scale="scheduler=2,lifecycle=2")
    client = client_for(cluster)
    wait_until(lambda: all(h["state"] == "MONITORED" for h in client.list_hosts()),
               what="both hosts monitored")
    # 0.6 CPU each: a 16-core test host takes 26, so 50 VMs need both hosts,
    # and a double reservation would show as usage above MAX_CPU
    ids = create_many(client, 50, "two", cpu=0.6, memory=32)
    assert len(set(ids)) == 50
    wait_all(client, ids, "RUNNING")

    vms = [client.get_vm(i) for i in ids]
    assert all(transitions(vm) == DEPLOY_PATH for vm in vms)
    per_host = {}
    for vm in vms:
        per_host.setdefault(vm["host"], []).append(vm)
    for host in client.list_hosts():
        placed = per_host.get(host["name"], [])
        assert host["cpu_usage"] == 60 * len(placed) <= host["max_cpu"]
        assert host["mem_usage"] == 32 * len(placed) <= host["max_mem"]
        wait_until(lambda: len(cluster.domains(host["name"])) == len(placed), timeout=15,
                   what=f"{len(placed)} domains on {host['name']}")

    # both copies of each service did part of the work
    log = cluster.proc.output()
    for name in ("scheduler.1", "scheduler.2"):
        assert any(name in line and "placed on" in line for line in log.splitlines()), name
    for i in ids:
        client.terminate_vm(i, hard=True)
    wait_all(client, ids, "DONE")


def test_killing_lifecycle_while_vms_deploy_loses_nothing(make_cluster):
    cluster = make_cluster(nodes=("crash-a",))
    client = client_for(cluster)
    wait_until(lambda: client.list_hosts()[0]["state"] == "MONITORED", what="host monitored")
    old_pid = cluster.pids("lifecycle.1")

    with ThreadPoolExecutor(1) as side:
        creating = side.submit(create_many, client, 30, "crash", 0.1, 16)
        wait_until(lambda: len(client.list_vms()) >= 8, timeout=60, interval=0.05,
                   what="the first VMs created")
        cluster.kill("lifecycle.1", signal.SIGKILL)
        ids = creating.result(timeout=180)

    wait_until(lambda: cluster.pids("lifecycle.1") not in (None, old_pid), timeout=30,
               what="lifecycle restarted by the supervisor")
    assert len(set(ids)) == 30
    wait_all(client, ids, "RUNNING")
    vms = [client.get_vm(i) for i in ids]
    assert all(transitions(vm) == DEPLOY_PATH for vm in vms), \
        [transitions(vm) for vm in vms if transitions(vm) != DEPLOY_PATH]
    assert len([vm for vm in client.list_vms(include_done=True)
                if vm["name"].startswith("crash-")]) == 30
    host = client.list_hosts()[0]
    assert host["cpu_usage"] == 10 * 30 and host["running_vms"] == 30
    wait_until(lambda: len(cluster.domains("crash-a")) == 30, timeout=15,
               what="30 domains on the node")
