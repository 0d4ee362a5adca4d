"""LibvirtBackend on qemu:///system, booting the tiny guest for real.

Needs root, libvirt-daemon-system and qemu-system-x86; skipped with
CIRRUS_SKIP_QEMU=1. The guest is built once into CIRRUS_GUEST_CACHE
(default /var/tmp/cirrus/guest)."""
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cirrus.config import REPO_ROOT
from services.drivers import backend
from services.drivers.libvirt_backend import CONSOLE_LOG, LibvirtBackend

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
def qemu_backend():
    # qemu runs as another user: keep the VM files out of root's private /tmp dirs
    datastore = Path("/var/tmp/cirrus/test-datastores") / f"{os.getpid()}-{random.randrange(10**6)}"
    lv = LibvirtBackend(URI, str(datastore), shutdown_timeout=30)
    yield lv
    lv.close()
    shutil.rmtree(datastore, ignore_errors=True)


def virsh_list():
    return subprocess.run(["virsh", "-c", URI, "list", "--name"], capture_output=True,
                          text=True, check=True).stdout.split()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.5)


def test_the_tiny_guest_boots_and_stops(tiny_guest, qemu_backend):
    lv = qemu_backend
    # qemu:///system is shared by the machine: an id no Cirrus database hands out soon
    vm = {"id": random.randrange(10**8, 10**9), "name": "tiny", "cpu": 1, "vcpu": 1,
          "memory": 256, "template": {
              "OS": {"KERNEL": str(tiny_guest / "vmlinuz"),
                     "INITRD": str(tiny_guest / "initrd.img"),
                     "KERNEL_CMDLINE": "console=ttyS0"},
              "NIC": {"NETWORK": "user"}}}
    console = Path(lv.vm_dir(vm)) / CONSOLE_LOG
    try:
        lv.clone(vm)
        deploy_id = lv.deploy(vm)
        assert deploy_id in virsh_list()
        assert lv.deploy(vm) == deploy_id
        wait_for(lambda: console.exists() and MARKER in console.read_text(errors="replace"),
                 60, f"no {MARKER!r} in {console}")

        report = lv.monitor()
        assert report["HYPERVISOR"] in ("kvm", "qemu")
        assert report["TOTALCPU"] == os.cpu_count() * 100
        assert {"DEPLOY_ID": deploy_id, "VM_ID": vm["id"], "STATE": backend.RUNNING} \
            in report["VMS"]
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
