"""Every VM action end to end, as an operator drives them with the ``cirrus`` CLI:
a cluster of two nodes on libvirt's embedded test:///default driver, every
service, the gateway and two driver workers as separate processes."""
import pytest

from tests.e2e.conftest import Cluster
from tests.procs import wait_until

TIMEOUT = "60"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), nodes=("node-1", "node-2"))
    yield c.start()
    c.stop()


def wait(cluster, vm_id, status):
    cluster.cli("vm", "wait", vm_id, "--state", status, "--timeout", TIMEOUT)
    return cluster.json("vm", "show", vm_id)


def act(cluster, vm_id, *action):
    """Run `cirrus vm ACTION ID ...`; returns the status the VM was left in."""
    return cluster.json("vm", action[0], vm_id, *action[1:])["status"]


def running_on(cluster, name, host):
    """A new VM deployed by hand on ``host``, RUNNING there."""
    vm_id = cluster.create_vm("--name", name, "--cpu", "0.1", "--memory", "32", "--hold")
    assert act(cluster, vm_id, "deploy", host) == "PROLOG"
    vm = wait(cluster, vm_id, "RUNNING")
    assert vm["host"] == host
    return vm


def capacity(cluster, host):
    shown = cluster.json("host", "show", host)
    return shown["cpu_usage"], shown["mem_usage"]


def test_power_cycles_keep_or_free_the_host(cluster):
    vm = running_on(cluster, "cycled", "node-1")
    vm_id, deploy_id = vm["id"], vm["deploy_id"]
    held = capacity(cluster, "node-1")
    assert held != (0, 0)

    assert act(cluster, vm_id, "poweroff") == "SHUTDOWN_POWEROFF"
    wait(cluster, vm_id, "POWEROFF")
    wait_until(lambda: cluster.domains("node-1").get(deploy_id) != "RUNNING", timeout=15,
               what="the domain stopped")
    assert capacity(cluster, "node-1") == held        # a powered-off VM keeps its host
    assert act(cluster, vm_id, "resume") == "BOOT_POWEROFF"
    wait(cluster, vm_id, "RUNNING")

    assert act(cluster, vm_id, "suspend") == "SAVE_SUSPEND"
    wait(cluster, vm_id, "SUSPENDED")
    assert capacity(cluster, "node-1") == held
    act(cluster, vm_id, "resume")
    wait(cluster, vm_id, "RUNNING")

    assert act(cluster, vm_id, "stop") == "SAVE_STOP"
    wait(cluster, vm_id, "STOPPED")
    assert capacity(cluster, "node-1") == (0, 0)      # a stopped VM frees its host
    assert act(cluster, vm_id, "resume") == "PENDING"
    resumed = wait(cluster, vm_id, "RUNNING")
    assert "BOOT_STOPPED" in [h["to_status"] for h in resumed["history"]]

    assert act(cluster, vm_id, "undeploy", "--hard") == "SHUTDOWN_UNDEPLOY"
    wait(cluster, vm_id, "UNDEPLOYED")
    act(cluster, vm_id, "resume")
    resumed = wait(cluster, vm_id, "RUNNING")
    assert "BOOT_UNDEPLOY" in [h["to_status"] for h in resumed["history"]]

    assert act(cluster, vm_id, "reboot") == "RUNNING"
    assert act(cluster, vm_id, "reboot", "--hard") == "RUNNING"

    def rebooted():
        shown = cluster.json("vm", "show", vm_id)
        actions = [h["action"] for h in shown["history"]]
        # both commands answered: the driver's result follows the last one
        return shown if "running_success" in actions[actions.index("reboot_hard"):] else None
    shown = wait_until(rebooted, timeout=30, what="the reboots answered")
    actions = [h["action"] for h in shown["history"]]
    assert actions.index("reboot") < actions.index("reboot_hard")
    assert shown["error"] is None and shown["status"] == "RUNNING"
    # each time it held a host is a stay; show prints them with the latest monitoring
    assert len(shown["stays"]) >= 3
    assert [s["reason"] for s in shown["stays"][:-1]][-2:] == ["stop", "undeploy_hard"]
    text = cluster.cli("vm", "show", vm_id).stdout
    assert "STAYS" in text and "HISTORY" in text

    # an action the state does not allow: the server's words, as they are
    refused = cluster.cli("vm", "release", vm_id, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"cirrus: FAILED_PRECONDITION: VM {vm_id}: cannot release "
                                      "a VM in RUNNING; it must be in one of: HOLD")
    cluster.cli("vm", "terminate", vm_id)
    wait(cluster, vm_id, "DONE")


def test_cold_migration_there_and_live_migration_back(cluster):
    vm = running_on(cluster, "mover", "node-1")
    vm_id, deploy_id = vm["id"], vm["deploy_id"]
    assert act(cluster, vm_id, "migrate", "node-2") == "SAVE_MIGRATE"
    wait_until(lambda: cluster.json("vm", "show", vm_id)["host"] == "node-2", timeout=60,
               what="the VM on node-2")
    moved = wait(cluster, vm_id, "RUNNING")
    assert moved["host"] == "node-2" and moved["target_host"] is None
    wait_until(lambda: cluster.domains("node-2").get(deploy_id) == "RUNNING", timeout=15,
               what="the domain running on node-2")
    assert capacity(cluster, "node-1") == (0, 0)

    host_2 = cluster.host_id("node-2")
    refused = cluster.cli("vm", "migrate", vm_id, host_2, check=False)
    assert "FAILED_PRECONDITION" in refused.stderr and "node-2" in refused.stderr

    assert act(cluster, vm_id, "migrate", "node-1", "--live") == "MIGRATE"
    wait_until(lambda: cluster.json("vm", "show", vm_id)["host"] == "node-1", timeout=60,
               what="the VM back on node-1")
    back = wait(cluster, vm_id, "RUNNING")
    assert [s["host"] for s in back["stays"]] == ["node-1", "node-2", "node-1"]
    assert [s["reason"] for s in back["stays"]] == ["migrate", "migrate_live", None]
    assert capacity(cluster, "node-2") == (0, 0)
    cluster.cli("vm", "terminate", vm_id, "--hard")
    wait(cluster, vm_id, "DONE")


def test_hold_release_and_recover_delete(cluster):
    vm_id = cluster.create_vm("--name", "held", "--cpu", "0.1", "--memory", "32", "--hold")
    assert cluster.json("vm", "show", vm_id)["status"] == "HOLD"
    assert act(cluster, vm_id, "release") == "PENDING"
    vm = wait(cluster, vm_id, "RUNNING")
    assert act(cluster, vm_id, "recover", "--delete") == "CLEANUP_DELETE"
    wait(cluster, vm_id, "DONE")
    wait_until(lambda: vm["deploy_id"] not in cluster.domains(vm["host"]), timeout=15,
               what="the domain gone")
    bad = cluster.cli("vm", "recover", vm_id, "--delete", "--retry", check=False)
    assert bad.returncode == 2 and "not allowed with argument" in bad.stderr


def test_host_flush_moves_the_vms_off(cluster):
    vm = running_on(cluster, "flushed", "node-1")
    assert cluster.json("host", "flush", "node-1")["state"] == "DISABLED"
    try:
        wait_until(lambda: cluster.json("vm", "show", vm["id"])["host"] == "node-2",
                   timeout=90, what="the scheduler moving the VM to node-2")
        moved = wait(cluster, vm["id"], "RUNNING")
        assert moved["resched"] is False
    finally:
        cluster.cli("host", "enable", "node-1")
    cluster.cli("vm", "terminate", vm["id"])
    wait(cluster, vm["id"], "DONE")


def test_accounting_shows_the_vms(cluster):
    vm = running_on(cluster, "counted", "node-2")
    report = cluster.json("accounting")
    lines = {line["id"]: line for line in report["vms"]}
    assert vm["id"] in lines and lines[vm["id"]]["hours"] > 0
    assert lines[vm["id"]]["cpu_hours"] == pytest.approx(0.1 * lines[vm["id"]]["hours"])
    assert [u["owner"] for u in report["users"]] == ["admin"]
    table = cluster.cli("accounting", "--user", "admin").stdout
    assert "counted" in table and "CPU_HOURS" in table
    # VMs of the earlier tests are in it too, terminated or not
    assert {"cycled", "mover"} <= {line["name"] for line in report["vms"]}


def test_vm_top_once_lists_the_running_vms(cluster):
    vm = running_on(cluster, "topped", "node-1")
    frame = cluster.cli("vm", "top", "--once").stdout.splitlines()
    assert frame[1].split()[:5] == ["ID", "NAME", "OWNER", "STAT", "HOST"]
    row = next(line.split() for line in frame[2:] if line.split()[0] == str(vm["id"]))
    assert row[1:5] == ["topped", "admin", "runn", "node-1"]
