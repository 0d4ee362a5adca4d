"""Placement rules through the public API: a VM template's SCHED_REQUIREMENTS
and SCHED_RANK are checked when the VM is created (INVALID_ARGUMENT naming
the position), and the reason a VM waits is on the VM as the API shows it."""
import pytest

from cirrus import config
from cirrus.client import Client, ClientError
from tests.broker import join_node, rpc_proxy
from tests.integration.test_gateway import start_gateway
from tests.procs import wait_until
from tests.scheduling import running


@pytest.fixture(scope="module")
def services(cirrus_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("sched-api")
    for _ in running(cirrus_env, logs, ("requests", "lifecycle", "scheduler")):
        gateway, address = start_gateway(cirrus_env, logs)
        yield address
        gateway.stop()


@pytest.fixture(scope="module")
def api(services):
    auth = config.get()["auth"]
    with Client(services, username=str(auth["admin_user"]),
                password=str(auth["admin_password"])) as client:
        yield client


@pytest.mark.parametrize("template, message", [
    ('SCHED_REQUIREMENTS = "SSD = \\"yes\\" &"', "SCHED_REQUIREMENTS: "),
    ('SCHED_RANK = "FREE_CPU *"', "SCHED_RANK: "),
    ('SCHED_REQUIREMENTS = "ZONE = $NOPE"', "SCHED_REQUIREMENTS: "),
    ('VMGROUP = [ VMGROUP_NAME = "no-such-group", ROLE = "web" ]',
     "VM group 'no-such-group' does not exist"),
])
def test_a_bad_placement_rule_is_refused_when_the_vm_is_created(api, template, message):
    before = {vm["id"] for vm in api.list_vms()}
    with pytest.raises(ClientError) as caught:
        api.create_vm(name="bad-rules", cpu=1, memory=256, template=template)
    expected_code = "NOT_FOUND" if "VMGROUP" in template else "INVALID_ARGUMENT"
    assert caught.value.code == expected_code
    assert message in caught.value.details
    assert {vm["id"] for vm in api.list_vms()} == before


def test_a_vm_waits_with_its_reason_until_a_host_matches(api, amqp_uri):
    vm = api.create_vm(name="wants-ssd", cpu=1, memory=256,
                       template='SCHED_REQUIREMENTS = "SSD = \\"yes\\""')
    with rpc_proxy(amqp_uri, "lifecycle") as lifecycle:
        node, host = join_node(lifecycle, amqp_uri, "api-plain")
        wait_until(lambda: api.get_vm(vm["id"])["sched_message"] ==
                   "No host matches the requirements", timeout=15, what="the reason")
        assert api.get_vm(vm["id"])["status"] == "PENDING"
        lifecycle.update_host(host["id"], {"SSD": "yes"})
        cmd = node.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("clone", vm["id"])
    shown = api.get_vm(vm["id"])
    assert (shown["status"], shown["host"], shown["sched_message"]) == \
        ("PROLOG", "api-plain", None)
