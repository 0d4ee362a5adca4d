"""Transfer actions on real disk files (made with qemu-img) through the libvirt
backend on test:///default: clone as overlay, copy, ln, swap and fs, the
context CD, SAVE_AS and delete, and redelivery of each. The last test boots the
tiny guest on qemu:///system with a context CD and reads its context back
from the serial console (skipped with CIRRUS_SKIP_QEMU=1)."""
import itertools
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from cirrus import messages
from services.drivers import backend
from services.drivers.libvirt_backend import LibvirtBackend
from services.drivers.simulated import SimulatedBackend
from services.drivers.worker import run_command
from tests.integration.test_driver_qemu import (URI, datastore, tiny_guest,  # noqa: F401
                                                wait_for_console)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MB = 1024 * 1024
_ids = itertools.count(9500)    # test:///default is shared by the process


@pytest.fixture
def lv(tmp_path):
    driver = LibvirtBackend("test:///default", str(tmp_path / "datastore"), shutdown_timeout=5)
    yield driver
    driver.close()


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True).stdout


def info(path):
    return json.loads(qemu_img("info", "--output=json", str(path)))


def write_pattern(path, fmt, byte, offset=0, length=65536):
    subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P {byte:#x} {offset} {length}",
                    str(path)], capture_output=True, check=True)


def read_pattern(path, fmt, byte, offset=0, length=65536):
    """Whether the disk holds ``byte`` over the range (qemu-io's read -P checks it)."""
    done = subprocess.run(["qemu-io", "-f", fmt, "-c", f"read -P {byte:#x} {offset} {length}",
                           str(path)], capture_output=True, text=True)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


@pytest.fixture
def images(tmp_path):
    """A qcow2 and a raw image, each holding 0x11 in its first 64 KiB."""
    qcow2, raw = tmp_path / "images" / "base.qcow2", tmp_path / "images" / "data.raw"
    qcow2.parent.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(qcow2), "16M")
    qemu_img("create", "-q", "-f", "raw", str(raw), "8M")
    for path, fmt in ((qcow2, "qcow2"), (raw, "raw")):
        write_pattern(path, fmt, 0x11)
    return qcow2, raw


def file_disk(disk_id, source, fmt, clone, **fields):
    return {"id": disk_id, "type": "file", "source": str(source), "format": fmt,
            "clone": clone, "size_mb": None, "target": "vd" + "abcdefgh"[disk_id],
            "readonly": False, "save_as": None, **fields}


def a_vm(disks=(), nics=(), context=None, token=None):
    return {"id": next(_ids), "name": "t", "cpu": 1, "vcpu": 1, "memory": 64, "template": {},
            "disks": list(disks), "nics": list(nics), "context": context, "token": token}


def all_disks(images):
    qcow2, raw = images
    return [file_disk(0, qcow2, "qcow2", "overlay"),
            file_disk(1, raw, "raw", "copy"),
            file_disk(2, qcow2, "qcow2", "ln", readonly=True),
            {"id": 3, "type": "swap", "size_mb": 32, "target": "vdd"},
            {"id": 4, "type": "fs", "size_mb": 16, "target": "vde"}]


def test_clone_makes_every_kind_of_disk_and_the_context_cd(lv, images):
    qcow2, raw = images
    vm = a_vm(all_disks(images), nics=[{"id": 0, "mac": "02:00:0a:00:00:05", "model": "virtio"}],
              context={"VMID": "1", "ETH0_IP": "10.0.0.5"}, token="tok")
    vm_dir = Path(lv.vm_dir(vm))
    made = lv.clone(vm)
    assert made == {"vm_dir": str(vm_dir), "context": str(vm_dir / "context.iso"), "disks": [
        str(vm_dir / "disk.0"), str(vm_dir / "disk.1"), str(qcow2), str(vm_dir / "disk.3"),
        str(vm_dir / "disk.4")]}

    overlay = info(vm_dir / "disk.0")
    assert (overlay["format"], overlay["backing-filename"]) == ("qcow2", str(qcow2))
    assert read_pattern(vm_dir / "disk.0", "qcow2", 0x11)
    assert info(vm_dir / "disk.1")["format"] == "raw"
    assert (vm_dir / "disk.1").read_bytes() == raw.read_bytes()
    # ln: the persistent image itself, nothing in the VM's directory
    assert not (vm_dir / "disk.2").exists()

    swap = vm_dir / "disk.3"
    assert swap.stat().st_size == 32 * MB
    assert swap.stat().st_blocks * 512 < swap.stat().st_size      # sparse
    assert swap.read_bytes()[4096 - 10:4096] == b"SWAPSPACE2"
    fs = vm_dir / "disk.4"
    assert fs.stat().st_size == 16 * MB
    if shutil.which("mkfs.ext4"):
        assert fs.read_bytes()[1080:1082] == b"\x53\xef"           # the ext4 magic
    assert sorted(os.listdir(vm_dir)) == ["context.iso", "disk.0", "disk.1", "disk.3",
                                          "disk.4"]

    # the domain libvirt defines points at them, and at the CD
    lv.deploy(vm)
    xml = lv.conn.lookupByName(f"cirrus-{vm['id']}").XMLDesc(0)
    for path in made["disks"] + [made["context"]]:
        assert f"'{path}'" in xml, path
    assert "02:00:0a:00:00:05" in xml and "device='cdrom'" in xml

    # delete removes what clone made, never the images
    before = (qcow2.read_bytes(), raw.read_bytes())
    assert lv.delete(vm) == {"saved": []}
    assert not vm_dir.exists()
    assert (qcow2.read_bytes(), raw.read_bytes()) == before
    assert lv.poll(f"cirrus-{vm['id']}") == {"STATE": backend.GONE}


def test_lifecycle_disks_and_template_source_disks_together(lv, images):
    """As lifecycle sends them: image and volatile disks in "disks", a plain
    SOURCE disk left in the template at its own index."""
    qcow2, raw = images
    vm = a_vm([file_disk(0, qcow2, "qcow2", "overlay", image_id=1),
               {"id": 2, "type": "fs", "source": None, "format": "raw", "clone": None,
                "size_mb": 8, "target": "vdc", "readonly": False, "save_as": None}])
    vm["template"] = {"DISK": [{"IMAGE": "base"}, {"SOURCE": str(raw)},
                               {"TYPE": "fs", "SIZE": 8}]}
    vm_dir = Path(lv.vm_dir(vm))
    assert lv.clone(vm)["disks"] == [str(vm_dir / f"disk.{i}") for i in range(3)]
    assert info(vm_dir / "disk.0")["backing-filename"] == str(qcow2)
    assert (vm_dir / "disk.1").read_bytes() == raw.read_bytes()
    assert (vm_dir / "disk.2").stat().st_size == 8 * MB
    lv.deploy(vm)
    assert lv.delete(vm) == {"saved": []}


def test_a_redelivered_clone_does_no_work_twice_and_replaces_a_half_made_disk(lv, images):
    vm = a_vm(all_disks(images), context={"A": "1"})
    vm_dir = Path(lv.vm_dir(vm))
    vm_dir.mkdir(parents=True)
    # a crash left half a disk: it has the .part name, so it is never taken for done
    (vm_dir / "disk.1.part").write_bytes(b"half")
    first = lv.clone(vm)
    assert not list(vm_dir.glob("*.part"))
    assert (vm_dir / "disk.1").read_bytes() == images[1].read_bytes()
    write_pattern(vm_dir / "disk.0", "qcow2", 0x22)      # the guest wrote to its disk
    stamps = {name: (vm_dir / name).stat().st_mtime_ns for name in ("disk.0", "disk.3")}
    assert lv.clone(vm) == first
    assert {name: (vm_dir / name).stat().st_mtime_ns for name in stamps} == stamps
    assert read_pattern(vm_dir / "disk.0", "qcow2", 0x22)
    lv.delete(vm)
    lv.delete(vm)


def test_a_file_disk_grows_to_size_mb_and_never_shrinks(lv, images):
    qcow2, raw = images
    vm = a_vm([file_disk(0, qcow2, "qcow2", "overlay", size_mb=64),
               file_disk(1, raw, "raw", "copy", size_mb=20)])
    lv.clone(vm)
    vm_dir = Path(lv.vm_dir(vm))
    assert info(vm_dir / "disk.0")["virtual-size"] == 64 * MB
    assert (vm_dir / "disk.1").stat().st_size == 20 * MB
    lv.delete(vm)

    shrink = a_vm([file_disk(0, qcow2, "qcow2", "copy", size_mb=4)])
    with pytest.raises(RuntimeError, match="DISK 0: could not grow the disk to 4 MB"):
        lv.clone(shrink)
    assert os.listdir(lv.vm_dir(shrink)) == []        # no disk, no .part
    lv.delete(shrink)


def test_save_as_copies_the_disk_flattened_before_delete(lv, images, tmp_path):
    qcow2, raw = images
    saved_qcow2, saved_raw = tmp_path / "saved" / "web.qcow2", tmp_path / "saved" / "data.raw"
    vm = a_vm([file_disk(0, qcow2, "qcow2", "overlay", save_as=str(saved_qcow2)),
               file_disk(1, raw, "raw", "overlay", save_as=str(saved_raw)),
               file_disk(2, qcow2, "qcow2", "ln")])
    lv.clone(vm)
    lv.deploy(vm)
    vm_dir = Path(lv.vm_dir(vm))
    write_pattern(vm_dir / "disk.0", "qcow2", 0x33, offset=MB)
    write_pattern(vm_dir / "disk.1", "qcow2", 0x44)

    assert lv.delete(vm) == {"saved": [str(saved_qcow2), str(saved_raw)]}
    assert not vm_dir.exists() and qcow2.exists() and raw.exists()
    # standalone images in the image's format, with the base and the guest's writes
    assert "backing-filename" not in info(saved_qcow2)
    assert info(saved_qcow2)["format"] == "qcow2" and info(saved_raw)["format"] == "raw"
    assert read_pattern(saved_qcow2, "qcow2", 0x11) and read_pattern(saved_qcow2, "qcow2", 0x33,
                                                                       offset=MB)
    assert read_pattern(saved_raw, "raw", 0x44)
    assert read_pattern(raw, "raw", 0x11)       # the image itself is untouched
    assert not list(saved_qcow2.parent.glob("*.part"))

    # redelivered: what was saved is reported again, and not written again
    stamp = saved_qcow2.stat().st_mtime_ns
    assert lv.delete(vm) == {"saved": [str(saved_qcow2), str(saved_raw)]}
    assert saved_qcow2.stat().st_mtime_ns == stamp


def test_save_as_of_a_disk_clone_never_made_reports_nothing_saved(lv, images, tmp_path):
    vm = a_vm([file_disk(0, images[0], "qcow2", "copy", save_as=str(tmp_path / "x.qcow2"))])
    assert lv.delete(vm) == {"saved": []}
    assert not (tmp_path / "x.qcow2").exists()


def test_delete_through_the_worker_reports_what_it_saved(lv, images, tmp_path):
    save_as = tmp_path / "saved.qcow2"
    vm = a_vm([file_disk(0, images[0], "qcow2", "overlay", save_as=str(save_as))])
    for action in ("clone", "deploy"):
        assert run_command(lv, messages.command(action, vm["id"], "h", vm=vm), 5)["success"]
    result = run_command(lv, messages.command("delete", vm["id"], "h", vm=vm), 5)
    assert (result["success"], result["info"]) == (True, {"saved": [str(save_as)]})


@pytest.mark.parametrize("break_it, message", [
    (lambda vm: vm["disks"].append({"id": 9, "type": "fs", "target": "vdz"}),
     "DISK 9: a fs disk needs size_mb"),
    (lambda vm: vm["disks"][0].update(source="/nonexistent/cirrus.qcow2"),
     "DISK 0: source /nonexistent/cirrus.qcow2 does not exist"),
    (lambda vm: vm["context"].update({"BAD KEY": "x"}), "CONTEXT 'BAD KEY'"),
])
def test_bad_input_makes_nothing(lv, images, break_it, message):
    vm = a_vm(all_disks(images), context={"A": "1"})
    break_it(vm)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        lv.clone(vm)
    assert not os.path.exists(lv.vm_dir(vm)) or os.listdir(lv.vm_dir(vm)) == []
    lv.delete(vm)


def test_a_missing_ln_image_is_named(lv, tmp_path):
    vm = a_vm([file_disk(0, tmp_path / "gone.qcow2", "qcow2", "ln")])
    with pytest.raises(FileNotFoundError, match="DISK 0: source .*gone.qcow2 does not exist"):
        lv.clone(vm)


def test_the_simulated_backend_checks_the_same_and_makes_no_files(images, tmp_path):
    sim = SimulatedBackend()
    vm = a_vm(all_disks(images) + [file_disk(5, images[1], "raw", "copy",
                                             save_as=str(tmp_path / "s.raw"))],
              context={"A": "1"})
    made = sim.clone(vm)
    base = f"simulated:///cirrus-{vm['id']}"
    assert (made["vm_dir"], made["context"]) == (None, f"{base}/context.iso")
    assert made["disks"][2] == str(images[0])      # ln: the image itself
    assert made["disks"][0] == f"{base}/disk.0"
    assert sim.delete(vm) == {"saved": [str(tmp_path / "s.raw")]}
    assert os.listdir(tmp_path) == ["images"]
    vm["context"]["1BAD"] = "x"
    with pytest.raises(ValueError, match="CONTEXT '1BAD'"):
        sim.clone(vm)


# ---------------------------------------------------------------- a real guest

@pytest.mark.qemu
@pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1", reason="CIRRUS_SKIP_QEMU=1")
def test_a_real_guest_reads_its_context_cd(tiny_guest, datastore):  # noqa: F811
    lv = LibvirtBackend(URI, str(datastore), shutdown_timeout=30)
    image = datastore / "images" / "blank.qcow2"
    image.parent.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", str(image), "16M")
    greeting = "hello 'world' $(reboot) `poweroff`"
    vm = {"id": random.randrange(10**8, 10**9), "name": "ctx", "cpu": 1, "vcpu": 1,
          "memory": 256, "deploy_id": None, "runtime": {}, "template": {
              "OS": {"KERNEL": str(tiny_guest / "vmlinuz"),
                     "INITRD": str(tiny_guest / "initrd.img"),
                     "KERNEL_CMDLINE": "console=ttyS0 quiet"}},
          "disks": [file_disk(0, image, "qcow2", "overlay")],
          "nics": [{"id": 0, "network": "priv", "network_id": 1, "ip": "192.168.77.5",
                    "mac": "02:00:c0:a8:4d:05", "model": "virtio"}],
          "context": {"VMID": "1", "ETH0_IP": "192.168.77.5", "ETH0_MASK": "255.255.255.0",
                      "ETH0_MAC": "02:00:c0:a8:4d:05", "GREETING": greeting, "TOKEN": "YES"},
          "token": "secret-token"}
    try:
        lv.clone(vm)
        deploy_id = lv.deploy(vm)
        wait_for_console(lv.vm_dir(vm), "cirrus-guest: disks", timeout=180)
        console = (Path(lv.vm_dir(vm)) / "console.log").read_text(errors="replace")
        lines = [line.strip() for line in console.splitlines()]
        assert "CONTEXT ETH0_IP=192.168.77.5" in lines
        assert f"CONTEXT GREETING={greeting}" in lines
        assert "CONTEXT token.txt present" in lines
        (applied,) = [line for line in lines if line.startswith("CONTEXT APPLIED eth0")]
        assert "192.168.77.5/24" in applied.split()
        (disks,) = [line for line in lines if line.startswith("cirrus-guest: disks")]
        assert {"vda", "sr0"} <= set(disks.split())
        # the guest's power button still works with a CD in
        lv.shutdown(deploy_id, 60)
        assert lv.poll(deploy_id)["STATE"] == backend.POWEROFF
    finally:
        assert lv.delete(vm) == {"saved": []}
        lv.close()
    assert image.exists() and not Path(lv.vm_dir(vm)).exists()
