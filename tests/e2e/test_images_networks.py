"""Images and virtual networks end to end on the embedded driver
(test:///default): registered and made through the CLI, used by a VM that
boots from the image with a lease and a context CD, and given back at DONE."""
import json
import shutil
import subprocess

import pytest

from tests.procs import wait_until


def isoinfo(*args):
    return subprocess.run(["isoinfo", "-R", *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("isoinfo") is None, reason="isoinfo (genisoimage) is missing")
def test_a_vm_boots_from_an_image_with_a_lease_and_gives_both_back(cluster, tmp_path):
    disk = tmp_path / "boot.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    cluster.cli("datastore", "create", "e2e-images", "--path", tmp_path / "images")
    image_id = int(cluster.cli("image", "create", "e2e-boot", "--path", disk,
                               "--datastore", "e2e-images").stdout)
    net = tmp_path / "priv.net"
    net.write_text('NAME = "e2e-priv"\nNETWORK_MASK = "255.255.255.0"\nGATEWAY = "10.80.0.1"\n'
                   'DNS = "10.80.0.1"\nAR = [ TYPE = IP4, IP = 10.80.0.10, SIZE = 8 ]\n')
    vnet_id = int(cluster.cli("vnet", "create", "--file", net).stdout)
    # an address on hold is never leased
    cluster.cli("vnet", "hold", "e2e-priv", "10.80.0.10")

    template = tmp_path / "vm.tpl"
    template.write_text('CPU = 0.1\nMEMORY = 32\n'
                        'DISK = [ IMAGE = "e2e-boot" ]\n'
                        'NIC = [ NETWORK = "e2e-priv" ]\n'
                        'CONTEXT = [ TOKEN = "YES", ROLE = "web", MOTD = "it\'s $(not) run" ]\n')
    vm_id = cluster.create_vm("--file", template, "--name", "e2e-devices")
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "90")

    vnet = cluster.json("vnet", "show", "e2e-priv")
    leases = {lease["ip"]: lease for lease in vnet["ranges"][0]["leases"]}
    [ip] = [ip for ip, lease in leases.items() if lease["vm_id"] == vm_id]
    # from the range, and not the held address
    assert ip in {f"10.80.0.{last}" for last in range(11, 18)}
    assert leases["10.80.0.10"]["hold"] is True
    # the node cloned the image as an overlay and wrote the context CD with the lease
    vm_dir = cluster.datastore / str(vm_id)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vm_dir / "disk.0")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(disk)
    iso = str(vm_dir / "context.iso")
    assert sorted(isoinfo("-f", "-i", iso).split()) == ["/context.sh", "/token.txt"]
    script = isoinfo("-i", iso, "-x", "/context.sh")
    assert f"ETH0_IP='{ip}'" in script and "ETH0_GATEWAY='10.80.0.1'" in script
    assert "ROLE='web'" in script and "MOTD='it'\\''s $(not) run'" in script
    assert isoinfo("-i", iso, "-x", "/token.txt").strip()

    # vm show lists what the VM holds: the disk of the image, the NIC's lease, the CD
    shown = cluster.json("vm", "show", vm_id)
    [shown_disk] = shown["disks"]
    assert (shown_disk["image"], shown_disk["target"], shown_disk["clone"],
            shown_disk["path"]) == ("e2e-boot", "vda", "overlay", str(vm_dir / "disk.0"))
    assert shown_disk["size_mb"] == 64
    [shown_nic] = shown["nics"]
    assert (shown_nic["network"], shown_nic["ip"]) == ("e2e-priv", ip)
    assert shown["context"]["path"] == iso and shown["context"]["token"] is True
    assert shown["context"]["values"]["MOTD"] == "it's $(not) run"
    view = cluster.cli("vm", "show", vm_id).stdout
    disk_rows = view.split("DISKS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert disk_rows[1].split() == ["0", "vda", "e2e-boot", "file", "overlay", "64M",
                                    str(vm_dir / "disk.0")]
    nic_rows = view.split("NICS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert nic_rows[1].split()[:4] == ["0", "e2e-priv", ip, shown_nic["mac"]]

    image = cluster.json("image", "show", "e2e-boot")
    assert (image["id"], image["state"], image["vms"]) == (image_id, "USED", [vm_id])
    table = cluster.cli("image", "list").stdout
    assert any(row.split()[:2] == [str(image_id), "e2e-boot"] and "USED" in row.split()
               for row in table.splitlines())
    busy = cluster.cli("vnet", "delete", vnet_id, check=False)
    assert busy.returncode == 1 and "FAILED_PRECONDITION" in busy.stderr

    cluster.cli("vm", "terminate", vm_id, "--hard")
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "60")
    wait_until(lambda: cluster.json("vnet", "show", vnet_id)["used"] == 1, timeout=10,
               what="only the held address left in use")
    assert cluster.json("image", "show", image_id)["state"] == "READY"
    done = cluster.json("vm", "show", vm_id)
    assert (done["disks"], done["nics"], done["context"]) == ([], [], None)
    cluster.cli("vnet", "release", vnet_id, "10.80.0.10")
    cluster.cli("vnet", "delete", "e2e-priv")
    cluster.cli("image", "delete", "e2e-boot")
    cluster.cli("datastore", "delete", "e2e-images")
    assert disk.exists()        # an image is forgotten, its file kept
