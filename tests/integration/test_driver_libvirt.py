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
    assert report["URI"] == "test:///default"
    (mine,) = [v for v in report["VMS"] if v["VM_ID"] == vm["id"]]
    assert (mine["DEPLOY_ID"], mine["STATE"], mine["MEMORY"]) == \
        (f"cirrus-{vm['id']}", backend.RUNNING, 64 * 1024)
    # the test driver makes up disk and NIC counters; CPU needs two samples
    for key in ("CPU", "NETRX", "NETTX", "DISKRDBYTES", "DISKWRBYTES"):
        assert isinstance(mine[key], (int, float)) and mine[key] >= 0, key
    # the driver's built-in "test" domain is not Cirrus's
    assert all(v["DEPLOY_ID"].startswith("cirrus-") for v in report["VMS"])
    lv.delete(vm)


def test_domain_type_follows_the_uri():
    assert LibvirtBackend("test:///default", "/tmp").domain_type == "test"
    assert LibvirtBackend("qemu:///system", "/tmp").domain_type in ("kvm", "qemu")


def domain(lv, vm):
    return lv.conn.lookupByName(f"cirrus-{vm['id']}")


def test_save_and_restore_twice_each(lv):
    vm = a_vm()
    name = lv.deploy(vm)
    info = lv.save(vm)
    assert info == {"checkpoint": os.path.join(lv.vm_dir(vm), "checkpoint"),
                    "vm_dir": lv.vm_dir(vm)}
    assert os.path.isfile(info["checkpoint"])
    assert lv.poll(name) == {"STATE": backend.GONE}      # saved and undefined
    assert lv.save(vm) == info                            # nothing left to save: done already
    assert lv.restore({**vm, "runtime": info}) == name
    assert lv.poll(name)["STATE"] == backend.RUNNING
    assert not os.path.exists(info["checkpoint"])
    assert lv.restore({**vm, "runtime": info}) == name    # running already
    # restored domains are defined again: a power off leaves them there
    lv.cancel(name)
    assert lv.poll(name)["STATE"] == backend.POWEROFF
    lv.delete(vm)


def test_restore_resumes_a_paused_domain(lv):
    vm = a_vm()
    name = lv.deploy(vm)
    domain(lv, vm).suspend()
    assert lv.poll(name)["STATE"] == backend.PAUSED
    assert lv.restore(vm) == name
    assert lv.poll(name)["STATE"] == backend.RUNNING
    lv.delete(vm)


def test_save_or_restore_of_what_is_not_there_names_it(lv):
    vm = a_vm()
    name = f"cirrus-{vm['id']}"
    checkpoint = os.path.join(lv.vm_dir(vm), "checkpoint")
    with pytest.raises(RuntimeError, match=f"cannot save {name}: it is not on test:///default "
                                           f"and there is no checkpoint at {checkpoint}"):
        lv.save(vm)
    with pytest.raises(FileNotFoundError, match=f"cannot restore {name}: it is not on "
                                                f"test:///default and there is no checkpoint at "
                                                f"/elsewhere/checkpoint nor {checkpoint}"):
        lv.restore({**vm, "runtime": {"checkpoint": "/elsewhere/checkpoint"}})
    lv.deploy(vm)
    lv.cancel(name)
    with pytest.raises(RuntimeError, match=f"cannot save {name}: it is not running"):
        lv.save(vm)
    lv.delete(vm)


def test_a_save_interrupted_before_its_rename_completes_on_redelivery(lv):
    vm = a_vm()
    name = lv.deploy(vm)
    checkpoint = os.path.join(lv.vm_dir(vm), "checkpoint")
    domain(lv, vm).save(checkpoint + ".part")     # the worker died right after this
    assert lv.save(vm)["checkpoint"] == checkpoint
    assert os.path.isfile(checkpoint) and lv.poll(name) == {"STATE": backend.GONE}
    lv.delete(vm)


def test_reboot_and_reset(lv):
    vm = a_vm()
    name = f"cirrus-{vm['id']}"
    for action in (lv.reboot, lv.reset):
        with pytest.raises(LookupError, match=f"{name}: no such domain on test:///default"):
            action(name)
    lv.deploy(vm)
    lv.reboot(name)
    lv.reset(name)
    assert lv.poll(name)["STATE"] == backend.RUNNING
    lv.cancel(name)
    with pytest.raises(RuntimeError, match=f"cannot reset {name}: it is not running"):
        lv.reset(name)
    lv.delete(vm)


def test_migrate_on_the_test_driver_goes_through_a_checkpoint(lv, tmp_path):
    vm = a_vm()
    name = lv.deploy(vm)
    info = lv.migrate(vm, "node-2", "test:///default")
    assert info["checkpoint"] == os.path.join(lv.vm_dir(vm), "checkpoint")
    assert lv.poll(name) == {"STATE": backend.GONE}
    assert lv.migrate(vm, "node-2", "test:///default") == info
    # the target node shares the datastore; its restore brings the VM back
    target = LibvirtBackend("test:///default", lv.datastore)
    try:
        assert target.restore({**vm, "runtime": info}) == name
        assert target.poll(name)["STATE"] == backend.RUNNING
    finally:
        target.delete(vm)
        target.close()


def test_stop_parks_the_files_and_resume_brings_them_back(lv):
    vm = a_vm()
    name = lv.deploy(vm)
    with pytest.raises(RuntimeError, match=f"{name} is still running"):
        lv.mv(vm, "out")
    saved = lv.save(vm)
    parked = os.path.join(lv.parking, str(vm["id"]))
    assert lv.parking == os.path.join(os.path.dirname(lv.datastore), "parked")
    out = lv.mv(vm, "out")
    assert out == {"vm_dir": parked, "checkpoint": os.path.join(parked, "checkpoint")}
    assert not os.path.exists(lv.vm_dir(vm))
    assert lv.mv(vm, "out") == out                        # moved already
    back = lv.mv(vm, "in", from_dir=out["vm_dir"])
    assert back == {"vm_dir": lv.vm_dir(vm), "checkpoint": saved["checkpoint"]}
    assert not os.path.exists(parked)
    assert lv.mv(vm, "in") == back
    assert lv.mv(vm, "in", from_dir=lv.vm_dir(vm)) == back  # the same directory: nothing to do
    assert lv.restore({**vm, "runtime": {**saved, **back}}) == name
    lv.delete(vm)


def test_undeploy_parks_a_powered_off_vm_and_delete_finds_it_there(lv):
    vm = a_vm()
    name = lv.deploy(vm)
    lv.shutdown(name, 5)
    out = lv.mv(vm, "out")
    assert lv.poll(name) == {"STATE": backend.GONE}       # undefined
    assert os.path.isdir(out["vm_dir"]) and "checkpoint" not in out
    lv.delete(vm)
    assert not os.path.exists(out["vm_dir"])


def test_mv_with_nothing_to_move_or_something_in_the_way_names_both(lv, tmp_path):
    vm = a_vm()
    parked = os.path.join(lv.parking, str(vm["id"]))
    with pytest.raises(FileNotFoundError, match=f"cannot move {parked} to {lv.vm_dir(vm)}: "
                                                f"neither exists"):
        lv.mv(vm, "in")
    os.makedirs(parked)
    os.makedirs(lv.vm_dir(vm))
    with pytest.raises(FileExistsError, match="both exist"):
        lv.mv(vm, "in")
    assert os.path.isdir(parked) and os.path.isdir(lv.vm_dir(vm))   # nothing overwritten
    with pytest.raises(ValueError, match="direction must be one of out, in"):
        lv.mv(vm, "sideways")
    lv.delete(vm)
    assert not os.path.exists(parked)


def test_migrate_of_a_vm_that_is_not_here_fails_naming_it(lv):
    vm = a_vm()
    with pytest.raises(RuntimeError, match=f"cannot save cirrus-{vm['id']}: it is not on "
                                           f"test:///default"):
        lv.migrate(vm, "node-2", "test:///default")
