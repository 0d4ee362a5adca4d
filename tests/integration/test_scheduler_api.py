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


def test_clusters_host_templates_and_vm_groups_through_the_api(api, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as lifecycle:
        node_a, host_a = join_node(lifecycle, amqp_uri, "api-a")
        node_b, host_b = join_node(lifecycle, amqp_uri, "api-b")
    cluster = api.create_cluster("api-cluster", {"TIER": "gold", "RESERVED_CPU": "100"})
    assert (cluster["name"], cluster["template"], cluster.get("hosts", [])) == \
        ("api-cluster", {"TIER": "gold", "RESERVED_CPU": "100"}, [])
    shown = api.cluster_add_host(cluster["id"], host_a["id"])
    assert [h["name"] for h in shown["hosts"]] == ["api-a"]
    host = api.get_host(host_a["id"])
    assert (host["cluster_id"], host["reserved_cpu"]) == (cluster["id"], 100)
    assert api.cluster_id("api-cluster") == cluster["id"]
    assert "api-cluster" in [c["name"] for c in api.list_clusters()]

    host = api.update_host(host_b["id"], template={"PRIORITY": "7", "SSD": "yes"})
    assert host["template"] == {"PRIORITY": "7", "SSD": "yes"}
    with pytest.raises(ClientError) as caught:
        api.update_host(host_b["id"], template={"RESERVED_CPU": "lots"})
    assert caught.value.code == "INVALID_ARGUMENT" and "RESERVED_CPU" in caught.value.details

    group = api.create_vmgroup("api-group", [{"name": "db", "policy": "ANTI_AFFINED"},
                                             {"name": "web", "host_affined": [host_b["id"]]}],
                               [{"policy": "ANTI_AFFINED", "roles": ["db", "web"]}])
    assert [(r["name"], r.get("policy")) for r in group["roles"]] == \
        [("db", "ANTI_AFFINED"), ("web", "NONE")]
    with pytest.raises(ClientError) as caught:
        api.create_vmgroup("api-bad", [{"name": "a"}], [{"policy": "AFFINED", "roles": ["a", "z"]}])
    assert caught.value.code == "INVALID_ARGUMENT" and "'z'" in caught.value.details

    # placement flags on create: a bad requirement is refused by the request manager
    with pytest.raises(ClientError) as caught:
        api.create_vm(name="api-bad", cpu=1, memory=256, requirements="TIER = ")
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.details.startswith("SCHED_REQUIREMENTS:")
    with pytest.raises(ClientError) as caught:
        api.create_vm(name="api-bad", cpu=1, memory=256, vmgroup="api-group")
    assert "vmgroup: give NAME:ROLE" in caught.value.details
    web = api.create_vm(name="api-web", cpu=1, memory=256, vmgroup="api-group:web",
                        rank="PRIORITY")
    cmd = node_b.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("clone", web["id"])
    gold = api.create_vm(name="api-gold", cpu=1, memory=256, requirements='TIER = "gold"')
    cmd = node_a.next_command(timeout=15)
    assert (cmd["action"], cmd["vm_id"]) == ("clone", gold["id"])
    shown = api.get_vmgroup(group["id"])
    assert [r.get("vms", []) for r in shown["roles"]] == [[], [web["id"]]]
    assert api.vmgroup_id("api-group") == group["id"]

    with pytest.raises(ClientError) as caught:
        api.delete_cluster(cluster["id"])
    assert caught.value.code == "FAILED_PRECONDITION"
    with pytest.raises(ClientError) as caught:
        api.delete_vmgroup(group["id"])
    assert caught.value.code == "FAILED_PRECONDITION"
    empty = api.create_vmgroup("api-empty", [{"name": "solo"}])
    assert api.delete_vmgroup(empty["id"])["name"] == "api-empty"
    assert "api-empty" not in [g["name"] for g in api.list_vmgroups()]
    api.cluster_del_host(cluster["id"], host_a["id"])
    assert api.delete_cluster(cluster["id"])["name"] == "api-cluster"
