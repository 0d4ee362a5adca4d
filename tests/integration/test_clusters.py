"""Clusters, host templates, reserved capacity and VM groups in lifecycle,
against the real PostgreSQL."""
import uuid

import pytest
from sqlalchemy import select

from cirrus.db.models import Cluster, Host, Outbox, VmGroup
from cirrus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.lifecycle import clusters, logic, monitoring
from tests.integration.test_lifecycle_logic import admin_id, factory  # noqa: F401 (fixtures)
from tests.vm_devices import outbox_commands


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_host(factory, cpu=400, mem=4096):
    with factory() as s, s.begin():
        host = logic.create_host(s, unique("ch"))
        monitoring.handle_monitor(s, {"host": host.name, "monitoring": {
            "TOTALCPU": cpu, "TOTALMEMORY": mem * 1024}})
        return host.id


def test_host_update_merges_keys_and_reserved_capacity_limits_reservation(factory, admin_id):
    host_id = make_host(factory)
    with factory() as s, s.begin():
        shown = logic.host_to_dict(clusters.update_host(
            s, host_id, {"ssd": "yes", "priority": 5, "RESERVED_CPU": "200"}))
        assert shown["template"] == {"SSD": "yes", "PRIORITY": "5", "RESERVED_CPU": "200"}
        assert (shown["reserved_cpu"], shown["reserved_mem"]) == (200, 0)
        # the scheduler hears that a monitored host changed
        last = s.scalars(select(Outbox).order_by(Outbox.id.desc()).limit(1)).one()
        assert last.payload == {"id": host_id, "name": shown["name"], "state": "MONITORED"}
    with factory() as s, s.begin():
        big = logic.allocate(s, admin_id, "big", 3, 1, 512, {})
        # 400 - 200 reserved leaves 200: a 3-CPU VM does not fit, whatever the raw total
        answer = logic.deploy(s, big.id, host_id)
        assert answer["outcome"] == "host_unfit"
        assert "it has 200% and 4096 MB free" in answer["reason"]
        small = logic.allocate(s, admin_id, "small", 2, 1, 512, {})
        assert logic.deploy(s, small.id, host_id)["outcome"] == "deployed"
        logic.vm_action(s, big.id, "terminate")
    with factory() as s, s.begin():
        # an empty value removes a key; a negative reservation is overcommit
        host = clusters.update_host(s, host_id, {"SSD": "", "RESERVED_CPU": "-400"})
        assert host.template == {"PRIORITY": "5", "RESERVED_CPU": "-400"}
        assert host.reserved_cpu == -400
        more = logic.allocate(s, admin_id, "over", 5, 1, 512, {})
        # 400 + 400 overcommit - 200 used leaves 600
        assert logic.deploy(s, more.id, host_id)["outcome"] == "deployed"


@pytest.mark.parametrize("template, message", [
    ({"RESERVED_CPU": "lots"}, "RESERVED_CPU: must be a whole number of percent of a core"),
    ({"RESERVED_MEM": "1.5"}, "RESERVED_MEM: must be a whole number of MB"),
    ({"MAX_CPU": "900"}, "MAX_CPU is computed by the scheduler"),
    ({"1BAD": "x"}, "'1BAD' is not a valid key"),
    ({"DISK": {"SIZE": "1"}}, "DISK must be a single value"),
    ("SSD=yes", "must be a mapping of KEY to VALUE"),
])
def test_bad_host_template_is_refused_and_changes_nothing(factory, template, message):
    host_id = make_host(factory)
    with factory() as s, s.begin():
        clusters.update_host(s, host_id, {"ZONE": "a"})
    with pytest.raises(InvalidArgument, match=message):
        with factory() as s, s.begin():
            clusters.update_host(s, host_id, template)
    with factory() as s:
        assert s.get(Host, host_id).template == {"ZONE": "a"}


def test_cluster_reservation_applies_to_its_hosts_unless_the_host_sets_one(factory):
    a, b = make_host(factory), make_host(factory)
    with factory() as s, s.begin():
        cluster = clusters.create_cluster(s, unique("cl"), {"RESERVED_MEM": 1024, "TIER": "gold"})
        cluster_id = cluster.id
        clusters.add_host(s, cluster_id, a)
        clusters.add_host(s, cluster_id, b)
        clusters.update_host(s, b, {"RESERVED_MEM": "0"})
    with factory() as s:
        assert [(s.get(Host, h).reserved_mem, s.get(Host, h).cluster_id) for h in (a, b)] == \
            [(1024, cluster_id), (0, cluster_id)]
        shown = clusters.cluster_to_dict(s, s.get(Cluster, cluster_id))
        assert shown["template"] == {"RESERVED_MEM": "1024", "TIER": "gold"}
        assert [h["id"] for h in shown["hosts"]] == [a, b]
    with factory() as s, s.begin():
        clusters.update_cluster(s, cluster_id, {"RESERVED_MEM": "2048"})
    with factory() as s, s.begin():
        assert s.get(Host, a).reserved_mem == 2048
        # leaving the cluster drops its reservation
        clusters.del_host(s, cluster_id, a)
        assert (s.get(Host, a).reserved_mem, s.get(Host, a).cluster_id) == (0, None)


def test_cluster_errors_name_the_problem(factory):
    host_id = make_host(factory)
    name = unique("cl")
    with factory() as s, s.begin():
        cluster_id = clusters.create_cluster(s, name).id
    with factory() as s:
        with pytest.raises(AlreadyExists, match=f"cluster '{name}' already exists"):
            clusters.create_cluster(s, name)
        with pytest.raises(InvalidArgument, match="name: a cluster needs a non-empty name"):
            clusters.create_cluster(s, "  ")
        with pytest.raises(NotFound, match="cluster 999999 does not exist"):
            clusters.add_host(s, 999999, host_id)
        with pytest.raises(NotFound, match="host 999999 does not exist"):
            clusters.add_host(s, cluster_id, 999999)
        with pytest.raises(FailedPrecondition, match="is not in cluster"):
            clusters.del_host(s, cluster_id, host_id)
    with factory() as s, s.begin():
        clusters.add_host(s, cluster_id, host_id)
    with factory() as s:
        with pytest.raises(FailedPrecondition, match="still has hosts"):
            clusters.delete_cluster(s, cluster_id)
    with factory() as s, s.begin():
        clusters.del_host(s, cluster_id, host_id)
        assert clusters.delete_cluster(s, cluster_id)["name"] == name
    with factory() as s:
        assert s.get(Cluster, cluster_id) is None


def group_roles(host_id):
    return [{"name": "db", "policy": "ANTI_AFFINED", "host_affined": [host_id]},
            {"name": "web"}, {"name": "cache", "host_anti_affined": str(host_id)}]


def test_a_vm_group_is_stored_and_vms_join_it_by_name_and_role(factory, admin_id):
    host_id = make_host(factory)
    name = unique("grp")
    with factory() as s, s.begin():
        group = clusters.create_vmgroup(
            s, admin_id, name, group_roles(host_id),
            [{"policy": "AFFINED", "roles": ["web", "cache"]},
             {"policy": "anti_affined", "roles": "db,web"}])
        group_id = group.id
        vm = logic.allocate(s, admin_id, "member", 1, 1, 256,
                            {"VMGROUP": {"VMGROUP_NAME": name, "ROLE": "web"}})
        vm_id = vm.id
    with factory() as s, s.begin():
        shown = clusters.vmgroup_to_dict(s, s.get(VmGroup, group_id))
        assert shown["roles"] == [
            {"name": "db", "policy": "ANTI_AFFINED", "host_affined": [host_id],
             "host_anti_affined": [], "vms": []},
            {"name": "web", "policy": "NONE", "host_affined": [], "host_anti_affined": [],
             "vms": [vm_id]},
            {"name": "cache", "policy": "NONE", "host_affined": [],
             "host_anti_affined": [host_id], "vms": []}]
        assert shown["rules"] == [{"policy": "AFFINED", "roles": ["web", "cache"]},
                                  {"policy": "ANTI_AFFINED", "roles": ["db", "web"]}]
        with pytest.raises(FailedPrecondition, match=f"VM group {name} still has VMs"):
            clusters.delete_vmgroup(s, group_id)
    with factory() as s, s.begin():
        logic.vm_action(s, vm_id, "terminate")
        assert clusters.delete_vmgroup(s, group_id)["name"] == name


@pytest.mark.parametrize("roles, rules, message", [
    ([], None, "roles: a VM group needs at least one role"),
    ([{"name": "a"}, {"name": "a"}], None, "roles: role a is given twice"),
    ([{"name": "a b"}], None, "a role name is letters"),
    ([{"name": "a", "policy": "CLOSE"}], None, "role a: policy must be one of"),
    ([{"name": "a", "host_affined": [999999]}], None,
     "role a: host_affined names host 999999, which does not exist"),
    ([{"name": "a", "host_affined": "x"}], None, "role a: host_affined must list host ids"),
    ([{"name": "a", "colour": "red"}], None, "unknown role key 'colour'"),
    ([{"name": "a"}, {"name": "b"}], [{"policy": "AFFINED", "roles": ["a", "c"]}],
     "AFFINED names role 'c', which the group does not have"),
    ([{"name": "a"}], [{"policy": "AFFINED", "roles": ["a"]}],
     "AFFINED needs at least two different roles"),
    ([{"name": "a"}, {"name": "b"}], [{"policy": "NEAR", "roles": ["a", "b"]}],
     "rules: policy must be AFFINED or ANTI_AFFINED"),
    ([{"name": "a"}, {"name": "b"}], [{"policy": "AFFINED", "roles": ["a", "b"]},
                                      {"policy": "ANTI_AFFINED", "roles": ["b", "a"]}],
     "roles a and b cannot be both AFFINED and ANTI_AFFINED"),
    ([{"name": "a", "policy": "ANTI_AFFINED"}, {"name": "b"}],
     [{"policy": "AFFINED", "roles": ["a", "b"]}],
     "role a is ANTI_AFFINED .* cannot be in an AFFINED rule"),
])
def test_bad_vm_groups_are_refused_and_nothing_is_written(factory, admin_id, roles, rules,
                                                          message):
    name = unique("bad")
    with pytest.raises(InvalidArgument, match=message):
        with factory() as s, s.begin():
            clusters.create_vmgroup(s, admin_id, name, roles, rules)
    with factory() as s:
        assert s.scalar(select(VmGroup).where(VmGroup.name == name)) is None


def test_a_vm_host_affined_and_anti_affined_to_one_host_is_refused(factory, admin_id):
    host_id = make_host(factory)
    with pytest.raises(InvalidArgument, match=f"host {host_id} is both in host_affined"):
        with factory() as s:
            clusters.create_vmgroup(s, admin_id, unique("g"), [
                {"name": "a", "host_affined": [host_id], "host_anti_affined": [host_id]}])


@pytest.mark.parametrize("vmgroup, error, message", [
    ({"VMGROUP_NAME": "no-such-group", "ROLE": "web"}, NotFound,
     "VMGROUP: VM group 'no-such-group' does not exist"),
    ({"ROLE": "web"}, InvalidArgument, "give VMGROUP_NAME"),
    ({"VMGROUP_NAME": "GROUP", "ROLE": "nope"}, InvalidArgument, "has no role 'nope'"),
])
def test_joining_a_missing_group_or_role_is_refused_and_no_vm_is_made(
        factory, admin_id, vmgroup, error, message):
    name = unique("join")
    with factory() as s, s.begin():
        clusters.create_vmgroup(s, admin_id, name, [{"name": "web"}])
    vmgroup = {k: (name if v == "GROUP" else v) for k, v in vmgroup.items()}
    vm_name = unique("joiner")
    with pytest.raises(error, match=message):
        with factory() as s, s.begin():
            logic.allocate(s, admin_id, vm_name, 1, 1, 256, {"VMGROUP": vmgroup})
    with factory() as s:
        assert vm_name not in [v["name"] for v in logic.list_vms(s, include_done=True)]


@pytest.mark.parametrize("template, message", [
    ({"SCHED_REQUIREMENTS": 'SSD = "yes" &'}, "SCHED_REQUIREMENTS: "),
    ({"SCHED_RANK": "FREE_CPU +* 2"}, "SCHED_RANK: "),
    ({"SCHED_REQUIREMENTS": "ZONE = $NO_SUCH_VARIABLE"}, "SCHED_REQUIREMENTS: "),
    ({"CLUSTER_ID": "one"}, "CLUSTER_ID: must be a cluster id or ids"),
])
def test_a_bad_placement_rule_is_refused_when_the_vm_is_created(factory, admin_id, template,
                                                                message):
    name = unique("rules")
    with pytest.raises(InvalidArgument, match=message) as caught:
        with factory() as s, s.begin():
            logic.allocate(s, admin_id, name, 1, 1, 256, template)
    assert type(caught.value) is InvalidArgument
    with factory() as s:
        assert name not in [v["name"] for v in logic.list_vms(s, include_done=True)]
    with factory() as s, s.begin():
        good = logic.allocate(s, admin_id, name, 1, 1, 256, {
            "SCHED_REQUIREMENTS": 'SSD = "yes" | CLUSTER_ID = 3', "SCHED_RANK": "-RUNNING_VMS",
            "CLUSTER_ID": "3, 4"})
        assert good.state == "PENDING"


def test_deploy_many_reserves_per_host_all_or_one_by_one_and_answers_each_vm(factory,
                                                                            admin_id):
    roomy, tight = make_host(factory, cpu=400), make_host(factory, cpu=250)
    with factory() as s, s.begin():
        vms = [logic.allocate(s, admin_id, unique("many"), 1, 1, 256, {}).id for _ in range(5)]
        held = logic.allocate(s, admin_id, unique("held"), 1, 1, 256, {}, hold=True).id
    placements = [[vms[0], roomy], [vms[1], tight], [vms[2], roomy], [vms[3], tight],
                  [vms[4], tight], [held, roomy], [999999, roomy]]
    with factory() as s, s.begin():
        answers = logic.deploy_many(s, placements)
    assert [(a["vm_id"], a["outcome"]) for a in answers] == [
        (vms[0], "deployed"), (vms[1], "deployed"), (vms[2], "deployed"),
        (vms[3], "deployed"), (vms[4], "host_unfit"), (held, "deployed"),
        (999999, "vm_not_pending")]
    assert "it has 50% and" in answers[4]["reason"]
    assert answers[6]["reason"] == "VM 999999 does not exist"
    with factory() as s:
        # three one-CPU VMs on the roomy host (the held one too: deploy takes HOLD VMs),
        # two on the tight one, and each placed VM went PENDING -> PROLOG with its command
        assert [(s.get(Host, h).cpu_usage, s.get(Host, h).running_vms)
                for h in (roomy, tight)] == [(300, 3), (200, 2)]
        for vm_id in (vms[0], vms[1], held):
            shown = logic.get_vm(s, vm_id)
            assert shown["status"] == "PROLOG" and shown["history"][-1]["action"] == "deploy"
        assert logic.get_vm(s, vms[4])["status"] == "PENDING"
        commands = outbox_commands(s)
        assert {c["vm_id"] for c in commands if c["action"] == "clone"} >= \
            {vms[0], vms[1], vms[2], vms[3], held}
        assert vms[4] not in {c["vm_id"] for c in commands}
