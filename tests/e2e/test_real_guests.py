"""The walking skeleton on real guests: qemu:///system boots the tiny guest
under TCG, driven through the whole cluster and the CLI.

Needs root, libvirtd and qemu (deploy/setup.sh installs them); skipped with
CIRRUS_SKIP_QEMU=1."""
import os
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


def virsh_running():
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"],
                         capture_output=True, text=True, check=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def tiny_guest():
    subprocess.run([str(REPO_ROOT / "deploy" / "libvirt-up.sh")], check=True, timeout=120)
    subprocess.run([str(REPO_ROOT / "deploy" / "guest" / "build-tiny-guest.sh"), str(GUEST)],
                   check=True, timeout=600)
    return GUEST


def test_two_real_guests_boot_and_go_away(make_cluster, tiny_guest, tmp_path):
    cluster = make_cluster(nodes=("qemu-1",), uri="qemu:///system")
    template = tmp_path / "tiny.tpl"
    template.write_text(f'''# the tiny busybox guest from deploy/guest
CPU = 0.5
VCPU = 1
MEMORY = 128
OS = [ KERNEL = "{tiny_guest}/vmlinuz", INITRD = "{tiny_guest}/initrd.img",
       KERNEL_CMDLINE = "console=ttyS0 quiet" ]
''')
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
