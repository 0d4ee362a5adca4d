"""A VM's disks, NICs and context CD in Get (``cirrus vm show``), over real
gRPC in front of the real requests and lifecycle services, with a node played
by the test."""
import pytest

from cirrus import db
from cirrus.db.models import VmDevices

from tests.integration.test_gateway import (  # noqa: F401  (fixtures)
    admin, ann, api, cirrus, gateway, logs, node, services, unique, user, wait_status,
)
from tests.integration.test_gateway_storage import disks, network, qcow2, store  # noqa: F401


@pytest.fixture
def devices_vm(api, node, store, disks):
    """A VM with an image disk, a swap disk, a NIC and a context with a token,
    deployed on ``node``, whose clone the node answered with the files it made."""
    image = api.create_image(unique("gw-show"), qcow2(disks), datastore=store[0])
    vnet = api.create_vnet(network(unique("gw-shownet"), "TYPE = IP4, IP = 10.75.0.20, SIZE = 2"))
    template = (f'DISK = [ IMAGE = "{image["name"]}", TARGET = "vda" ]\n'
                'DISK = [ TYPE = "swap", SIZE = 64 ]\n'
                f'NIC = [ NETWORK = "{vnet["name"]}" ]\n'
                'CONTEXT = [ TOKEN = "YES", MOTD = "it\'s `here`" ]\n')
    vm = api.create_vm(name="gw-show", cpu=0.1, vcpu=1, memory=64, template=template)
    before = api.get_vm(vm["id"])
    api.vm_action(vm["id"], "deploy", host_id=node.id)
    vm_dir = f"/nodes/{node.name}/{vm['id']}"
    node.answer("clone", {"vm_dir": vm_dir, "disks": [f"{vm_dir}/disk.0", f"{vm_dir}/disk.1"],
                          "context": f"{vm_dir}/context.iso"})
    node.answer("deploy", {"deploy_id": f"cirrus-{vm['id']}"})
    wait_status(api, vm["id"], "RUNNING")
    return {"vm": vm, "before": before, "image": image, "vnet": vnet, "vm_dir": vm_dir}


def test_get_shows_the_disks_nics_and_context_a_vm_holds_until_done(api, node, devices_vm):
    vm_id, vm_dir = devices_vm["vm"]["id"], devices_vm["vm_dir"]
    image, vnet = devices_vm["image"], devices_vm["vnet"]
    # nothing is held before the deploy
    before = devices_vm["before"]
    assert (before["disks"], before["nics"], before["context"]) == ([], [], None)

    shown = api.get_vm(vm_id)
    first, swap = shown["disks"]
    assert (first["id"], first["target"], first["type"], first["image"], first["image_id"],
            first["source"], first["path"], first["clone"], first["format"]) == (
        0, "vda", "file", image["name"], image["id"], image["path"], f"{vm_dir}/disk.0",
        "overlay", "qcow2")
    assert first["size_mb"] == image["size_mb"] == 16      # the image's, none asked for
    assert (swap["id"], swap["target"], swap["type"], swap["image"], swap["size_mb"],
            swap["path"]) == (1, "vdb", "swap", None, 64, f"{vm_dir}/disk.1")
    [nic] = shown["nics"]
    assert (nic["id"], nic["network"], nic["network_id"], nic["ip"], nic["gateway"],
            nic["model"]) == (0, vnet["name"], vnet["id"], "10.75.0.20", "10.70.0.1", "virtio")
    assert nic["mac"] == "02:00:0a:4b:00:14"
    context = shown["context"]
    assert (context["path"], context["token"]) == (f"{vm_dir}/context.iso", True)
    values = context["values"]
    assert (values["VMID"], values["ETH0_IP"], values["MOTD"], values["TOKEN"]) == (
        str(vm_id), "10.75.0.20", "it's `here`", "YES")
    # the token is a credential: Get says there is one, never what it is
    with db.session_factory()() as session:
        token = session.get(VmDevices, vm_id).token
    assert token and token not in repr(shown)

    api.vm_action(vm_id, "terminate", hard=True)
    node.answer("cancel")
    node.answer("delete")
    done = wait_status(api, vm_id, "DONE")
    assert (done["disks"], done["nics"], done["context"]) == ([], [], None)
