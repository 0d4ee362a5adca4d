"""Every service scaled out, under a storm, with one instance of each killed
in the middle of it: 3 schedulers, 2 lifecycles, 2 flows and 2 request
managers (``cirrus-launch --scale``) on 40 simulated hosts.

500 VMs are created through the SDK from 8 clients, along with three OneFlow
services, and one instance of each service is killed with SIGKILL while the
creates are in flight; then all of it is terminated the same way, killing the
other instances. Nothing may be lost (every VM RUNNING, then DONE; every
service RUNNING, then DONE), nothing done twice (each VM's history is its
path exactly once, each placed on exactly one host, usage equal to what runs
there), and the work must have been spread over the instances, as each one's
own /metrics shows."""
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cirrus.client import ClientError
from tests.e2e.conftest import Cluster
from tests.procs import wait_until
from tests.scrape import scrape, total

HOSTS, VMS, CLIENTS = 40, 500, 8
SCALE = {"scheduler": 3, "lifecycle": 2, "flow": 2, "requests": 2}
FLOWS, FLOW_VMS = 3, 3     # 4+ vCPUs would wait for approval (provision.bpmn)
DEPLOY_PATH = ["PENDING", "PROLOG", "BOOT", "RUNNING"]
TERMINATE_PATH = ["SHUTDOWN", "EPILOG", "DONE"]
# what a client does when the instance serving its call dies under it: asks again
RETRIED = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@pytest.fixture
def scaled(tmp_path):
    cluster = Cluster(tmp_path, simulate=HOSTS,
                      scale=",".join(f"{name}={n}" for name, n in SCALE.items())).start()
    yield cluster
    cluster.stop()


class Storm:
    """Calls from many clients at once; a call that meets a dying instance is
    asked again, as a client would, and counted."""

    def __init__(self, client):
        self.client = client
        self.retries = 0
        self.done = 0
        self._lock = threading.Lock()

    def call(self, function, *args, already=lambda exc: False, **kwargs):
        for attempt in range(4):
            try:
                result = function(*args, **kwargs)
                break
            except ClientError as exc:
                if attempt and already(exc):
                    result = None       # the first try did it before its answer was lost
                    break
                if exc.code not in RETRIED or attempt == 3:
                    raise
                with self._lock:
                    self.retries += 1
        with self._lock:
            self.done += 1
        return result

    def run(self, function, items, kill_after, kill):
        """``function`` over ``items`` from CLIENTS threads; ``kill()`` once
        ``kill_after`` calls have returned."""
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = pool.map(function, items)
            wait_until(lambda: self.done >= kill_after, timeout=180, interval=0.02,
                       what=f"{kill_after} calls done")
            kill()
            return list(results)


def kill_one_of_each(cluster, index):
    pids = {}
    for service in SCALE:
        name = f"{service}.{index}"
        pids[name] = cluster.kill(name, signal.SIGKILL)
    return pids


def wait_restarted(cluster, killed):
    for name, pid in killed.items():
        wait_until(lambda: cluster.pids(name) not in (None, pid), timeout=60,
                   what=f"{name} restarted by the supervisor")


def work_done(cluster):
    """{instance: RPC calls served and events handled}, from each one's /metrics."""
    done = {}
    for name, url in cluster.metrics_urls().items():
        if name.split(".")[0] in SCALE:
            samples = scrape(url)
            done[name] = (total(samples, "cirrus_rpc_calls_total")
                          + total(samples, "cirrus_events_handled_total"))
    return done


def paths(vm):
    return [h["to_status"] for h in vm["history"]]


def test_scaled_out_services_under_a_storm_lose_nothing_and_share_the_work(scaled):
    api = scaled.client(timeout=60)
    wait_until(lambda: sum(h["state"] == "MONITORED" for h in api.list_hosts()) == HOSTS,
               timeout=90, interval=1, what=f"{HOSTS} simulated hosts MONITORED")
    template = api.create_flow_template({
        "name": "storm", "deployment": "straight",
        "roles": [{"name": "web", "cardinality": FLOW_VMS,
                   "vm_template_contents": "CPU = 0.1\nMEMORY = 64\n"}]})

    # -- the create storm, killing instance 1 of each service in its middle
    storm = Storm(api)
    flows = [api.instantiate_flow_template(template["id"], name=f"storm-{i}")["id"]
             for i in range(FLOWS)]
    killed = {}
    ids = storm.run(lambda i: storm.call(api.create_vm, name=f"storm-{i}", cpu=0.5,
                                         memory=256, request_id=f"storm-{i}")["id"],
                    range(VMS), kill_after=VMS // 3,
                    kill=lambda: killed.update(kill_one_of_each(scaled, 1)))
    assert len(set(ids)) == VMS
    wait_restarted(scaled, killed)

    def all_in(wanted, vm_ids):
        vms = {vm["id"]: vm["status"] for vm in api.list_vms(include_done=True)}
        return all(vms.get(i) == wanted for i in vm_ids)
    wait_until(lambda: all_in("RUNNING", ids), timeout=240, interval=1,
               what=f"{VMS} VMs RUNNING")
    wait_until(lambda: all(api.get_flow(f)["state"] == "RUNNING" for f in flows), timeout=120,
               interval=1, what=f"{FLOWS} services RUNNING")

    # nothing made twice: exactly the VMs asked for, each placed once
    assert len([vm for vm in api.list_vms() if vm["name"].startswith("storm-")]) == VMS
    flow_vms = [node["vm_id"] for f in flows for role in api.get_flow(f)["roles"]
                for node in role["nodes"]]
    assert len(set(flow_vms)) == FLOWS * FLOW_VMS
    assert len(api.list_vms()) == VMS + FLOWS * FLOW_VMS
    vms = [api.get_vm(i) for i in ids]
    assert [vm["id"] for vm in vms if paths(vm) != DEPLOY_PATH] == []
    assert [vm["id"] for vm in vms if len(vm["stays"]) != 1] == []
    usage = {}      # CPU in hundredths, as hosts count it
    for vm in api.list_vms():
        usage[vm["host"]] = usage.get(vm["host"], 0) + round(vm["cpu"] * 100)
    for host in api.list_hosts():
        assert host["cpu_usage"] == usage.get(host["name"], 0) <= host["max_cpu"], host["name"]

    # the work was spread: every instance that ran through the storm served part of it
    served = work_done(scaled)
    for service, count in SCALE.items():
        survivors = [f"{service}.{i}" for i in range(2, count + 1)]
        assert all(served[name] > 0 for name in survivors), (service, served)

    # -- the terminate storm, killing instance 2 of each
    storm = Storm(api)
    for flow in flows:
        storm.call(api.delete_flow, flow)
    killed = {}
    storm.run(lambda i: storm.call(api.terminate_vm, i, hard=True,
                                   already=lambda exc: exc.code == "FAILED_PRECONDITION"),
              ids, kill_after=VMS // 3, kill=lambda: killed.update(kill_one_of_each(scaled, 2)))
    wait_restarted(scaled, killed)
    wait_until(lambda: all_in("DONE", ids), timeout=240, interval=1, what=f"{VMS} VMs DONE")
    wait_until(lambda: all(api.get_flow(f)["state"] == "DONE" for f in flows), timeout=120,
               interval=1, what=f"{FLOWS} services DONE")
    vms = [api.get_vm(i) for i in ids]
    assert [vm["id"] for vm in vms if paths(vm)[4:] != TERMINATE_PATH] == []
    assert {vm["status"] for vm in api.list_vms(include_done=True)} == {"DONE"}
    assert all(h["cpu_usage"] == 0 and h["mem_usage"] == 0 for h in api.list_hosts())
    # retries are what clients saw of the kills; say how many, they are not failures
    print(f"client retries during the terminate storm: {storm.retries}")
