"""Datastores, images and virtual networks (issue 5) in the CLI, the SDK and
the API surface, without a gateway: parsing, output formats, name lookup,
and that every service of proto/ is served and reflected by the gateway."""
import os

import pytest

from cirrus import cli, client, protogen
from tests.unit.test_cli import parse, usage_error
from tests.unit.test_proto import services_in_protos


# ----------------------------------------------------------------- parsing

def test_datastore_create_defaults_to_an_image_datastore(capsys):
    args = parse("datastore", "create", "images", "--path", "/srv/images")
    assert (args.name, args.type, args.path, args.host) == ("images", "IMAGE", "/srv/images",
                                                            None)
    args = parse("datastore", "create", "sys", "--type", "system", "--path", "/d",
                 "--host", "node-1")
    assert (args.type, args.host) == ("SYSTEM", "node-1")
    assert "--path" in usage_error(capsys, "datastore", "create", "images")
    assert "invalid choice: 'FILE'" in usage_error(capsys, "datastore", "create", "x",
                                                   "--type", "file", "--path", "/d")


def test_image_create_takes_a_path_a_datastore_and_persistency(capsys):
    args = parse("image", "create", "debian", "--path", "d.qcow2")
    assert (args.name, args.path, args.datastore, args.persistent) == (
        "debian", "d.qcow2", None, False)
    args = parse("image", "create", "db", "--path", "/i/db.raw", "--datastore", "2",
                 "--persistent")
    assert (args.datastore, args.persistent) == (2, True)
    assert parse("image", "create", "db", "--path", "p", "--datastore", "fast").datastore \
        == "fast"
    assert "--path" in usage_error(capsys, "image", "create", "debian")


def test_a_relative_image_path_means_where_the_command_runs():
    assert cli.front_end_path("d.qcow2") == os.path.join(os.getcwd(), "d.qcow2")
    assert cli.front_end_path("/srv/../srv/d.qcow2") == "/srv/d.qcow2"
    assert cli.front_end_path(None) is None


@pytest.mark.parametrize("argv", [
    ("datastore", "show"), ("datastore", "delete"), ("image", "show"), ("image", "delete"),
    ("image", "persistent"), ("image", "nonpersistent"), ("vnet", "show"), ("vnet", "delete"),
])
def test_every_id_takes_a_name_or_an_id(capsys, argv):
    assert parse(*argv, "web-disk").id == "web-disk"
    assert parse(*argv, "12").id == 12
    assert "give its name or id" in usage_error(capsys, *argv, " ")
    assert "must be between 1" in usage_error(capsys, *argv, "0")


def test_vnet_commands_parse_their_arguments(capsys):
    args = parse("vnet", "create", "--file", "net.one", "--name", "priv")
    assert (args.file, args.name) == ("net.one", "priv")
    assert "--file" in usage_error(capsys, "vnet", "create")
    for action in ("hold", "release"):
        args = parse("--address", "gw:5000", "vnet", action, "priv", "10.0.0.7")
        assert (args.id, args.lease, args.address) == ("priv", "10.0.0.7", "gw:5000")
        assert "ADDR" in usage_error(capsys, "vnet", action, "priv")
    args = parse("vnet", "addar", "3", "--file", "-")
    assert (args.id, args.file) == (3, "-")
    args = parse("vnet", "rmar", "priv", "4")
    assert (args.id, args.ar_id) == ("priv", 4)
    assert "invalid id 'first'" in usage_error(capsys, "vnet", "rmar", "priv", "first")


@pytest.mark.parametrize("argv", [
    ("datastore", "list"), ("datastore", "show", "1"), ("image", "list"),
    ("image", "show", "a"), ("image", "persistent", "1"), ("vnet", "list"),
    ("vnet", "show", "priv"), ("vnet", "hold", "1", "10.0.0.1"), ("vnet", "rmar", "1", "2"),
])
def test_every_new_command_has_json(argv):
    assert parse(*argv, "--json").json is True
    assert parse(*argv).json is False


# ----------------------------------------------------------------- formatting

DATASTORE = {"id": 1, "name": "images", "type": "IMAGE", "path": "/srv/images", "host_id": None,
             "host": None, "images": 2, "created_at": "2026-01-02T03:04:05Z"}
IMAGE = {"id": 3, "name": "debian", "owner": "ann", "owner_id": 2, "datastore_id": 1,
         "datastore": "images", "path": "/srv/images/debian.qcow2", "format": "qcow2",
         "size_mb": 2048, "state": "USED", "persistent": False, "running_vms": 2,
         "vms": [7, 9], "error": None, "created_at": "2026-01-02T03:04:05Z"}
VNET = {"id": 2, "name": "priv", "owner": "admin", "owner_id": 1,
        "template": {"NETWORK_MASK": "255.255.255.0", "GATEWAY": "10.0.0.1"},
        "size": 60, "used": 2, "created_at": "2026-01-02T03:04:05Z",
        "ranges": [
            {"id": 5, "type": "IP4", "size": 50, "mac": "02:00:0a:00:00:0a", "ip": "10.0.0.10",
             "ip6": None, "global_prefix": None, "prefix_length": None, "attributes": {},
             "used": 2, "leases": [
                 {"mac": "02:00:0a:00:00:0a", "ip": "10.0.0.10", "ip6": None, "vm_id": 7,
                  "nic_id": 0, "hold": False},
                 {"mac": "02:00:0a:00:00:0b", "ip": "10.0.0.11", "ip6": None, "vm_id": None,
                  "nic_id": None, "hold": True}]},
            {"id": 6, "type": "IP6", "size": 10, "mac": "02:00:11:22:33:00", "ip": None,
             "ip6": None, "global_prefix": "2001:db8::", "prefix_length": None,
             "attributes": {}, "used": 0, "leases": []}]}


def test_datastore_table_and_view():
    lines = cli.datastore_table([DATASTORE]).splitlines()
    assert lines[0].split() == ["ID", "NAME", "TYPE", "PATH", "HOST", "IMAGES"]
    assert lines[1].split() == ["1", "images", "IMAGE", "/srv/images", "-", "2"]
    view = cli.datastore_view(DATASTORE)
    assert view.startswith("DATASTORE 1") and "PATH     /srv/images" in view
    assert "HOST" not in view       # unset fields are left out


def test_image_table_and_view_show_state_persistency_and_users():
    lines = cli.image_table([IMAGE, {**IMAGE, "id": 4, "persistent": True, "state": "READY",
                                     "running_vms": 0, "size_mb": 100}]).splitlines()
    assert lines[0].split() == ["ID", "NAME", "OWNER", "DATASTORE", "SIZE", "FORMAT",
                                "PERSISTENT", "STATE", "VMS"]
    assert lines[1].split() == ["3", "debian", "ann", "images", "2G", "qcow2", "no", "USED", "2"]
    assert lines[2].split() == ["4", "debian", "ann", "images", "100M", "qcow2", "yes", "READY",
                                "0"]
    view = cli.image_view(IMAGE)
    assert view.startswith("IMAGE 3")
    assert "DATASTORE   images (id 1)" in view and "VMS         7, 9" in view
    assert "ERROR" not in view
    assert "ERROR       VM 7 ended" in cli.image_view({**IMAGE, "state": "ERROR",
                                                       "error": "VM 7 ended", "vms": []})


def test_vnet_table_and_view_show_ranges_and_leases():
    lines = cli.vnet_table([VNET]).splitlines()
    assert lines[0].split() == ["ID", "NAME", "OWNER", "RANGES", "LEASES"]
    assert lines[1].split() == ["2", "priv", "admin", "2", "2", "/", "60"]
    view = cli.vnet_view(VNET)
    assert view.startswith("VIRTUAL NETWORK 2") and 'GATEWAY = "10.0.0.1"' in view
    ranges = view.split("ADDRESS RANGES\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert ranges[0].split() == ["AR", "TYPE", "SIZE", "USED", "FIRST_MAC", "FIRST_IP"]
    assert ranges[1].split() == ["5", "IP4", "50", "2", "02:00:0a:00:00:0a", "10.0.0.10"]
    assert ranges[2].split() == ["6", "IP6", "10", "0", "02:00:11:22:33:00", "2001:db8::/64"]
    leases = view.split("LEASES\n", 1)[1].splitlines()
    assert leases[0].split() == ["AR", "IP", "IP6", "MAC", "VM", "NIC"]
    assert leases[1].split() == ["5", "10.0.0.10", "-", "02:00:0a:00:00:0a", "7", "0"]
    assert leases[2].split() == ["5", "10.0.0.11", "-", "02:00:0a:00:00:0b", "hold", "-"]
    assert "LEASES\n" not in cli.vnet_view({**VNET, "ranges": VNET["ranges"][1:]})


# ----------------------------------------------------------------- names to ids

def test_names_resolve_among_the_listing_and_ids_pass_through():
    listing = [{"id": 3, "name": "debian"}, {"id": 4, "name": "db"}, {"id": 9, "name": "db"}]
    calls = []

    def lister():
        calls.append(1)
        return listing
    assert (client.resolve_id(5, lister, "image"), client.resolve_id("17", lister, "image")) \
        == (5, 17)
    assert calls == []
    assert client.resolve_id("debian", lister, "image") == 3
    with pytest.raises(client.ClientError) as missing:
        client.resolve_id("arch", lister, "image")
    assert (missing.value.code, missing.value.details) == ("NOT_FOUND",
                                                           "image 'arch' does not exist")
    with pytest.raises(client.ClientError) as shared:
        client.resolve_id("db", lister, "image")
    assert shared.value.code == "INVALID_ARGUMENT"
    assert shared.value.details == "2 images are called 'db' (ids 4, 9): give the id"


# ----------------------------------------------------------------- API surface

def test_the_protos_declare_the_storage_and_network_services():
    assert {("datastore", "DatastoreService"), ("image", "ImageService"),
            ("vnet", "VirtualNetworkService")} <= set(services_in_protos())


def test_the_gateway_serves_and_reflects_every_service_of_the_protos():
    from services.requests import gateway
    served = {service.full_name for service in gateway.API_SERVICES}
    assert served == {f"cirrus.v1.{name}" for _, name in services_in_protos()}
    for service in gateway.API_SERVICES:
        servicer = next(cls for cls in vars(gateway).values() if isinstance(cls, type)
                        and cls.__name__ == f"{service.name.removesuffix('Service')}Servicer")
        missing = [m.name for m in service.methods if m.name not in vars(servicer)]
        assert not missing, f"{servicer.__name__} does not implement {missing}"


def test_every_storage_rpc_is_documented():
    for stem in ("datastore", "image", "vnet"):
        text = (protogen.PROTO_ROOT / "cirrus" / "v1" / f"{stem}.proto").read_text()
        assert text.startswith("//"), f"{stem}.proto has no header comment"
        assert "credentials" in text.split("syntax", 1)[0]
