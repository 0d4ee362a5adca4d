"""Datastores and images on the real PostgreSQL and real files made by qemu-img,
through lifecycle's logic."""
import subprocess

import pytest
from nameko.exceptions import RemoteError
from sqlalchemy import func, select

from cirrus.db.models import Image
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from services.lifecycle import images, logic
from tests.vm_devices import (admin_id, commands, deploy_each_on_its_own_host,  # noqa: F401
                              deploy_to_running, factory, host, lifecycle_rpc,
                              terminate_to_done, unique)


@pytest.fixture
def store(factory, tmp_path):
    with factory() as s, s.begin():
        return images.create_datastore(s, unique("images"), "IMAGE", str(tmp_path / "ds")).id


def disk_file(tmp_path, fmt="qcow2", size="16M"):
    path = tmp_path / f"{unique('disk')}.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return str(path)


def register(factory, admin_id, store, path, persistent=False):
    with factory() as s, s.begin():
        return images.register_image(s, admin_id, unique("img"), path, store, persistent).id


def image_vm(s, admin_id, image_id, **disk):
    return logic.allocate(s, admin_id, "vm", 0.1, 1, 64,
                          {"DISK": [{"IMAGE_ID": str(image_id), **disk}]}).id


def shown(factory, image_id):
    with factory() as s:
        return images.image_to_dict(s, images.get_image(s, image_id))


def test_a_qcow2_and_a_raw_image_register_with_their_format_and_size(factory, admin_id, store,
                                                                      tmp_path):
    qcow2 = shown(factory, register(factory, admin_id, store, disk_file(tmp_path)))
    assert (qcow2["format"], qcow2["size_mb"], qcow2["state"]) == ("qcow2", 16, "READY")
    raw = shown(factory, register(factory, admin_id, store, disk_file(tmp_path, "raw", "4M")))
    assert (raw["format"], raw["size_mb"], raw["persistent"]) == ("raw", 4, False)
    with factory() as s:
        assert {qcow2["id"], raw["id"]} <= {i["id"] for i in images.list_images(s)}
        assert images.datastore_to_dict(s, images.get_datastore(s, store))["images"] == 2


def text_file(name, content):
    def make(directory):
        (directory / name).write_text(content)
        return directory / name
    return make


@pytest.mark.parametrize("make,message", [
    (text_file("notes.txt", "hello, this is not a disk\n"),
     "is not a disk image: 26 bytes is not a whole number of 512-byte sectors"),
    (text_file("page.txt", "x" * 511 + "\n"), "is not a disk image: it is a text file"),
    (lambda d: d / "missing.qcow2", "does not exist"),
    (lambda d: d, "is not a file"),
])
def test_a_path_that_is_not_a_disk_image_is_refused_naming_it(factory, admin_id, store,
                                                                tmp_path, make, message):
    path = str(make(tmp_path))
    with factory() as s:
        before = s.scalar(select(func.count()).select_from(Image))
    with pytest.raises(InvalidArgument, match=rf"^path: {path} {message}"):
        register(factory, admin_id, store, path)
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == before


def test_an_image_is_used_by_its_vms_and_ready_again_when_they_are_done(factory, admin_id,
                                                                        store, host, tmp_path):
    image_id = register(factory, admin_id, store, disk_file(tmp_path))
    with factory() as s, s.begin():
        vms = [image_vm(s, admin_id, image_id) for _ in range(2)]
        for vm_id in vms:
            deploy_to_running(s, vm_id, host)
    used = shown(factory, image_id)
    assert (used["state"], used["running_vms"], used["vms"]) == ("USED", 2, sorted(vms))
    with factory() as s, s.begin():
        with pytest.raises(FailedPrecondition, match="is used by VMs"):
            images.delete_image(s, image_id)
        with pytest.raises(FailedPrecondition, match="change it when it is READY"):
            images.set_persistent(s, image_id, True)
        terminate_to_done(s, vms[0])
    assert shown(factory, image_id)["running_vms"] == 1
    with factory() as s, s.begin():
        terminate_to_done(s, vms[1])
    assert (shown(factory, image_id)["state"], shown(factory, image_id)["vms"]) == ("READY", [])
    with factory() as s, s.begin():
        images.delete_image(s, image_id)
    with factory() as s:
        assert s.get(Image, image_id) is None


def test_a_persistent_image_is_refused_to_a_second_vm(factory, admin_id, store, host, tmp_path):
    image_id = register(factory, admin_id, store, disk_file(tmp_path), persistent=True)
    with factory() as s, s.begin():
        first, waiting = image_vm(s, admin_id, image_id), image_vm(s, admin_id, image_id)
        deploy_to_running(s, first, host)
        name = s.get(Image, image_id).name
        # created before the first one took it: its deploy waits
        assert logic.deploy(s, waiting, host) == {
            "outcome": "vm_waits", "reason": f"persistent image {name!r} is used by VM {first}"}
        assert s.get(logic.VirtualMachine, waiting).state == "PENDING"
        # created after: refused at once
        with pytest.raises(FailedPrecondition,
                           match=rf"^DISK\[0\]: persistent image {name!r} is used by VM {first}"):
            image_vm(s, admin_id, image_id)
        terminate_to_done(s, first)
        assert logic.deploy(s, waiting, host)["outcome"] == "deployed"
    assert shown(factory, image_id)["vms"] == [waiting]


def test_the_driver_spec_carries_the_disks(factory, admin_id, store, host, tmp_path):
    shared = register(factory, admin_id, store, disk_file(tmp_path))
    own = register(factory, admin_id, store, disk_file(tmp_path, "raw", "1M"), persistent=True)
    raw = register(factory, admin_id, store, disk_file(tmp_path, "raw", "1M"))
    with factory() as s, s.begin():
        paths = {i: s.get(Image, i).path for i in (shared, own, raw)}
        vm_id = logic.allocate(s, admin_id, "disks", 0.1, 1, 64, {"DISK": [
            {"IMAGE": s.get(Image, shared).name, "SIZE": "64"},
            {"IMAGE_ID": str(own), "TARGET": "vdz"},
            {"IMAGE_ID": str(raw), "READONLY": "YES"},
            {"TYPE": "swap", "SIZE": "32"},
            {"TYPE": "fs", "SIZE": "16"}]}).id
        deploy_to_running(s, vm_id, host)
        disks = commands(s, vm_id)[-1]["args"]["vm"]["disks"]
    base = {"type": "file", "save_as": None, "readonly": False, "size_mb": None}
    assert disks == [
        {**base, "id": 0, "source": paths[shared], "format": "qcow2", "clone": "overlay",
         "size_mb": 64, "target": "vda", "image_id": shared},
        {**base, "id": 1, "source": paths[own], "format": "raw", "clone": "ln",
         "target": "vdz", "image_id": own},
        {**base, "id": 2, "source": paths[raw], "format": "raw", "clone": "copy",
         "target": "vdc", "readonly": True, "image_id": raw},
        {**base, "id": 3, "type": "swap", "source": None, "format": "raw", "clone": None,
         "size_mb": 32, "target": "vdd"},
        {**base, "id": 4, "type": "fs", "source": None, "format": "raw", "clone": None,
         "size_mb": 16, "target": "vde"}]


@pytest.mark.parametrize("saved,state", [(True, "READY"), (False, "ERROR")])
def test_save_as_makes_a_locked_image_that_the_terminate_fills(factory, admin_id, store, host,
                                                               tmp_path, saved, state):
    source = register(factory, admin_id, store, disk_file(tmp_path))
    target = unique("saved")
    with factory() as s, s.begin():
        vm_id = image_vm(s, admin_id, source, SAVE_AS=target)
        deploy_to_running(s, vm_id, host)
        save_as = commands(s, vm_id)[-1]["args"]["vm"]["disks"][0]["save_as"]
        image = s.scalar(select(Image).where(Image.name == target))
        assert (image.state, image.path, image.format) == ("LOCKED", save_as, "qcow2")
        with pytest.raises(FailedPrecondition, match="is LOCKED"):
            images.delete_image(s, image.id)
        terminate_to_done(s, vm_id, saved=[save_as] if saved else None)
        assert image.state == state


def test_bad_disks_are_refused_at_create(factory, admin_id, store):
    with factory() as s, s.begin():
        for disk, message in [({"IMAGE": "nope"}, r"^DISK\[0\] IMAGE: image 'nope'"),
                              ({"TYPE": "swap"}, r"^DISK\[0\] SIZE"),
                              ({"TYPE": "cdrom", "SIZE": "1"}, r"^DISK\[0\] TYPE"),
                              ({"SOURCE": "/x", "SAVE_AS": "y"}, r"^DISK\[0\] SAVE_AS")]:
            with pytest.raises(Exception, match=message):
                logic.allocate(s, admin_id, "bad", 0.1, 1, 64, {"DISK": [disk]})


def test_datastores(factory, tmp_path, host):
    with factory() as s, s.begin():
        system = images.create_datastore(s, unique("sys"), "system", "/var/tmp/x", host)
        assert (system.type, system.host_id) == ("SYSTEM", host)
        for args, message in [(("", "IMAGE", "/a"), "^name"), (("d", "FILE", "/a"), "^type"),
                              (("d", "IMAGE", "rel/dir"), "^path"),
                              (("d", "IMAGE", "/a", host), "^host_id")]:
            with pytest.raises(InvalidArgument, match=message):
                images.create_datastore(s, *args)
        ds = images.create_datastore(s, unique("img"), "IMAGE", str(tmp_path / "made"))
        assert (tmp_path / "made").is_dir()
        images.register_image(s, 1, unique("i"), disk_file(tmp_path), ds.id)
        with pytest.raises(FailedPrecondition, match="still has 1 images"):
            images.delete_datastore(s, ds.id)
        with pytest.raises(InvalidArgument, match="is a SYSTEM datastore"):
            images.register_image(s, 1, unique("i"), disk_file(tmp_path), system.name)
        images.delete_datastore(s, system.id)


def test_the_image_rpcs_of_the_lifecycle_service(lifecycle_rpc, admin_id, tmp_path):
    rpc = lifecycle_rpc
    ds = rpc.create_datastore(unique("rpc-ds"), "IMAGE", str(tmp_path / "ds"))
    assert rpc.get_datastore(ds["name"])["id"] == ds["id"]
    image = rpc.create_image(admin_id, unique("rpc-img"), disk_file(tmp_path), ds["id"])
    assert (image["format"], image["state"], image["datastore"]) == ("qcow2", "READY", ds["name"])
    assert rpc.set_image_persistent(image["id"], True)["persistent"] is True
    assert rpc.get_image(image["id"])["persistent"] is True
    assert image["id"] in [i["id"] for i in rpc.list_images(admin_id)]
    with pytest.raises(RemoteError) as refused:
        rpc.create_image(admin_id, unique("rpc-img"), str(tmp_path), ds["id"])
    assert refused.value.exc_type == "InvalidArgument" and "is not a file" in refused.value.value
    rpc.delete_image(image["id"])
    assert ds["id"] in [d["id"] for d in rpc.list_datastores()]
    rpc.delete_datastore(ds["id"])


def test_of_concurrent_deploys_of_one_persistent_image_exactly_one_wins(factory, admin_id,
                                                                        store, tmp_path):
    image_id = register(factory, admin_id, store, disk_file(tmp_path), persistent=True)
    with factory() as s, s.begin():
        ids = [image_vm(s, admin_id, image_id) for _ in range(6)]
    outcomes = deploy_each_on_its_own_host(factory, ids)
    assert sorted(outcomes) == ["deployed"] + ["vm_waits"] * 5
    assert len(shown(factory, image_id)["vms"]) == 1


def test_a_save_as_name_already_taken_is_refused_at_create(factory, admin_id, store, tmp_path):
    image_id = register(factory, admin_id, store, disk_file(tmp_path))
    with factory() as s, s.begin():
        name = s.get(Image, image_id).name
        with pytest.raises(AlreadyExists, match=rf"^DISK\[0\] SAVE_AS: image {name!r} already"):
            image_vm(s, admin_id, image_id, SAVE_AS=name)
        with pytest.raises(AlreadyExists, match=rf"^name: image {name!r} already exists"):
            images.register_image(s, admin_id, name, disk_file(tmp_path), store)
