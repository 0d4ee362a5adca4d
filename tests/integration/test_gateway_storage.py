"""Datastores, images and virtual networks (issue 5) through the gRPC gateway,
the SDK and the CLI, in front of the real requests and lifecycle services on
the real broker and database, with real files made by qemu-img."""
import json
import subprocess

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.integration.test_gateway import (  # noqa: F401  (fixtures)
    admin, ann, api, channel, cirrus, gateway, logs, node, refused, services, unique, user,
    wait_status,
)

STORAGE_API = ["cirrus.v1.DatastoreService", "cirrus.v1.ImageService",
               "cirrus.v1.VirtualNetworkService"]


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    return tmp_path_factory.mktemp("disks")


def qcow2(disks, size="16M"):
    path = disks / f"{unique('disk')}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return str(path)


@pytest.fixture(scope="module")
def store(gateway, admin, disks):
    """An IMAGE datastore made through the API: (id, name)."""
    from cirrus.client import Client
    with Client(gateway, username=admin[0], password=admin[1]) as client:
        ds = client.create_datastore(unique("gw-images"), "IMAGE", str(disks / "store"))
    return ds["id"], ds["name"]


def network(name, *ranges, extra=""):
    ars = "\n".join(f"AR = [ {ar} ]" for ar in ranges)
    return (f'NAME = "{name}"\nNETWORK_MASK = "255.255.255.0"\nGATEWAY = "10.70.0.1"\n'
            f'DNS = "10.70.0.2"\n{extra}{ars}\n')


# ----------------------------------------------------------------- the services are there

def test_reflection_and_health_cover_the_storage_services(channel):
    database = ProtoReflectionDescriptorDatabase(channel)
    assert set(STORAGE_API) <= set(database.get_services())
    hold = DescriptorPool(database).FindServiceByName(
        "cirrus.v1.VirtualNetworkService").methods_by_name["Hold"]
    assert hold.output_type.full_name == "cirrus.v1.VirtualNetwork"
    health = health_pb2_grpc.HealthStub(channel)
    for service in STORAGE_API:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


# ----------------------------------------------------------------- datastores

def test_datastores_are_made_by_admins_and_read_by_everyone(api, ann, store, disks):
    ds_id, name = store
    shown = api.get_datastore(ds_id)
    assert (shown["name"], shown["type"], shown["path"], shown["images"], shown["host"]) == (
        name, "IMAGE", str(disks / "store"), 0, None)
    assert (disks / "store").is_dir()            # made on the front end
    assert ds_id in {d["id"] for d in ann.list_datastores()}
    assert ann.get_datastore(ds_id)["name"] == name
    denied = refused(ann.create_datastore, unique("gw-mine"), "IMAGE", str(disks / "mine"))
    assert (denied.code, denied.details) == ("PERMISSION_DENIED",
                                             "datastore management is for administrators")
    assert not (disks / "mine").exists()
    assert refused(ann.delete_datastore, ds_id).code == "PERMISSION_DENIED"
    assert refused(api.create_datastore, name, "IMAGE", str(disks / "x")).code == "ALREADY_EXISTS"
    bad = refused(api.create_datastore, unique("gw-rel"), "IMAGE", "relative/dir")
    assert bad.code == "INVALID_ARGUMENT" and bad.details.startswith("path: ")
    assert refused(api.get_datastore, 999999).code == "NOT_FOUND"


def test_a_datastore_with_images_is_kept_until_they_go(api, disks):
    ds = api.create_datastore(unique("gw-short"), "IMAGE", str(disks / "short"))
    image = api.create_image(unique("gw-img"), qcow2(disks), datastore=ds["name"])
    assert image["datastore_id"] == ds["id"]
    busy = refused(api.delete_datastore, ds["id"])
    assert busy.code == "FAILED_PRECONDITION" and "1 images" in busy.details
    api.delete_image(image["id"])
    assert api.delete_datastore(ds["id"])["name"] == ds["name"]
    assert refused(api.get_datastore, ds["id"]).code == "NOT_FOUND"


# ----------------------------------------------------------------- images

def test_a_real_qcow2_registers_and_a_text_file_is_refused_naming_its_path(api, store, disks):
    path = qcow2(disks, "32M")
    image = api.create_image(unique("gw-debian"), path, datastore=store[0])
    assert (image["format"], image["size_mb"], image["state"], image["path"],
            image["persistent"], image["running_vms"]) == ("qcow2", 32, "READY", path, False, 0)
    assert api.get_image(image["id"]) == image

    before = {i["id"] for i in api.list_images()}
    notes = disks / "notes.txt"
    notes.write_text(("a line of notes, not a disk image" + " " * 30 + "\n") * 16)  # 2 sectors
    error = refused(api.create_image, unique("gw-notes"), str(notes), datastore=store[0])
    assert error.code == "INVALID_ARGUMENT"
    assert error.details == f"path: {notes} is not a disk image: it is a text file"
    missing = refused(api.create_image, unique("gw-gone"), str(disks / "gone.qcow2"),
                      datastore=store[0])
    assert (missing.code, missing.details) == ("INVALID_ARGUMENT",
                                               f"path: {disks / 'gone.qcow2'} does not exist")
    assert {i["id"] for i in api.list_images()} == before     # nothing half made


def test_images_are_their_owners(api, ann, user, admin, store, disks):
    mine = api.create_image(unique("gw-admin-img"), qcow2(disks), datastore=store[1])
    theirs = ann.create_image(unique("gw-ann-img"), qcow2(disks), datastore=str(store[0]))
    assert (theirs["owner"], mine["owner"]) == (user[0], admin[0])
    assert {i["owner"] for i in ann.list_images()} == {user[0]}
    assert {mine["id"], theirs["id"]} <= {i["id"] for i in api.list_images()}
    # another's image looks absent to a user, and stays
    for call in (ann.get_image, ann.delete_image, lambda i: ann.set_image_persistent(i, True)):
        error = refused(call, mine["id"])
        assert (error.code, error.details) == ("NOT_FOUND", f"image {mine['id']} does not exist")
    assert api.get_image(mine["id"])["persistent"] is False
    # the owner and an administrator change it
    assert ann.set_image_persistent(theirs["id"], True)["persistent"] is True
    assert api.set_image_persistent(theirs["id"], False)["persistent"] is False
    assert ann.delete_image(theirs["id"])["id"] == theirs["id"]
    assert refused(api.get_image, theirs["id"]).code == "NOT_FOUND"


# ----------------------------------------------------------------- virtual networks

def test_vnets_are_made_by_admins_and_read_by_everyone(api, ann, user):
    name = unique("gw-net")
    vnet = api.create_vnet(network(name, "TYPE = IP4, IP = 10.70.0.10, SIZE = 20",
                                   "TYPE = ETHER, MAC = 02:aa:00:00:00:00, SIZE = 5"))
    assert (vnet["name"], vnet["size"], vnet["used"], vnet["owner"]) == (name, 25, 0, "admin")
    assert vnet["template"]["GATEWAY"] == "10.70.0.1" and "AR" not in vnet["template"]
    ip4, ether = vnet["ranges"]
    assert (ip4["type"], ip4["ip"], ip4["mac"], ip4["size"]) == (
        "IP4", "10.70.0.10", "02:00:0a:46:00:0a", 20)
    assert (ether["type"], ether["ip"], ether["mac"]) == ("ETHER", None, "02:aa:00:00:00:00")
    assert name in {v["name"] for v in ann.list_vnets()}
    assert ann.get_vnet(vnet["id"])["ranges"][0]["ip"] == "10.70.0.10"
    denied = refused(ann.create_vnet, network(unique("gw-ann-net"),
                                              "TYPE = IP4, IP = 10.9.0.1, SIZE = 2"))
    assert (denied.code, denied.details) == ("PERMISSION_DENIED",
                                             "virtual network management is for administrators")
    for call in (lambda: ann.vnet_hold(vnet["id"], "10.70.0.11"),
                 lambda: ann.vnet_rmar(vnet["id"], ether["id"]),
                 lambda: ann.vnet_addar(vnet["id"], "TYPE=IP4, IP=10.71.0.1, SIZE=2"),
                 lambda: ann.delete_vnet(vnet["id"])):
        assert refused(call).code == "PERMISSION_DENIED"
    assert api.get_vnet(vnet["id"])["used"] == 0


@pytest.mark.parametrize("ranges,says", [
    (["TYPE = IP4, IP = 10.72.0.10, SIZE = 20", "TYPE = IP4, IP = 10.72.0.25, SIZE = 5"],
     "AR[1] IP: the range overlaps address range 0 of the network"),
    (["TYPE = IP4, IP = 10.72.0.10, SIZE = 0"], "AR[0] SIZE: "),
    (["TYPE = IP5, IP = 10.72.0.10, SIZE = 4"], "AR[0] TYPE: must be one of "),
])
def test_a_bad_network_is_refused_naming_the_field_and_nothing_is_made(api, ranges, says):
    name = unique("gw-bad-net")
    error = refused(api.create_vnet, network(name, *ranges))
    assert error.code == "INVALID_ARGUMENT" and error.details.startswith(says), error.details
    assert name not in {v["name"] for v in api.list_vnets()}


def test_hold_release_addar_and_rmar(api):
    vnet = api.create_vnet(network(unique("gw-ops"), "TYPE = IP4, IP = 10.73.0.10, SIZE = 4"))
    held = api.vnet_hold(vnet["id"], "10.73.0.11")
    assert held["used"] == 1
    assert held["ranges"][0]["leases"] == [{"mac": "02:00:0a:49:00:0b", "ip": "10.73.0.11",
                                            "ip6": None, "vm_id": None, "nic_id": None,
                                            "hold": True}]
    again = refused(api.vnet_hold, vnet["id"], "10.73.0.11")
    assert again.code == "FAILED_PRECONDITION" and "already on hold" in again.details
    outside = refused(api.vnet_hold, vnet["id"], "10.73.0.99")
    assert outside.code == "INVALID_ARGUMENT" and "10.73.0.99" in outside.details
    assert api.vnet_release(vnet["id"], "02:00:0a:49:00:0b")["used"] == 0   # by its MAC

    clash = refused(api.vnet_addar, vnet["id"], "AR = [ TYPE = IP4, IP = 10.73.0.12, SIZE = 4 ]")
    assert clash.code == "INVALID_ARGUMENT" and "overlaps" in clash.details
    grown = api.vnet_addar(vnet["id"], "TYPE = IP4\nIP = 10.73.0.20\nSIZE = 8")
    assert [ar["ip"] for ar in grown["ranges"]] == ["10.73.0.10", "10.73.0.20"]
    assert grown["size"] == 12
    two = refused(api.vnet_addar, vnet["id"], "AR = [ TYPE = ETHER, SIZE = 1 ]\n"
                                              "AR = [ TYPE = ETHER, SIZE = 1 ]")
    assert (two.code, two.details) == ("INVALID_ARGUMENT",
                                       "AR: addar takes one address range, the template has 2")
    added = grown["ranges"][1]["id"]
    api.vnet_hold(vnet["id"], "10.73.0.21")
    busy = refused(api.vnet_rmar, vnet["id"], added)
    assert busy.code == "FAILED_PRECONDITION" and "on hold" in busy.details
    api.vnet_release(vnet["id"], "10.73.0.21")
    assert [ar["id"] for ar in api.vnet_rmar(vnet["id"], added)["ranges"]] == [
        vnet["ranges"][0]["id"]]
    assert api.delete_vnet(vnet["id"])["id"] == vnet["id"]
    assert refused(api.get_vnet, vnet["id"]).code == "NOT_FOUND"


# ----------------------------------------------------------------- a VM takes them

def test_a_deployed_vm_uses_the_image_and_a_lease_until_it_is_done(api, node, store, disks):
    image = api.create_image(unique("gw-boot"), qcow2(disks), datastore=store[0])
    vnet = api.create_vnet(network(unique("gw-vmnet"), "TYPE = IP4, IP = 10.74.0.10, SIZE = 3"))
    template = (f'DISK = [ IMAGE = "{image["name"]}" ]\n'
                f'NIC = [ NETWORK = "{vnet["name"]}" ]\n'
                'CONTEXT = [ TOKEN = "YES", ROLE = "web" ]\n')
    vm = api.create_vm(name="gw-devices", cpu=0.1, vcpu=1, memory=64, template=template)
    api.vm_action(vm["id"], "deploy", host_id=node.id)
    clone = node.answer("clone")
    [disk] = clone["args"]["vm"]["disks"]
    [nic] = clone["args"]["vm"]["nics"]
    assert (disk["source"], disk["clone"]) == (image["path"], "overlay")
    assert (nic["ip"], nic["gateway"], nic["network"]) == ("10.74.0.10", "10.70.0.1",
                                                           vnet["name"])
    node.answer("deploy", {"deploy_id": f"cirrus-{vm['id']}"})
    wait_status(api, vm["id"], "RUNNING")

    used = api.get_image(image["id"])
    assert (used["state"], used["vms"]) == ("USED", [vm["id"]])
    [lease] = api.get_vnet(vnet["id"])["ranges"][0]["leases"]
    assert (lease["ip"], lease["vm_id"], lease["nic_id"]) == ("10.74.0.10", vm["id"], 0)
    assert refused(api.delete_image, image["id"]).code == "FAILED_PRECONDITION"
    assert refused(api.delete_vnet, vnet["id"]).code == "FAILED_PRECONDITION"

    api.vm_action(vm["id"], "terminate", hard=True)
    node.answer("cancel")
    node.answer("delete")
    wait_status(api, vm["id"], "DONE")
    assert api.get_image(image["id"])["state"] == "READY"
    assert api.get_vnet(vnet["id"])["used"] == 0


# ----------------------------------------------------------------- the CLI

def test_the_cli_registers_images_and_makes_networks(gateway, cirrus_env, admin, tmp_path,
                                                     store, disks):
    env = {**cirrus_env, "HOME": str(tmp_path), "CIRRUS_USER": admin[0],
           "CIRRUS_PASSWORD": admin[1]}
    name = unique("gw-cli-img")
    made = cirrus(gateway, env, "image", "create", name, "--path", qcow2(disks),
                  "--datastore", store[1], "--persistent")
    assert made.returncode == 0, made.stderr
    image_id = int(made.stdout)
    shown = json.loads(cirrus(gateway, env, "image", "show", name, "--json").stdout)
    assert (shown["id"], shown["persistent"], shown["state"]) == (image_id, True, "READY")
    assert cirrus(gateway, env, "image", "nonpersistent", name).stdout == (
        f"image {image_id} ({name}) is non-persistent\n")
    table = [row.split() for row in cirrus(gateway, env, "image", "list").stdout.splitlines()]
    assert [str(image_id), name, admin[0], store[1], "16M", "qcow2", "no", "READY", "0"] in table

    notes = tmp_path / "readme.txt"
    notes.write_text("hello\n" * 200)
    bad = cirrus(gateway, env, "image", "create", unique("gw-cli-bad"), "--path", str(notes),
                 "--datastore", store[1])
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"cirrus: INVALID_ARGUMENT: path: {notes} is not a disk image")

    net = unique("gw-cli-net")
    (tmp_path / "net.one").write_text(network(net, "TYPE = IP4, IP = 10.75.0.10, SIZE = 10"))
    made = cirrus(gateway, env, "vnet", "create", "--file", str(tmp_path / "net.one"))
    assert made.returncode == 0, made.stderr
    vnet_id = int(made.stdout)
    assert cirrus(gateway, env, "vnet", "hold", net, "10.75.0.12").stdout == (
        f"10.75.0.12 of virtual network {net} is on hold\n")
    view = cirrus(gateway, env, "vnet", "show", str(vnet_id)).stdout
    assert view.startswith(f"VIRTUAL NETWORK {vnet_id}")
    leases = [row.split() for row in view.split("LEASES\n", 1)[1].splitlines()]
    assert leases[1][1:] == ["10.75.0.12", "-", "02:00:0a:4b:00:0c", "hold", "-"]
    (tmp_path / "ar.one").write_text("AR = [ TYPE = IP4, IP = 10.75.1.10, SIZE = 4 ]\n")
    added = cirrus(gateway, env, "vnet", "addar", net, "--file", str(tmp_path / "ar.one"))
    assert added.returncode == 0 and added.stdout.startswith(f"virtual network {net}: address "
                                                             "range ")
    ar_id = int(added.stdout.split("range ", 1)[1].split()[0])
    assert cirrus(gateway, env, "vnet", "rmar", net, str(ar_id)).returncode == 0
    listed = [row.split() for row in cirrus(gateway, env, "vnet", "list").stdout.splitlines()]
    assert [str(vnet_id), net, admin[0], "1", "1", "/", "10"] in listed
    gone = cirrus(gateway, env, "vnet", "show", "gw-no-such-net")
    assert (gone.returncode, gone.stderr) == (
        1, "cirrus: NOT_FOUND: virtual network 'gw-no-such-net' does not exist\n")
