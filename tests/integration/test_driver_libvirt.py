"""LibvirtBackend on libvirt's embedded test:///default driver: real libvirt
calls, with the domains living inside this process."""
import itertools
import os

import pytest

from services.drivers import backend
from services.drivers.libvirt_backend import LibvirtBackend

# test:///default is shared by the whole process: give every test its own VMs
_ids = itertools.count(9000)


@pytest.fixture
def lv(tmp_path):
    driver = LibvirtBackend("test:///default", str(tmp_path / "datastore"), shutdown_timeout=5)
    yield driver
    driver.close()


def a_vm(**template):
    return {"id": next(_ids), "name": "t", "cpu": 1, "vcpu": 1, "memory": 64,
            "template": template}


def states(lv):
    return {v["VM_ID"]: v["STATE"] for v in lv.monitor()["VMS"]}


def test_deploy_poll_shutdown_delete(lv):
    vm = a_vm(OS={"KERNEL": "/boot/vmlinuz"}, NIC={"NETWORK": "n"})
    lv.clone(vm)
    assert lv.deploy(vm) == f"cirrus-{vm['id']}"
    assert lv.poll(f"cirrus-{vm['id']}")["STATE"] == backend.RUNNING
    assert lv.poll(f"cirrus-{vm['id']}")["MEMORY"] == 64 * 1024
    assert states(lv)[vm["id"]] == backend.RUNNING
    lv.shutdown(f"cirrus-{vm['id']}", 5)
    assert lv.poll(f"cirrus-{vm['id']}")["STATE"] == backend.POWEROFF
    lv.delete(vm)
    assert lv.poll(f"cirrus-{vm['id']}") == {"STATE": backend.GONE}
    assert vm["id"] not in states(lv)
    assert not os.path.exists(lv.vm_dir(vm))


def test_every_action_is_idempotent(lv):
    vm = a_vm()
    name = f"cirrus-{vm['id']}"
    assert lv.deploy(vm) == lv.deploy(vm) == name
    assert list(states(lv)).count(vm["id"]) == 1
    lv.cancel(name)
    lv.cancel(name)
    assert states(lv)[vm["id"]] == backend.POWEROFF
    # a powered off domain is deployed again from a fresh definition
    assert lv.deploy(vm) == name
    assert states(lv)[vm["id"]] == backend.RUNNING
    lv.delete(vm)
    lv.delete(vm)
    lv.shutdown(name, 1)
    lv.cancel(name)
    assert vm["id"] not in states(lv)


def test_clone_copies_each_disk_into_the_vm_dir(lv, tmp_path):
    image = tmp_path / "base.img"
    image.write_bytes(b"\0" * 4096 + b"payload")
    vm = a_vm(DISK=[{"SOURCE": str(image)}, {"TYPE": "fs"}, {"PATH": str(image)}])
    info = lv.clone(vm)
    assert info["disks"] == [os.path.join(lv.vm_dir(vm), "disk.0"),
                             os.path.join(lv.vm_dir(vm), "disk.2")]
    assert all(open(p, "rb").read() == image.read_bytes() for p in info["disks"])
    assert lv.clone(vm) == info
    lv.deploy(vm)
    lv.delete(vm)
    assert not os.path.exists(lv.vm_dir(vm))
    assert image.exists()


def test_clone_without_disks_makes_just_the_dir(lv):
    vm = a_vm()
    assert lv.clone(vm)["disks"] == []
    assert os.listdir(lv.vm_dir(vm)) == []
    lv.delete(vm)


def test_clone_of_a_missing_source_names_the_path(lv):
    vm = a_vm(DISK={"SOURCE": "/nonexistent/cirrus/disk.img"})
    with pytest.raises(FileNotFoundError, match="/nonexistent/cirrus/disk.img"):
        lv.clone(vm)


def test_a_deploy_libvirt_refuses_raises_its_message_and_leaves_nothing(lv):
    vm = a_vm(OS={"ARCH": "bogus"})
    with pytest.raises(Exception, match="Unknown architecture bogus"):
        lv.deploy(vm)
    assert lv.poll(f"cirrus-{vm['id']}") == {"STATE": backend.GONE}


def test_monitor_reports_opennebula_names_and_only_cirrus_domains(lv):
    vm = a_vm()
    lv.deploy(vm)
    report = lv.monitor()
    for key in ("HYPERVISOR", "TOTALCPU", "CPUSPEED", "TOTALMEMORY", "USEDMEMORY",
                "FREEMEMORY", "USEDCPU", "FREECPU"):
        assert key in report, key
    assert report["HYPERVISOR"] == "test"
    # the test driver's host: 16 CPUs, 3 GiB
    assert report["TOTALCPU"] == 1600
    assert report["TOTALMEMORY"] == 3 * 1024 * 1024
    assert report["FREEMEMORY"] == report["TOTALMEMORY"] - report["USEDMEMORY"]
    assert report["FREECPU"] == report["TOTALCPU"] - report["USEDCPU"]
    assert {"DEPLOY_ID": f"cirrus-{vm['id']}", "VM_ID": vm["id"],
            "STATE": backend.RUNNING} in report["VMS"]
    # the driver's built-in "test" domain is not Cirrus's
    assert all(v["DEPLOY_ID"].startswith("cirrus-") for v in report["VMS"])
    lv.delete(vm)


def test_domain_type_follows_the_uri():
    assert LibvirtBackend("test:///default", "/tmp").domain_type == "test"
    assert LibvirtBackend("qemu:///system", "/tmp").domain_type in ("kvm", "qemu")
