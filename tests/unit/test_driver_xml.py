"""The libvirt domain XML is a pure function of the VM."""
import xml.etree.ElementTree as ET

import pytest

from services.drivers.libvirt_backend import domain_xml


def vm(**template):
    return {"id": 42, "name": "web", "cpu": 0.5, "vcpu": 2, "memory": 256, "template": template}


def parse(vm_dict, domain_type="qemu", vm_dir="/ds/42", formats=None):
    return ET.fromstring(domain_xml(vm_dict, vm_dir, domain_type, formats))


def test_name_memory_in_kib_and_vcpu():
    root = parse(vm())
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "cirrus-42"
    assert root.findtext("title") == "web"
    assert root.find("memory").get("unit") == "KiB"
    assert root.findtext("memory") == str(256 * 1024)
    assert root.findtext("vcpu") == "2"


def test_test_domain_has_no_emulator_devices():
    root = parse(vm(DISK={"SOURCE": "/img/a.raw"}), domain_type="test")
    assert root.get("type") == "test"
    assert root.find("features") is None
    assert root.find("devices/serial") is None
    assert root.find("devices/disk/driver") is None
    assert root.find("devices/disk/source").get("file") == "/ds/42/disk.0"


def test_qemu_domain_has_acpi_and_a_logged_serial_console():
    root = parse(vm(), domain_type="kvm")
    assert root.get("type") == "kvm"
    assert root.find("features/acpi") is not None
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/serial/log").get("file") == "/ds/42/console.log"
    assert root.find("devices/console/target").get("type") == "serial"


def test_kernel_initrd_and_cmdline():
    root = parse(vm(OS={"KERNEL": "/g/vmlinuz", "INITRD": "/g/initrd.img",
                        "KERNEL_CMDLINE": "console=ttyS0"}))
    assert root.findtext("os/type") == "hvm"
    assert root.findtext("os/kernel") == "/g/vmlinuz"
    assert root.findtext("os/initrd") == "/g/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.find("os/boot") is None


def test_without_kernel_boots_from_disk():
    root = parse(vm())
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"


def test_arch_and_machine_go_on_the_os_type():
    root = parse(vm(OS={"ARCH": "x86_64", "MACHINE": "q35"}))
    assert root.find("os/type").attrib == {"arch": "x86_64", "machine": "q35"}


def test_disks_point_at_their_copies_in_the_vm_dir():
    root = parse(vm(DISK=[{"SOURCE": "/img/a.qcow2"}, {"TYPE": "fs", "SIZE": 10},
                          {"PATH": "/img/c.raw", "TARGET": "sdc", "READONLY": "yes"}]),
                 formats={0: "qcow2"})
    disks = root.findall("devices/disk")
    # a DISK without SOURCE or PATH has nothing to copy and is left out
    assert [d.find("source").get("file") for d in disks] == ["/ds/42/disk.0", "/ds/42/disk.2"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "sdc"]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "raw"]
    assert disks[0].find("readonly") is None
    assert disks[1].find("readonly") is not None


def test_a_nic_is_user_mode_networking_never_a_bridge():
    root = parse(vm(NIC=[{"NETWORK": "public", "MAC": "02:00:0a:00:00:01"}, {"MODEL": "e1000"}]))
    nics = root.findall("devices/interface")
    assert [n.get("type") for n in nics] == ["user", "user"]
    assert nics[0].find("mac").get("address") == "02:00:0a:00:00:01"
    assert [n.find("model").get("type") for n in nics] == ["virtio", "e1000"]
    assert parse(vm()).find("devices/interface") is None


def test_lower_case_template_keys_are_read_like_opennebula():
    root = parse(vm(os={"kernel": "/g/vmlinuz"}, disk={"source": "/img/a"}))
    assert root.findtext("os/kernel") == "/g/vmlinuz"
    assert len(root.findall("devices/disk")) == 1


def test_values_are_escaped():
    root = parse(vm(OS={"KERNEL": "/g/<odd>&'name\""}))
    assert root.findtext("os/kernel") == "/g/<odd>&'name\""


@pytest.mark.parametrize("field, value", [("memory", 0), ("memory", -5), ("memory", None),
                                          ("vcpu", 1.5), ("vcpu", "2"), ("vcpu", True)])
def test_bad_memory_or_vcpu_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        domain_xml({**vm(), field: value}, "/ds/42", "qemu")


# ---------------------------------------------------------------- disks, NICs and context from lifecycle

def a_disk(disk_id, **fields):
    return {"id": disk_id, "type": "file", "source": f"/img/{disk_id}.qcow2", "format": "qcow2",
            "clone": "overlay", "size_mb": None, "target": "vd" + "abcdef"[disk_id],
            "readonly": False, "save_as": None, **fields}


def test_disk_specs_give_files_formats_targets_and_readonly():
    spec = {**vm(DISK={"SOURCE": "/ignored"}), "disks": [
        a_disk(0),
        a_disk(1, clone="copy", format="raw", source="/img/data.raw", target="vdc"),
        a_disk(2, clone="ln", source="/img/persistent.qcow2", readonly=True, target="sdb"),
        {"id": 3, "type": "swap", "size_mb": 64, "target": "vdd"},
        {"id": 4, "type": "fs", "size_mb": 10, "target": "vde"}]}
    # the spec's format wins over what a file seems to hold
    disks = parse(spec, formats={0: "raw", 1: "qcow2"}).findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == [
        "/ds/42/disk.0", "/ds/42/disk.1", "/img/persistent.qcow2", "/ds/42/disk.3",
        "/ds/42/disk.4"]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "raw", "qcow2", "raw",
                                                              "raw"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdc", "sdb", "vdd", "vde"]
    assert [d.find("readonly") is not None for d in disks] == [False, False, True, False, False]
    assert {d.get("device") for d in disks} == {"disk"}


@pytest.mark.parametrize("change, field", [
    ({"type": "tape"}, "type"), ({"source": "relative/img"}, "source"),
    ({"format": "vmdk"}, "format"), ({"clone": "link"}, "clone"), ({"size_mb": 0}, "size_mb"),
    ({"target": "vda; rm"}, "target"), ({"readonly": "yes"}, "readonly"),
    ({"save_as": "out.qcow2"}, "save_as"), ({"id": -1}, "id")])
def test_a_bad_disk_spec_is_refused_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        domain_xml({**vm(), "disks": [a_disk(0, **change)]}, "/ds/42", "qemu")


def test_volatile_disks_need_a_size_and_ids_and_targets_are_unique():
    with pytest.raises(ValueError, match="DISK 1: a swap disk needs size_mb"):
        domain_xml({**vm(), "disks": [a_disk(0), {"id": 1, "type": "swap", "target": "vdb"}]},
                   "/ds/42", "qemu")
    with pytest.raises(ValueError, match="target vda appears more than once"):
        domain_xml({**vm(), "disks": [a_disk(0), a_disk(1, target="vda")]}, "/ds/42", "qemu")


def test_nic_specs_give_mac_and_model_on_user_mode_networking():
    spec = {**vm(NIC={"MAC": "02:00:00:00:00:99"}), "nics": [
        {"id": 0, "network": "priv", "network_id": 3, "ip": "10.0.0.5",
         "mac": "02:00:0a:00:00:05", "model": "virtio"},
        {"id": 1, "network": "pub", "network_id": 4, "ip": None, "mac": "02:00:0a:00:01:07",
         "model": "e1000"}]}
    nics = parse(spec).findall("devices/interface")
    assert [n.get("type") for n in nics] == ["user", "user"]
    assert [n.find("mac").get("address") for n in nics] == ["02:00:0a:00:00:05",
                                                            "02:00:0a:00:01:07"]
    assert [n.find("model").get("type") for n in nics] == ["virtio", "e1000"]
    assert parse({**vm(), "nics": []}).find("devices/interface") is None


@pytest.mark.parametrize("nic, field", [({"mac": "02:00:0a"}, "mac"),
                                        ({"mac": "02:00:0a:00:00:05", "model": "e1000'/>"},
                                         "model")])
def test_a_bad_nic_is_refused_naming_the_field(nic, field):
    with pytest.raises(ValueError, match=f"NIC 0: {field}"):
        domain_xml({**vm(), "nics": [nic]}, "/ds/42", "qemu")


def test_the_context_cd_is_a_readonly_cdrom_on_a_free_target():
    spec = {**vm(), "context": {"VMID": "42"},
            "disks": [a_disk(0, target="hda"), a_disk(1, target="vdb")]}
    (cdrom,) = [d for d in parse(spec).findall("devices/disk") if d.get("device") == "cdrom"]
    assert cdrom.find("source").get("file") == "/ds/42/context.iso"
    assert cdrom.find("driver").get("type") == "raw"
    assert cdrom.find("target").attrib == {"dev": "hdb", "bus": "ide"}
    assert cdrom.find("readonly") is not None
    # q35 has no IDE
    q35 = parse({**vm(OS={"MACHINE": "q35"}), "context": {}})
    assert q35.find("devices/disk/target").attrib == {"dev": "sda", "bus": "sata"}
    # no context, no CD
    assert parse(vm()).find("devices/disk") is None


def test_template_source_disks_fill_the_indexes_lifecycle_leaves_free():
    # lifecycle sends image and volatile disks; DISK 1 names a plain SOURCE
    spec = {**vm(DISK=[{"IMAGE": "base"}, {"SOURCE": "/img/plain.raw"},
                       {"TYPE": "swap", "SIZE": 64}]),
            "disks": [a_disk(0, image_id=3),
                      {"id": 2, "type": "swap", "source": None, "format": "raw",
                       "clone": None, "size_mb": 64, "target": "vdc", "readonly": False,
                       "save_as": None}],
            "nics": []}
    disks = parse(spec, formats={1: "qcow2"}).findall("devices/disk")
    assert [d.find("source").get("file") for d in disks] == ["/ds/42/disk.0", "/ds/42/disk.1",
                                                             "/ds/42/disk.2"]
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb", "vdc"]
    # the template disk's format is its file's; the others' their spec's
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "qcow2", "raw"]


def test_without_lifecycle_nics_the_template_nics_are_used():
    root = parse({**vm(NIC={"MAC": "02:00:00:00:00:99"}), "nics": []})
    assert root.find("devices/interface/mac").get("address") == "02:00:00:00:00:99"
