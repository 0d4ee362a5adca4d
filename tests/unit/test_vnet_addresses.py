"""Address arithmetic of virtual networks, context keys, the OneGate token and
the disk image check: pure functions, no database."""
import hashlib
import hmac
import ipaddress
from datetime import datetime, timezone

import pytest

from cirrus.errors import InvalidArgument
from services.lifecycle import devices, images, vnets


def test_mac_is_the_prefix_and_the_ipv4_octets():
    assert vnets.mac_of_ip4("10.0.0.1") == "02:00:0a:00:00:01"
    assert vnets.mac_of_ip4("192.168.1.254", "aa:bb") == "aa:bb:c0:a8:01:fe"


def test_eui64_and_slaac_follow_rfc_4291():
    # 02:00:0a:00:00:01 -> flip the U/L bit (02 -> 00), ff:fe in the middle
    assert vnets.eui64("02:00:0a:00:00:01") == 0x00000afffe000001
    assert vnets.slaac("2001:db8::", "02:00:0a:00:00:01") == "2001:db8::aff:fe00:1"
    assert vnets.slaac("fd00:1:2:3::", "52:54:00:12:34:56") == "fd00:1:2:3:5054:ff:fe12:3456"


def test_an_ip4_range_hands_out_consecutive_addresses_and_macs():
    ar = vnets.parse_range({"TYPE": "IP4", "IP": "10.0.0.250", "SIZE": "7"})
    assert [vnets.address_at(ar, i)["ip"] for i in (0, 5, 6)] == \
        ["10.0.0.250", "10.0.0.255", "10.0.1.0"]
    assert vnets.address_at(ar, 6) == {"mac": "02:00:0a:00:01:00", "ip": "10.0.1.0", "ip6": None}


def test_ip4_6_gives_both_families_and_every_address_maps_back_to_its_index():
    ar = vnets.parse_range({"TYPE": "IP4_6", "IP": "10.1.0.1", "SIZE": "4",
                            "GLOBAL_PREFIX": "2001:db8:1::"})
    for idx in range(4):
        address = vnets.address_at(ar, idx)
        assert ipaddress.IPv6Address(address["ip6"]) in ipaddress.IPv6Network("2001:db8:1::/64")
        assert {vnets.index_of(ar, address[k]) for k in ("ip", "ip6", "mac")} == {idx}
    assert vnets.index_of(ar, "10.1.0.5") is None          # one past the end
    assert vnets.index_of(ar, "10.1.0.0") is None          # one before the start
    assert vnets.index_of(ar, "2001:db8:2::aff:fe01:1") is None


def test_ip6_static_and_ether_ranges():
    static = vnets.parse_range({"TYPE": "IP6_STATIC", "IP6": "fd00::ff", "SIZE": "2",
                                "PREFIX_LENGTH": "48"})
    assert vnets.address_at(static, 1)["ip6"] == "fd00::100"
    assert static["prefix_length"] == 48 and static["ip"] is None
    ether = vnets.parse_range({"TYPE": "ETHER", "SIZE": "3", "MAC": "02:00:00:00:00:fe"})
    assert [vnets.address_at(ether, i)["mac"] for i in range(3)] == \
        ["02:00:00:00:00:fe", "02:00:00:00:00:ff", "02:00:00:00:01:00"]
    assert vnets.address_at(ether, 0)["ip"] is None
    generated = vnets.parse_range({"TYPE": "IP6", "SIZE": "8", "GLOBAL_PREFIX": "2001:db8::"})
    assert generated["mac"].startswith("02:00:")


@pytest.mark.parametrize("ar,field", [
    ({"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "0"}, "SIZE"),
    ({"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "-3"}, "SIZE"),
    ({"TYPE": "IP4", "IP": "10.0.0.1"}, "SIZE"),
    ({"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "ten"}, "SIZE"),
    ({"TYPE": "IP4", "IP": "255.255.255.250", "SIZE": "10"}, "SIZE"),
    ({"TYPE": "IP4", "IP": "10.0.0.300", "SIZE": "1"}, "IP"),
    ({"TYPE": "IP4", "SIZE": "1"}, "IP"),
    ({"TYPE": "IP6", "SIZE": "1", "GLOBAL_PREFIX": "2001:db8::1"}, "GLOBAL_PREFIX"),
    ({"TYPE": "IP6_STATIC", "SIZE": "1", "IP6": "fd00::1", "PREFIX_LENGTH": "200"},
     "PREFIX_LENGTH"),
    ({"TYPE": "ETHER", "SIZE": "1", "MAC": "zz:00:00:00:00:00"}, "MAC"),
    ({"TYPE": "VLAN", "SIZE": "1"}, "TYPE"),
])
def test_a_bad_range_is_refused_naming_the_field(ar, field):
    with pytest.raises(InvalidArgument, match=rf"^AR\[2\] {field}: "):
        vnets.parse_range(ar, "AR[2]")


def test_overlapping_ranges_are_refused_naming_the_field():
    with pytest.raises(InvalidArgument, match=r"^AR\[1\] IP: .*overlaps address range 0"):
        vnets.check_ranges([{"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "10"},
                            {"TYPE": "IP4", "IP": "10.0.0.10", "SIZE": "5"}])
    with pytest.raises(InvalidArgument, match=r"^AR\[1\] MAC: "):
        vnets.check_ranges([{"TYPE": "ETHER", "SIZE": "10", "MAC": "02:00:00:00:00:01"},
                            {"TYPE": "ETHER", "SIZE": "1", "MAC": "02:00:00:00:00:0a"}])
    with pytest.raises(InvalidArgument, match=r"^AR\[1\] IP6: "):
        vnets.check_ranges([{"TYPE": "IP6_STATIC", "SIZE": "4", "IP6": "fd00::1"},
                            {"TYPE": "IP6_STATIC", "SIZE": "4", "IP6": "fd00::4"}])
    # touching but not overlapping is fine
    assert len(vnets.check_ranges([{"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "10"},
                                   {"TYPE": "IP4", "IP": "10.0.0.11", "SIZE": "5"}])) == 2


def test_context_keys_hold_the_nics_and_custom_attributes_and_computed_values_win():
    nics = [{"id": 0, "ip": "10.0.0.5", "mac": "02:00:0a:00:00:05", "mask": "255.255.255.0",
             "gateway": "10.0.0.1", "dns": "10.0.0.2", "ip6": None},
            {"id": 1, "ip": None, "mac": "02:00:00:00:00:09", "mask": None, "gateway": None,
             "dns": None, "ip6": "fd00::9"}]
    template = {"CONTEXT": {"TOKEN": "YES", "SSH_PUBLIC_KEY": "ssh-ed25519 AAA x",
                            "GREETING": "it's $(here)", "VMID": "999", "NETWORK": "YES"}}
    keys = devices.context_keys(7, "web", template, nics, "http://gate:5030")
    assert keys == {"TOKEN": "YES", "SSH_PUBLIC_KEY": "ssh-ed25519 AAA x",
                    "GREETING": "it's $(here)", "VMID": "7", "NAME": "web",
                    "ONEGATE_ENDPOINT": "http://gate:5030", "ETH0_IP": "10.0.0.5",
                    "ETH0_MAC": "02:00:0a:00:00:05", "ETH0_MASK": "255.255.255.0",
                    "ETH0_GATEWAY": "10.0.0.1", "ETH0_DNS": "10.0.0.2",
                    "ETH1_MAC": "02:00:00:00:00:09", "ETH1_IP6": "fd00::9"}
    assert devices.context_keys(1, "x", {}, [], "e")["TOKEN"] == "NO"


@pytest.mark.parametrize("key", ["1ST", "A-B", "$(X)"])
def test_a_context_key_that_is_no_shell_name_is_refused(key):
    with pytest.raises(InvalidArgument, match=r"^CONTEXT "):
        devices.check_context({"CONTEXT": {key: "v"}})


def test_the_token_is_an_hmac_of_the_vm_id_and_start_time():
    start = datetime(2026, 11, 24, 18, 0, 0, tzinfo=timezone.utc)
    expected = hmac.new(b"s3cret", b"42:2026-11-24T18:00:00+00:00", hashlib.sha256).hexdigest()
    assert devices.vm_token("s3cret", 42, start) == expected
    assert devices.vm_token("other", 42, start) != expected
    assert devices.vm_token("s3cret", 43, start) != expected


def test_disks_of_images_are_cloned_by_format_and_persistence():
    class Img:
        id, path, format, persistent = 3, "/ds/a.qcow2", "qcow2", False
    assert devices.image_disk(0, {}, Img, "DISK[0]")["clone"] == "overlay"
    Img.format = "raw"
    assert devices.image_disk(1, {"SIZE": "2048", "READONLY": "yes"}, Img, "DISK[1]") == {
        "id": 1, "type": "file", "source": "/ds/a.qcow2", "format": "raw", "clone": "copy",
        "size_mb": 2048, "target": "vdb", "readonly": True, "save_as": None, "image_id": 3}
    Img.persistent = True
    assert devices.image_disk(0, {}, Img, "DISK[0]")["clone"] == "ln"
    assert devices.volatile_disk(2, {"TYPE": "swap", "SIZE": "64"}, "DISK[2]")["target"] == "vdc"
    with pytest.raises(InvalidArgument, match=r"^DISK\[2\] SIZE"):
        devices.volatile_disk(2, {"TYPE": "fs"}, "DISK[2]")


@pytest.mark.parametrize("info,head,size,problem", [
    ({"format": "vmdk", "virtual-size": 512}, b"", 512, "vmdk"),
    ({"format": "raw", "virtual-size": 0}, b"", 0, "empty"),
    ({"format": "raw", "virtual-size": 13}, b"hello world!\n", 13, "sectors"),
    ({"format": "raw", "virtual-size": 1024}, b"line\n" * 200 + b"abcd\n" * 4, 1024, "text"),
])
def test_a_file_that_is_not_a_disk_image_is_refused_naming_the_path(info, head, size, problem):
    with pytest.raises(InvalidArgument, match=rf"^path: /x/f\b.*{problem}"):
        images.judge_image("/x/f", info, head, size)


def test_a_raw_image_of_whole_sectors_is_taken():
    assert images.judge_image("/x/d", {"format": "raw", "virtual-size": 1048576},
                              b"\0" * 4096, 1048576) == ("raw", 1048576)
    assert images.judge_image("/x/q", {"format": "qcow2", "virtual-size": 1 << 30},
                              b"QFI\xfb", 196616) == ("qcow2", 1 << 30)
