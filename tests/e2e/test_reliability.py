"""Reliability: the shared PostgreSQL and RabbitMQ restarted under a running
cluster, and a driver worker killed mid-deploy. Each restart test restarts
the machine's one server, so each runs once and brings it back whatever
happens."""
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from cirrus.client import ClientError
from cirrus.config import REPO_ROOT
from services.drivers.backend import domain_name, vm_id_of
from tests.conftest import rabbitmqctl
from tests.procs import wait_until

PG_CLUSTER = sorted(p.name for p in Path("/etc/postgresql").iterdir()) if \
    Path("/etc/postgresql").exists() else []


def pg_ctl(action):
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", PG_CLUSTER[-1], "main",
                    action], check=True, capture_output=True, timeout=120)


@contextmanager
def postgres_down():
    """PostgreSQL stopped for the body of the with, started again whatever happens."""
    pg_ctl("stop")
    try:
        yield
    finally:
        pg_ctl("start")


def outage_error(call):
    """The ClientError ``call`` raises during an outage, and how long it took."""
    started = time.monotonic()
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value, time.monotonic() - started


@pytest.mark.skipif(not PG_CLUSTER, reason="no local PostgreSQL cluster to restart")
def test_postgres_restart_fails_calls_unavailable_then_recovers(make_cluster):
    cluster = make_cluster(nodes=("pg-1",))
    client = cluster.client(timeout=25)
    wait_until(lambda: client.list_hosts()[0]["state"] == "MONITORED", what="host monitored")
    before = client.create_vm(name="before", cpu=0.1, memory=16)["id"]
    client.wait_vm(before, "RUNNING", timeout=60)
    # these deploy across the outage: driver results and monitoring reports
    # arrive while the database is away
    in_flight = [client.create_vm(name=f"across-{i}", cpu=0.1, memory=16)["id"]
                 for i in range(5)]

    with postgres_down():
        down_at = time.monotonic()
        calls = {"list": lambda: client.list_vms(),
                 "get": lambda: client.get_vm(before),
                 "create": lambda: client.create_vm(name="during", cpu=0.1, memory=16)}
        for name, call in calls.items():
            error, took = outage_error(call)
            # a clear refusal well inside the client's deadline, not a hang
            assert error.code == "UNAVAILABLE", (name, error)
            assert "database" in error.details.lower(), (name, error)
            assert took < 15, (name, took)
        time.sleep(max(0.0, 5 - (time.monotonic() - down_at)))
    # node events that failed went back to their queue after a pause, not in a
    # busy loop (which logs a failure per redelivery, thousands a second)
    redelivered = [line for line in cluster.proc.output().splitlines()
                   if "error handling worker <WorkerContext [lifecycle.on_" in line]
    assert len(redelivered) < 300, len(redelivered)

    # the services reconnect by themselves: the same processes serve again
    wait_until(lambda: _answers(client), timeout=60, what="the API answering again")
    ids = [client.create_vm(name=f"after-{i}", cpu=0.1, memory=16)["id"] for i in range(3)]
    everyone = [before, *in_flight, *ids]
    for vm_id in everyone:
        client.wait_vm(vm_id, "RUNNING", timeout=60)
    assert "during" not in {vm["name"] for vm in client.list_vms(include_done=True)}
    for vm_id in everyone:
        client.terminate_vm(vm_id, hard=True)
    for vm_id in everyone:
        client.wait_vm(vm_id, "DONE", timeout=60)


def _answers(client):
    try:
        client.list_vms()
        return True
    except ClientError:
        return False


# ------------------------------------------------------------------ RabbitMQ

@contextmanager
def rabbitmq_restarted_in_background(after, down_for=3.0):
    """Restart RabbitMQ's application in a thread once ``after`` is set; the
    with block ends only once it is back, whatever happened."""
    done = threading.Event()

    def restart():
        after.wait(120)
        try:
            rabbitmqctl("stop_app")
            time.sleep(down_for)
        finally:
            rabbitmqctl("start_app")
            done.set()

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        after.set()
        thread.join(180)
        if not done.is_set():
            rabbitmqctl("start_app")
        rabbitmqctl("await_startup")


RETRIED = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


def persist(call, timeout=120):
    """Call until it goes through, as a user would across an outage."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ClientError as exc:
            if exc.code not in RETRIED or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def create_persistently(client, name):
    # one request id for every try: a create that went through is not repeated
    request_id = uuid.uuid4().hex
    return persist(lambda: client.create_vm(name=name, cpu=0.1, memory=16,
                                            request_id=request_id))["id"]


def terminate_persistently(client, vm_id):
    """Terminate; a try whose answer was lost leaves the VM on its way out,
    which makes the next try FAILED_PRECONDITION."""
    try:
        persist(lambda: client.terminate_vm(vm_id))
    except ClientError as exc:
        status = client.get_vm(vm_id)["status"]
        if exc.code != "FAILED_PRECONDITION" or status not in ("SHUTDOWN", "EPILOG", "DONE"):
            raise


def statuses(client, prefix):
    vms = [vm for vm in persist(lambda: client.list_vms(include_done=True))
           if vm["name"].startswith(prefix)]
    return {vm["id"]: vm["status"] for vm in vms}, vms


def test_rabbitmq_restart_while_vms_come_and_go(make_cluster):
    cluster = make_cluster(nodes=("mq-1",))
    client = cluster.client(timeout=20)
    wait_until(lambda: client.list_hosts()[0]["state"] == "MONITORED", what="host monitored")
    # 15 VMs running, to be terminated across the restart, and 15 created across it
    old = [create_persistently(client, f"mq-old-{i}") for i in range(15)]
    for vm_id in old:
        client.wait_vm(vm_id, "RUNNING", timeout=60)

    started = threading.Event()
    with rabbitmq_restarted_in_background(after=started) as back:
        def step(i):
            """Terminate an old VM and create a new one, paced so that the
            30 calls span the time RabbitMQ is away."""
            if i == 3:
                started.set()
            time.sleep(0.6)
            terminate_persistently(client, old[i])
            return create_persistently(client, f"mq-new-{i}")

        with ThreadPoolExecutor(3) as pool:
            new = list(pool.map(step, range(15)))
        assert back.wait(180), "RabbitMQ did not come back"

    def settled():
        now, _ = statuses(client, "mq-")
        return all(now[i] == "DONE" for i in old) and all(now[i] == "RUNNING" for i in new)
    try:
        wait_until(settled, timeout=120, interval=1, what="every VM in its expected state")
    finally:
        now, vms = statuses(client, "mq-")
        print({i: s for i, s in now.items() if s not in ("DONE", "RUNNING")})
    # nothing lost, nothing made twice
    assert sorted(vm["name"] for vm in vms) == sorted(
        [f"mq-old-{i}" for i in range(15)] + [f"mq-new-{i}" for i in range(15)])
    shown = [client.get_vm(i) for i in new]
    assert len({vm["deploy_id"] for vm in shown}) == 15
    wait_until(lambda: {vm["deploy_id"] for vm in shown} == set(cluster.domains("mq-1")),
               timeout=30, what="exactly the new VMs' domains on the node")
    host = client.list_hosts()[0]
    assert (host["cpu_usage"], host["running_vms"]) == (10 * 15, 15)
    # every service is still there: a full round trip through all of them
    last = create_persistently(client, "after-restart")
    client.wait_vm(last, "RUNNING", timeout=60)


# ------------------------------------------------------------------ driver worker

QEMU = "qemu:///system"
QEMU_MARKS = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1", reason="CIRRUS_SKIP_QEMU=1"),
]


def qemu_domains():
    """Every domain on qemu:///system, by name: state ("running", "shut off"...)."""
    out = subprocess.run(["virsh", "-c", QEMU, "list", "--all"], capture_output=True,
                         text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[2:] if line.strip()]
    return {row[1]: row[2].strip() for row in rows if len(row) == 3}


def remove_domains(names):
    """Leave nothing on the shared hypervisor, whatever the test did."""
    for name in names:
        subprocess.run(["virsh", "-c", QEMU, "destroy", name], capture_output=True)
        subprocess.run(["virsh", "-c", QEMU, "undefine", name], capture_output=True)


@pytest.fixture
def qemu_cluster(make_cluster):
    subprocess.run([str(REPO_ROOT / "deploy" / "libvirt-up.sh")], check=True, timeout=120)
    made = []

    def make(node):
        cluster = make_cluster(nodes=(node,), uri=QEMU).isolate_vm_ids()
        made.append(cluster)
        return cluster
    yield make
    for cluster in made:
        remove_domains(domain_name(vm["id"])
                       for vm in persist(lambda: cluster.client().list_vms(include_done=True)))


DEPLOY_PATH = ["PENDING", "PROLOG", "BOOT", "RUNNING"]


@pytest.mark.parametrize("backend", ["simulated", pytest.param("qemu", marks=QEMU_MARKS)])
def test_driver_worker_killed_while_deploying(backend, make_cluster, tmp_path, request):
    """On two hypervisors whose domains outlive a killed worker, as a real
    one's do (test:///default's die with the worker's process): the simulated
    one with its state file, each action taking a moment so the kill lands
    mid-deploy, and qemu:///system with guests that have no OS (the firmware
    finds nothing to boot and idles, so 20 of them are cheap)."""
    if backend == "qemu":
        cluster = request.getfixturevalue("qemu_cluster")("kill-1")
    else:
        state = tmp_path / "sim-{node}.json"
        cluster = make_cluster(nodes=("kill-1",), node_args="--backend simulated "
                               f"--sim-delay 0.4 --sim-state {state}")
    client = cluster.client()
    wait_until(lambda: client.list_hosts()[0]["state"] == "MONITORED", what="host monitored")
    old_pid = cluster.pids("kill-1.1")

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: client.create_vm(name=f"kill-{i}", cpu=0.1, memory=32)["id"],
                            range(20)))

    def some_booted():
        now = [vm["status"] for vm in client.list_vms()]
        return sum(s in ("BOOT", "RUNNING") for s in now) >= 3 and now
    at_kill = wait_until(some_booted, timeout=60, interval=0.05, what="the first VMs booting")
    cluster.kill("kill-1.1", signal.SIGKILL)
    assert at_kill.count("RUNNING") < 20, "every VM was deployed before the kill"

    wait_until(lambda: cluster.pids("kill-1.1") not in (None, old_pid), timeout=30,
               what="the worker restarted by the supervisor")
    for vm_id in ids:
        client.wait_vm(vm_id, "RUNNING", timeout=120)
    vms = [client.get_vm(vm_id) for vm_id in ids]
    # straight through: no driver failure on the way, e.g. from a deploy redone
    assert [[h["to_status"] for h in vm["history"]] for vm in vms] == [DEPLOY_PATH] * 20
    deploy_ids = {vm["deploy_id"] for vm in vms}
    assert len(deploy_ids) == 20
    # the hypervisor holds one running domain per VM, and nothing else of ours
    if backend == "qemu":
        held = {name: state for name, state in qemu_domains().items()
                if vm_id_of(name) in range(min(ids), max(ids) + 1)}
        assert held == {d: "running" for d in deploy_ids}
    else:
        held = json.loads((tmp_path / "sim-kill-1.json").read_text())["domains"]
        assert {name: d["state"] for name, d in held.items()} == \
            {d: "RUNNING" for d in deploy_ids}
    def reported():
        """What the node reports of this cluster's domains (a shared
        hypervisor may also hold other clusters')."""
        return {name: state for name, state in cluster.domains("kill-1").items()
                if vm_id_of(name) in range(min(ids), max(ids) + 1)}
    wait_until(lambda: reported() == {d: "RUNNING" for d in deploy_ids},
               timeout=15, what="the node reporting exactly the 20 domains")
    # the commands unanswered at the kill came back to the new worker
    assert "redelivered command" in cluster.proc.output()
    host = client.list_hosts()[0]
    assert (host["cpu_usage"], host["running_vms"]) == (10 * 20, 20)

    # and the restarted worker serves on: every VM goes away
    for vm_id in ids:
        client.terminate_vm(vm_id, hard=True)
    for vm_id in ids:
        client.wait_vm(vm_id, "DONE", timeout=120)
    wait_until(lambda: not reported(), timeout=15, what="no domain left")


# ------------------------------------------------------------------ real guest

GUEST = Path(os.environ.get("CIRRUS_GUEST_CACHE", "/var/tmp/cirrus/guest"))
GUEST_UP = "CIRRUS GUEST UP"        # what the tiny guest prints once it listens


@pytest.mark.qemu
@pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1", reason="CIRRUS_SKIP_QEMU=1")
def test_a_real_guest_powering_itself_off_is_poweroff_then_resumes(qemu_cluster, tmp_path):
    subprocess.run([str(REPO_ROOT / "deploy" / "guest" / "build-tiny-guest.sh"), str(GUEST)],
                   check=True, timeout=600)
    cluster = qemu_cluster("self-off-1")
    template = tmp_path / "tiny.tpl"
    template.write_text(f'''CPU = 0.5
VCPU = 1
MEMORY = 128
OS = [ KERNEL = "{GUEST}/vmlinuz", INITRD = "{GUEST}/initrd.img",
       KERNEL_CMDLINE = "console=ttyS0 quiet" ]
''')
    vm_id = cluster.create_vm("--file", template, "--name", "self-off")
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "240")
    name = cluster.json("vm", "show", vm_id)["deploy_id"]
    console = cluster.datastore / str(vm_id) / "console.log"
    wait_until(lambda: console.exists() and GUEST_UP in console.read_text(errors="replace"),
               timeout=180, what="the guest listening to its power button")

    # the ACPI power button: the guest itself runs poweroff, Cirrus is not asked
    subprocess.run(["virsh", "-c", QEMU, "shutdown", name], check=True, capture_output=True)
    cluster.cli("vm", "wait", vm_id, "--state", "POWEROFF", "--timeout", "60")
    assert qemu_domains()[name] == "shut off"
    vm = cluster.json("vm", "show", vm_id)
    assert vm["host"] == "self-off-1"       # a powered off VM keeps its host

    cluster.cli("vm", "resume", vm_id)
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "240")
    assert qemu_domains()[name] == "running"
    cluster.cli("vm", "terminate", vm_id, "--hard")
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "120")
    assert name not in qemu_domains()
