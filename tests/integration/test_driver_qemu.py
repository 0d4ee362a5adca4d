"""LibvirtBackend on qemu:///system, booting the tiny guest for real, in-process
and through a worker process (vm.events, save and restore).

Needs root, libvirt-daemon-system and qemu-system-x86; skipped with
CIRRUS_SKIP_QEMU=1. The guest is built once into CIRRUS_GUEST_CACHE
(default /var/tmp/cirrus/guest)."""
import datetime
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import libvirt
import pytest

from cirrus import messages
from cirrus.config import REPO_ROOT
from services.drivers import backend
from services.drivers.libvirt_backend import CONSOLE_LOG, LibvirtBackend
from tests.node_worker import bus, now_iso, run_ok, start_node  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1", reason="CIRRUS_SKIP_QEMU=1"),
]

URI = "qemu:///system"
MARKER = "CIRRUS GUEST UP"
GUEST_CACHE = Path(os.environ.get("CIRRUS_GUEST_CACHE", "/var/tmp/cirrus/guest"))


@pytest.fixture(scope="module")
def tiny_guest():
    subprocess.run([str(REPO_ROOT / "deploy" / "libvirt-up.sh")], check=True, timeout=60)
    subprocess.run([str(REPO_ROOT / "deploy" / "guest" / "build-tiny-guest.sh"),
                    str(GUEST_CACHE)], check=True, timeout=600)
    return GUEST_CACHE


@pytest.fixture
def datastore():
    # qemu runs as another user: keep the VM files out of root's private /tmp dirs
    path = Path("/var/tmp/cirrus/test-datastores") / f"{os.getpid()}-{random.randrange(10**6)}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu_backend(datastore):
    lv = LibvirtBackend(URI, str(datastore), shutdown_timeout=30)
    yield lv
    lv.close()


def tiny_vm(guest, cmdline="console=ttyS0"):
    # qemu:///system is shared by the machine: an id no Cirrus database hands out soon
    return {"id": random.randrange(10**8, 10**9), "name": "tiny", "cpu": 1, "vcpu": 1,
            "memory": 256, "deploy_id": None, "runtime": {}, "template": {
                "OS": {"KERNEL": str(guest / "vmlinuz"), "INITRD": str(guest / "initrd.img"),
                       "KERNEL_CMDLINE": cmdline},
                "NIC": {"NETWORK": "user"}}}


def virsh_list():
    return subprocess.run(["virsh", "-c", URI, "list", "--name"], capture_output=True,
                          text=True, check=True).stdout.split()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.5)


def wait_for_console(vm_dir, text=MARKER, timeout=90):
    console = Path(vm_dir) / CONSOLE_LOG
    wait_for(lambda: console.exists() and text in console.read_text(errors="replace"),
             timeout, f"no {text!r} in {console}")


def test_the_tiny_guest_boots_and_stops(tiny_guest, qemu_backend):
    lv = qemu_backend
    vm = tiny_vm(tiny_guest)
    try:
        lv.clone(vm)
        deploy_id = lv.deploy(vm)
        assert deploy_id in virsh_list()
        assert lv.deploy(vm) == deploy_id
        wait_for_console(lv.vm_dir(vm))

        report = lv.monitor()
        assert report["HYPERVISOR"] in ("kvm", "qemu")
        assert report["TOTALCPU"] == os.cpu_count() * 100
        assert report["URI"] == URI
        (mine,) = [v for v in report["VMS"] if v["DEPLOY_ID"] == deploy_id]
        assert (mine["VM_ID"], mine["STATE"]) == (vm["id"], backend.RUNNING)
        assert mine["MEMORY"] > 0
        assert lv.poll(deploy_id)["STATE"] == backend.RUNNING

        # the guest powers off when libvirt presses its ACPI power button
        lv.shutdown(deploy_id, 30)
        assert deploy_id not in virsh_list()
        assert lv.poll(deploy_id)["STATE"] == backend.POWEROFF

        # a powered off domain deploys again; cancel pulls the plug
        lv.deploy(vm)
        assert deploy_id in virsh_list()
        lv.cancel(deploy_id)
        assert deploy_id not in virsh_list()
    finally:
        lv.delete(vm)
    assert lv.poll(f"cirrus-{vm['id']}") == {"STATE": backend.GONE}
    assert not Path(lv.vm_dir(vm)).exists()


# ---------------------------------------------------------------- through a worker

@pytest.fixture
def qemu_vm(start_node, bus, tiny_guest, datastore):
    """A worker on qemu:///system whose monitoring is a minute apart, so that
    whatever comes sooner came as an event; and a VM for it, deleted after."""
    host = f"qemu-{random.randrange(10**6)}"
    node = start_node(host, "--uri", URI, "--datastore", str(datastore),
                      env={"CIRRUS_DRIVERS_MONITOR_INTERVAL": "60",
                           "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "120"})
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host, timeout=30)
    vm = tiny_vm(tiny_guest, "console=ttyS0 quiet")
    yield node, vm
    # from here, not through the worker: the domain goes even if the test broke the worker
    cleaner = LibvirtBackend(URI, str(datastore))
    cleaner.delete(vm)
    cleaner.close()


def vm_event(bus, vm, state, since, timeout=10):
    return bus.wait_for(lambda k, b: k == messages.VM_EVENT and b["vm_id"] == vm["id"]
                        and b["state"] == state and b["at"] > since, timeout)


def test_a_domain_destroyed_behind_the_workers_back_is_a_vm_event(qemu_vm, bus):
    node, vm = qemu_vm
    # starting a domain can take libvirtd a while: wait for it longer than for the rest
    run_ok(bus, node.host, vm, "deploy", timeout=240)
    since = now_iso()
    conn = libvirt.open(URI)
    try:
        conn.lookupByName(f"cirrus-{vm['id']}").destroy()
        destroyed = datetime.datetime.now(datetime.timezone.utc)
    finally:
        conn.close()
    # the next monitoring report is a minute away: this can only be the event
    event = vm_event(bus, vm, "POWEROFF", since)
    received = datetime.datetime.now(datetime.timezone.utc)
    assert (event["host"], event["deploy_id"], event["reason"]) == \
        (node.host, f"cirrus-{vm['id']}", "STOPPED/DESTROYED")
    print(f"vm.event received {(received - destroyed).total_seconds() * 1000:.0f} ms "
          f"after destroy returned")


def test_a_real_guest_saved_restored_and_powering_itself_off(qemu_vm, bus, datastore):
    node, vm = qemu_vm
    name = vm["deploy_id"] = run_ok(bus, node.host, vm, "deploy", timeout=240)["deploy_id"]
    wait_for_console(datastore / str(vm["id"]))

    saved = run_ok(bus, node.host, vm, "save", timeout=60)
    assert Path(saved["checkpoint"]).stat().st_size > 0
    assert run_ok(bus, node.host, vm, "poll") == {"STATE": "GONE"}
    vm["runtime"].update(saved)
    assert run_ok(bus, node.host, vm, "restore", timeout=240) == {"deploy_id": name}
    assert run_ok(bus, node.host, vm, "poll")["STATE"] == "RUNNING"
    assert not Path(saved["checkpoint"]).exists()

    # the restored guest still listens to its power button: it powers itself off
    since = now_iso()
    subprocess.run(["virsh", "-c", URI, "shutdown", name], check=True, capture_output=True)
    event = vm_event(bus, vm, "POWEROFF", since, timeout=60)
    assert event["reason"] == "STOPPED/SHUTDOWN"
    # and stays defined, as a deployed domain would
    assert run_ok(bus, node.host, vm, "poll")["STATE"] == "POWEROFF"
