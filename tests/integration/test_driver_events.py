"""A node hears of its domains' changes as they happen, from libvirt's lifecycle
events, whoever made them: in-process on test:///default, and through a worker
process on qemu:///system with the tiny guest (skipped with CIRRUS_SKIP_QEMU=1)."""
import datetime
import itertools
import os
import queue
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
from services.drivers.simulated import SimulatedBackend
from services.drivers.worker import NodeWorker
from tests.node_worker import bus, now_iso, start_node  # noqa: F401 (fixtures)

_ids = itertools.count(9500)


class Heard:
    """What a backend's watch callback was told, to wait on."""

    def __init__(self):
        self.news = queue.Queue()

    def __call__(self, deploy_id, state, reason):
        self.news.put((deploy_id, state, reason))

    def next_about(self, deploy_id, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            try:
                news = self.news.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no event about {deploy_id} within {timeout} s") from None
            if news[0] == deploy_id:
                return news[1:]


@pytest.fixture
def watched(tmp_path):
    lv = LibvirtBackend("test:///default", str(tmp_path / "datastore"))
    heard = Heard()
    lv.watch(heard)
    yield lv, heard
    lv.close()


def a_vm():
    return {"id": next(_ids), "name": "e", "cpu": 1, "vcpu": 1, "memory": 64, "template": {}}


def test_a_domain_destroyed_behind_the_backends_back_is_heard(watched):
    lv, heard = watched
    vm = a_vm()
    name = lv.deploy(vm)
    assert heard.next_about(name) == (backend.RUNNING, "STARTED/BOOTED")
    other = libvirt.open("test:///default")     # someone else's connection
    try:
        other.lookupByName(name).destroy()
    finally:
        other.close()
    assert heard.next_about(name) == (backend.POWEROFF, "STOPPED/DESTROYED")
    lv.delete(vm)
    assert heard.next_about(name) == (backend.GONE, "UNDEFINED/REMOVED")


def test_pause_resume_save_and_restore_are_heard(watched):
    lv, heard = watched
    vm = a_vm()
    name = lv.deploy(vm)
    heard.next_about(name)
    dom = lv.conn.lookupByName(name)
    dom.suspend()
    assert heard.next_about(name) == (backend.PAUSED, "SUSPENDED/PAUSED")
    dom.resume()
    assert heard.next_about(name) == (backend.RUNNING, "RESUMED/UNPAUSED")
    lv.save(vm)
    assert heard.next_about(name) == (backend.POWEROFF, "STOPPED/SAVED")
    assert heard.next_about(name) == (backend.GONE, "UNDEFINED/REMOVED")
    lv.restore(vm)
    assert heard.next_about(name) == (backend.RUNNING, "STARTED/RESTORED")
    lv.delete(vm)


def test_events_keep_coming_over_a_new_connection(watched):
    lv, heard = watched
    # test:///default lives as long as a connection to it: this one keeps it up
    keeper = libvirt.open("test:///default")
    try:
        vm = a_vm()
        name = lv.deploy(vm)
        heard.next_about(name)
        lv.close()              # as if the connection were lost; the next call opens another
        lv.cancel(name)
        assert lv.reconnects == 1
        assert heard.next_about(name) == (backend.POWEROFF, "STOPPED/DESTROYED")
        lv.delete(vm)
    finally:
        keeper.close()


def test_the_worker_turns_news_of_cirrus_domains_into_vm_events():
    worker = NodeWorker("node-e", SimulatedBackend(), "amqp://unused")
    worker.on_domain_event("test", backend.POWEROFF, "STOPPED/DESTROYED")   # not Cirrus's
    before = now_iso()
    worker.on_domain_event("cirrus-12", backend.POWEROFF, "STOPPED/DESTROYED")
    assert list(worker.vm_events) == [
        {"host": "node-e", "vm_id": 12, "deploy_id": "cirrus-12", "state": backend.POWEROFF,
         "reason": "STOPPED/DESTROYED", "at": worker.vm_events[0]["at"]}]
    assert worker.vm_events[0]["at"] >= before


# ---------------------------------------------------------------- real guests

skip_qemu = pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1",
                               reason="CIRRUS_SKIP_QEMU=1")
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
def qemu_node(start_node, bus, tiny_guest):
    """A worker on qemu:///system whose monitoring is a minute apart, so whatever
    arrives sooner came as an event."""
    # qemu runs as another user: keep the VM files out of root's private /tmp dirs
    datastore = Path("/var/tmp/cirrus/test-datastores") / f"{os.getpid()}-{random.randrange(10**6)}"
    host = f"qemu-{random.randrange(10**6)}"
    node = start_node(host, "--uri", URI, "--datastore", str(datastore),
                      env={"CIRRUS_DRIVERS_MONITOR_INTERVAL": "60"})
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host, timeout=30)
    vms = []
    yield node, datastore, vms
    for vm in vms:
        bus.result(bus.send(host, messages.command("delete", vm["id"], host, vm=vm)))
    shutil.rmtree(datastore, ignore_errors=True)
    shutil.rmtree(datastore.parent / "parked", ignore_errors=True)


def tiny_vm(guest):
    # qemu:///system is shared by the machine: an id no Cirrus database hands out soon
    return {"id": random.randrange(10**8, 10**9), "name": "tiny", "cpu": 1, "vcpu": 1,
            "memory": 128, "deploy_id": None, "runtime": {}, "template": {
                "OS": {"KERNEL": str(guest / "vmlinuz"), "INITRD": str(guest / "initrd.img"),
                       "KERNEL_CMDLINE": "console=ttyS0 quiet"}}}


def run_ok(bus, host, vm, action, timeout=60, **args):
    result = bus.result(bus.send(host, messages.command(action, vm["id"], host, vm=vm, **args)),
                        timeout)
    assert result["success"], result
    return result["info"]


def vm_event(bus, vm, state, since, timeout=10):
    return bus.wait_for(lambda k, b: k == messages.VM_EVENT and b["vm_id"] == vm["id"]
                        and b["state"] == state and b["at"] > since, timeout)


def wait_for_console(vm_dir, text, timeout=90):
    console = Path(vm_dir) / CONSOLE_LOG
    deadline = time.monotonic() + timeout
    while not (console.exists() and text in console.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {console} within {timeout} s")
        time.sleep(0.5)


@pytest.mark.qemu
@skip_qemu
def test_a_real_domain_destroyed_behind_the_workers_back_is_a_vm_event(qemu_node, bus):
    node, datastore, vms = qemu_node
    vm = tiny_vm(GUEST_CACHE)
    vms.append(vm)
    run_ok(bus, node.host, vm, "deploy")
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


@pytest.mark.qemu
@skip_qemu
def test_a_real_guest_saved_restored_and_powering_itself_off(qemu_node, bus):
    node, datastore, vms = qemu_node
    vm = tiny_vm(GUEST_CACHE)
    vms.append(vm)
    name = run_ok(bus, node.host, vm, "deploy")["deploy_id"]
    vm["deploy_id"] = name
    vm_dir = datastore / str(vm["id"])
    wait_for_console(vm_dir, MARKER)

    saved = run_ok(bus, node.host, vm, "save")
    assert Path(saved["checkpoint"]).stat().st_size > 0
    assert run_ok(bus, node.host, vm, "poll") == {"STATE": "GONE"}
    vm["runtime"].update(saved)
    assert run_ok(bus, node.host, vm, "restore") == {"deploy_id": name}
    assert run_ok(bus, node.host, vm, "poll")["STATE"] == "RUNNING"
    assert not Path(saved["checkpoint"]).exists()

    # the restored guest still listens to its power button: it powers itself off
    since = now_iso()
    subprocess.run(["virsh", "-c", URI, "shutdown", name], check=True, capture_output=True)
    event = vm_event(bus, vm, "POWEROFF", since, timeout=60)
    assert event["reason"] == "STOPPED/SHUTDOWN"
    # and stays defined, as a deployed domain would
    assert run_ok(bus, node.host, vm, "poll")["STATE"] == "POWEROFF"
