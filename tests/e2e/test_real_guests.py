"""Real guests: qemu:///system boots the tiny guest of deploy/guest under TCG,
driven through the whole cluster and the CLI, as a user would.

Needs root, libvirtd and qemu (deploy/setup.sh installs them); skipped with
CIRRUS_SKIP_QEMU=1."""
import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cirrus.config import REPO_ROOT
from tests.procs import wait_until

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.environ.get("CIRRUS_SKIP_QEMU") == "1", reason="CIRRUS_SKIP_QEMU=1"),
]

GUEST = Path(os.environ.get("CIRRUS_GUEST_CACHE", "/var/tmp/cirrus/guest"))


def virsh_running(*flags):
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name", *flags],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def tiny_template(guest, memory=128, devices=""):
    """A VM template booting the tiny guest in ``guest`` (its kernel and
    initrd), with ``devices`` (DISK, NIC, CONTEXT lines) after it."""
    return f'''# the tiny busybox guest from deploy/guest
CPU = 0.5
VCPU = 1
MEMORY = {memory}
OS = [ KERNEL = "{guest}/vmlinuz", INITRD = "{guest}/initrd.img",
       KERNEL_CMDLINE = "console=ttyS0 quiet" ]
{devices}'''


@pytest.fixture(scope="module")
def tiny_guest():
    subprocess.run([str(REPO_ROOT / "deploy" / "libvirt-up.sh")], check=True, timeout=120)
    subprocess.run([str(REPO_ROOT / "deploy" / "guest" / "build-tiny-guest.sh"), str(GUEST)],
                   check=True, timeout=600)
    return GUEST


def remove_domains_under(path):
    """Destroy and undefine the domains whose XML names files under ``path``:
    what a test that failed half way left of its cluster's VMs."""
    virsh = ["virsh", "-c", "qemu:///system"]
    for name in virsh_running("--all"):
        xml = subprocess.run([*virsh, "dumpxml", name], capture_output=True, text=True).stdout
        if f"'{path}/" in xml or f'"{path}/' in xml:
            subprocess.run([*virsh, "destroy", name], capture_output=True)
            subprocess.run([*virsh, "undefine", name], capture_output=True)


@pytest.fixture
def qemu_cluster(make_cluster):
    """A one-node cluster on qemu:///system with VM ids of its own; its
    domains are removed after the test, however the test ended."""
    cluster = make_cluster(nodes=("qemu-1",), uri="qemu:///system").isolate_vm_ids()
    yield cluster
    remove_domains_under(cluster.datastore)


def test_two_real_guests_boot_and_go_away(qemu_cluster, tiny_guest, tmp_path):
    cluster = qemu_cluster
    template = tmp_path / "tiny.tpl"
    template.write_text(tiny_template(tiny_guest))
    ids = [cluster.create_vm("--file", template, "--name", f"tiny-{i}") for i in range(2)]
    for vm_id in ids:
        cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "120")
    deploy_ids = {cluster.json("vm", "show", vm_id)["deploy_id"] for vm_id in ids}
    assert deploy_ids <= virsh_running()

    for vm_id in ids:
        cluster.cli("vm", "terminate", vm_id, "--hard")
    for vm_id in ids:
        cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "60")
    wait_until(lambda: not deploy_ids & virsh_running(), timeout=30, what="domains gone")


# custom CONTEXT values a careless context.sh would run or cut short; written
# below in OpenNebula syntax, where \" is a quote and \\ a backslash
AWKWARD = {
    "QUOTES": 'it\'s a "quoted" word',
    "SUBSHELL": "$(poweroff -f) and ${HOME}",
    "BACKTICKS": "`reboot -f`; echo pwned",
    "LINES": "first line\nsecond 'line' \\ back",
}


def one_string(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def console_values(lines, prefix):
    """{KEY: value} from the guest's "<prefix> KEY=value" lines."""
    return dict(line[len(prefix) + 1:].split("=", 1) for line in lines
                if line.startswith(prefix + " ") and "=" in line)


def test_a_real_guest_boots_from_an_image_reads_its_context_and_powers_off_by_acpi(
        qemu_cluster, tiny_guest, tmp_path):
    cluster = qemu_cluster
    # the image: a copy of the guest's disk where qemu (its own user) can read it
    store = cluster.datastore / "images"
    store.mkdir(parents=True)
    shutil.copy(tiny_guest / "disk.qcow2", store / "tiny.qcow2")
    cluster.cli("datastore", "create", f"guest-images-{cluster.id}", "--path", store)
    cluster.cli("image", "create", "tiny-disk", "--path", store / "tiny.qcow2",
                "--datastore", f"guest-images-{cluster.id}")
    net = tmp_path / "guest.net"
    net.write_text('NAME = "guest-net"\nNETWORK_MASK = "255.255.255.0"\n'
                   'GATEWAY = "192.168.150.1"\n'
                   'AR = [ TYPE = IP4, IP = 192.168.150.20, SIZE = 4 ]\n')
    cluster.cli("vnet", "create", "--file", net)
    custom = ",\n".join(f"  {key} = {one_string(value)}" for key, value in AWKWARD.items())
    template = tmp_path / "guest.tpl"
    template.write_text(tiny_template(tiny_guest, 192, f'''DISK = [ IMAGE = "tiny-disk" ]
NIC = [ NETWORK = "guest-net" ]
CONTEXT = [ TOKEN = "YES",
{custom} ]
'''))
    vm_id = cluster.create_vm("--file", template, "--name", "ctx-guest")
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "120")
    shown = cluster.json("vm", "show", vm_id)
    [nic] = shown["nics"]
    assert nic["network"] == "guest-net" and nic["ip"].startswith("192.168.150.")
    assert shown["disks"][0]["image"] == "tiny-disk"

    # the guest says READY once it has printed its context and disks
    log = cluster.datastore / str(vm_id) / "console.log"
    wait_until(lambda: log.exists() and "CIRRUS GUEST READY" in log.read_text(errors="replace"),
               timeout=180, interval=1, what="the guest read its context CD and disks")
    console = log.open(errors="replace")       # kept open: the file goes at EPILOG
    lines = [line.strip() for line in console.read().splitlines()]
    plain, exact = console_values(lines, "CONTEXT"), console_values(lines, "CONTEXT64")
    assert plain["VMID"] == str(vm_id) and plain["NAME"] == "ctx-guest"
    assert plain["ETH0_IP"] == nic["ip"] and plain["ETH0_MAC"] == nic["mac"]
    for key, value in AWKWARD.items():
        assert base64.b64decode(exact[key]).decode() == value, key
    assert "CONTEXT token.txt present" in lines
    [applied] = [line for line in lines if line.startswith("CONTEXT APPLIED eth0")]
    assert f"{nic['ip']}/24" in applied.split()
    # the disk is the image's overlay: the guest reads the image's first line
    assert "DISK vda CIRRUS TINY DISK" in lines

    # terminate without --hard: libvirt presses the power button, the guest powers off
    deploy_id = shown["deploy_id"]
    cluster.cli("vm", "terminate", vm_id)
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "90")
    assert "cirrus-guest: power button pressed, powering off" in console.read()
    console.close()
    history = [(h["action"], h["to_status"]) for h in cluster.json("vm", "show", vm_id)["history"]]
    assert ("terminate", "SHUTDOWN") in history and ("shutdown_success", "EPILOG") in history
    assert deploy_id not in virsh_running("--all")
    assert not (cluster.datastore / str(vm_id)).exists()
    assert (store / "tiny.qcow2").exists()
    assert cluster.json("vnet", "show", "guest-net")["used"] == 0
