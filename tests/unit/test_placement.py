"""Placement as pure functions: policies, requirements, capacity, limits and VM groups."""
import pytest

from cirrus.expressions import compile_rank
from services.scheduler.placement import (Group, HostView, Planner, VmRequest, host_view,
                                          policy_name, rises_with_use)


def host(id, cpu=400, mem=4096, vms=0, cpu_usage=0, mem_usage=0, **attributes):
    return HostView(id, f"h{id}", max_cpu=cpu, max_mem=mem, cpu_usage=cpu_usage,
                    mem_usage=mem_usage, running_vms=vms, attributes=dict(attributes))


def vm(id, cpu=100, mem=512, **template):
    return VmRequest(id, cpu, mem, {k.upper(): str(v) for k, v in template.items()})


def placed(planner, vms, max_dispatch=0):
    """{vm id: host id, or the reason it waits}."""
    out = {}
    for members, chosen, reason in planner.plan(vms, max_dispatch):
        for member in members:
            out[member.id] = chosen.id if chosen else reason
    return out


# ---------------------------------------------------------------- policies

@pytest.mark.parametrize("policy, expected", [
    ("packing", 2), ("0", 2),             # most VMs
    ("striping", 1), ("1", 1),            # fewest VMs
    ("load-aware", 3), ("2", 3),          # most measured free CPU
    ("fixed", 1), ("4", 1),               # highest PRIORITY
    ("custom", 1),                        # no default rank: all 0, lowest id wins
])
def test_each_policy_picks_its_host(policy, expected):
    hosts = [host(1, vms=1, FREE_CPU=100, PRIORITY="9"), host(2, vms=3, FREE_CPU=50),
             host(3, vms=2, FREE_CPU=390, PRIORITY="x")]
    assert placed(Planner(hosts, policy), [vm(1)]) == {1: expected}


def test_custom_policy_uses_the_configured_rank_and_a_vm_rank_overrides_any_policy():
    hosts = [host(1, SPEED="1"), host(2, SPEED="3"), host(3, SPEED="2")]
    assert placed(Planner(hosts, "custom", default_rank="SPEED"), [vm(1)]) == {1: 2}
    assert placed(Planner(hosts, "packing"), [vm(1, sched_rank="-SPEED")]) == {1: 1}


def test_packing_fills_a_host_before_the_next_and_striping_spreads():
    vms = [vm(i, cpu=100) for i in range(1, 7)]
    assert placed(Planner([host(1, cpu=300), host(2, cpu=300)], "packing"), vms) == \
        {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 2}
    assert placed(Planner([host(1, cpu=300), host(2, cpu=300)], "striping"), vms) == \
        {1: 1, 2: 2, 3: 1, 4: 2, 5: 1, 6: 2}


def test_an_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown policy 'fastest'; choose from packing"):
        policy_name("fastest")


# ---------------------------------------------------------------- requirements and attributes

def test_requirements_filter_hosts_on_template_and_computed_attributes():
    hosts = [host(1, SSD="no"), host(2, SSD="yes", vms=1), host(3, SSD="yes", cpu=800)]
    assert placed(Planner(hosts), [vm(1, sched_requirements='SSD = "yes" & MAX_CPU > 400')]) \
        == {1: 3}
    assert placed(Planner(hosts), [vm(2, sched_requirements='NAME = "h*" & !(ID = 3)',
                                      sched_rank="RUNNING_VMS")]) == {2: 2}


def test_a_vm_template_variable_is_substituted():
    hosts = [host(1, ZONE="a"), host(2, ZONE="b")]
    assert placed(Planner(hosts), [vm(1, zone_wanted="b",
                                      sched_requirements="ZONE = $ZONE_WANTED")]) == {1: 2}


def test_host_view_merges_monitoring_cluster_and_host_templates_and_subtracts_reserved():
    view = host_view({"id": 7, "name": "n7", "cluster_id": 2, "max_cpu": 800, "max_mem": 8192,
                      "reserved_cpu": 200, "reserved_mem": -1024, "cpu_usage": 100,
                      "mem_usage": 512, "running_vms": 1,
                      "template": {"TIER": "gold", "PRIORITY": "3"},
                      "monitoring": {"HYPERVISOR": "kvm", "USEDCPU": 40, "FREECPU": 760,
                                     "USEDMEMORY": 2048 * 1024, "FREEMEMORY": 6144 * 1024,
                                     "TIER": "monitored", "VMS": []}},
                     cluster_template={"TIER": "silver", "RACK": "r1"})
    a = view.attributes
    assert {k: a[k] for k in ("NAME", "ID", "CLUSTER_ID", "HYPERVISOR", "MAX_CPU", "CPU_USAGE",
                              "FREE_CPU", "USED_CPU", "MAX_MEM", "MEM_USAGE", "FREE_MEM",
                              "USED_MEM", "RUNNING_VMS", "TIER", "RACK", "PRIORITY")} == {
        "NAME": "n7", "ID": 7, "CLUSTER_ID": 2, "HYPERVISOR": "kvm", "MAX_CPU": 600,
        "CPU_USAGE": 100, "FREE_CPU": 760, "USED_CPU": 40, "MAX_MEM": 9216, "MEM_USAGE": 512,
        "FREE_MEM": 6144, "USED_MEM": 2048, "RUNNING_VMS": 1, "TIER": "gold", "RACK": "r1",
        "PRIORITY": "3"}
    assert "VMS" not in a
    # the room left is MAX - RESERVED - USAGE, and a reservation updates the attributes
    assert (view.room_cpu, view.room_mem) == (500, 8704)
    view.reserve(100, 512)
    assert (a["CPU_USAGE"], a["MEM_USAGE"], a["RUNNING_VMS"]) == (200, 1024, 2)


def test_reserved_capacity_shrinks_or_overcommits_a_host():
    row = {"id": 1, "name": "n1", "max_cpu": 400, "max_mem": 4096, "cpu_usage": 0,
           "mem_usage": 0, "running_vms": 0}
    assert placed(Planner([host_view({**row, "reserved_cpu": 200})]), [vm(1, cpu=400)]) == \
        {1: "Not enough CPU capacity: 400/200"}
    assert placed(Planner([host_view({**row, "reserved_cpu": -400})]), [vm(1, cpu=800)]) == \
        {1: 1}


def test_the_cluster_id_of_a_vm_template_is_an_automatic_requirement():
    hosts = [host(1, CLUSTER_ID=5, vms=9), host(2, CLUSTER_ID=6), host(3, CLUSTER_ID=7)]
    assert placed(Planner(hosts), [vm(1, cluster_id="6,7")]) == {1: 2}
    assert placed(Planner(hosts), [vm(2, cluster_id="8")]) == \
        {2: "No host matches the requirements"}


# ---------------------------------------------------------------- reasons

def test_reasons_when_nothing_fits():
    assert placed(Planner([]), [vm(1)]) == {1: "No host is enabled and monitored"}
    assert placed(Planner([host(1, cpu=200)]), [vm(1, cpu=400)]) == \
        {1: "Not enough CPU capacity: 400/200"}
    assert placed(Planner([host(1, mem=1024)]), [vm(1, mem=8192)]) == \
        {1: "Not enough memory: 8192/1024 MB"}
    assert placed(Planner([host(1, cpu=400, mem=512), host(2, cpu=100, mem=4096)]),
                  [vm(1, cpu=200, mem=1024)]) == {1: "No host has both 200% CPU and 1024 MB free"}
    assert placed(Planner([host(1, SSD="no")]), [vm(1, sched_requirements='SSD = "yes"')]) == \
        {1: "No host matches the requirements"}


def test_capacity_reason_counts_only_hosts_that_match_the_requirements():
    hosts = [host(1, cpu=800, SSD="no"), host(2, cpu=200, SSD="yes")]
    assert placed(Planner(hosts), [vm(1, cpu=400, sched_requirements='SSD = "yes"')]) == \
        {1: "Not enough CPU capacity: 400/200"}


def test_a_bad_expression_stored_before_validation_waits_with_the_error():
    out = placed(Planner([host(1)]), [vm(1, sched_requirements="CPU >")])
    assert out[1].startswith("SCHED_REQUIREMENTS:")


# ---------------------------------------------------------------- order and limits

def test_user_priority_first_then_first_come_first_served():
    vms = [vm(1, cpu=200), vm(2, cpu=200, user_priority=5), vm(3, cpu=200)]
    assert placed(Planner([host(1, cpu=400)]), vms) == \
        {2: 1, 1: 1, 3: "Not enough CPU capacity: 200/0"}


def test_a_pass_never_overfills_a_host_from_its_own_view():
    assert placed(Planner([host(1, cpu=150)]), [vm(1), vm(2)]) == \
        {1: 1, 2: "Not enough CPU capacity: 100/50"}


def test_max_host_and_max_dispatch_limit_a_pass():
    vms = [vm(i) for i in range(1, 6)]
    assert placed(Planner([host(1), host(2)], max_host=2), vms) == {
        1: 1, 2: 1, 3: 2, 4: 2, 5: "Every host that fits got MAX_HOST VMs in this pass"}
    assert placed(Planner([host(1)]), vms, max_dispatch=3) == {1: 1, 2: 1, 3: 1}


def test_a_host_lifecycle_refused_is_dropped_for_the_rest_of_the_pass():
    planner = Planner([host(1, vms=5), host(2)])
    assert planner.choose(vm(1)).id == 1
    planner.forget(planner.hosts[1])
    assert planner.choose(vm(2)).id == 2


@pytest.mark.parametrize("policy", ["packing", "striping"])
def test_a_share_lifecycle_gave_back_is_room_again_in_the_same_pass(policy):
    """A VM that waits for its devices (lifecycle answered vm_waits) no longer
    counts on its host: the room goes to the next VMs, even for a kind of VM
    that had found no host left."""
    planner = Planner([host(1, cpu=200, mem=1024), host(2, cpu=100, mem=512)], policy)
    steps = planner.plan([vm(i) for i in range(1, 6)])
    chosen = [next(steps)[1] for _ in range(3)]
    assert sum(h.running_vms for h in planner.hosts.values()) == 3
    members, none, reason = next(steps)
    assert none is None and reason == "Not enough CPU capacity: 100/0"
    planner.release(vm(1), chosen[0])
    left = sum(c is chosen[0] for c in chosen) - 1
    assert (chosen[0].cpu_usage, chosen[0].running_vms) == (100 * left, left)
    members, again, reason = next(steps)
    assert (members[0].id, again, reason) == (5, chosen[0], None)
    for h in planner.hosts.values():
        assert h.cpu_usage <= h.max_cpu and h.mem_usage <= h.max_mem


def test_a_vm_to_move_goes_to_a_better_host_only():
    moving = VmRequest(1, 100, 512, current_host=1)
    # packing: its host has 2 VMs besides it, host 3 has 3: better
    hosts = [host(1, vms=3, cpu_usage=100, mem_usage=512), host(2, vms=1), host(3, vms=3)]
    assert placed(Planner(hosts), [moving]) == {1: 3}
    # host 3 with 2 VMs only ties: the VM stays
    hosts = [host(1, vms=3, cpu_usage=100, mem_usage=512), host(2, vms=1), host(3, vms=2)]
    assert placed(Planner(hosts), [moving]) == \
        {1: "No host ranks higher than its current host h1"}
    # a host that no longer meets the VM's requirements is left for any that does
    strict = VmRequest(1, 100, 512, {"SCHED_REQUIREMENTS": 'SSD = "yes"'}, current_host=1)
    hosts = [host(1, vms=5, SSD="no"), host(2, vms=1, SSD="yes")]
    assert placed(Planner(hosts), [strict]) == {1: 2}
    # its host gone from the view (disabled by a flush, failed): the best other host
    assert placed(Planner([host(2, vms=1), host(3, vms=2)]), [moving]) == {1: 3}
    assert placed(Planner([host(1)]), [moving]) == {1: "No other host is enabled and monitored"}
    assert placed(Planner([host(1), host(2, cpu=100)]), [VmRequest(1, 400, 512,
                                                                   current_host=1)]) == \
        {1: "Not enough CPU capacity: 400/100"}


# ---------------------------------------------------------------- VM groups

def group(roles, rules=(), placed_on=()):
    spec = [{"name": r, "policy": "NONE", "host_affined": [], "host_anti_affined": [],
             **extra} for r, extra in roles.items()]
    return Group.from_dict({"id": 1, "name": "g", "roles": spec, "rules": list(rules)},
                           placed_on)


def member(id, role, cpu=100, mem=512):
    return VmRequest(id, cpu, mem, {}, group=1, role=role)


def test_anti_affined_roles_and_an_anti_affined_role_never_share_a_host():
    g = group({"db": {"policy": "ANTI_AFFINED"}, "web": {}},
              [{"policy": "ANTI_AFFINED", "roles": ["db", "web"]}])
    hosts = [host(i) for i in range(1, 5)]
    out = placed(Planner(hosts, groups={1: g}),
                 [member(1, "db"), member(2, "db"), member(3, "web"), member(4, "web")])
    assert out == {1: 1, 2: 2, 3: 3, 4: 3}
    out = placed(Planner(hosts[:2], groups={1: g}), [member(1, "db"), member(2, "db"),
                                                     member(3, "web")])
    assert out[3] == "No host matches the requirements and the rules of VM group g (role web)"


def test_host_affinity_and_anti_affinity_per_role():
    g = group({"a": {"host_affined": [2, 3]}, "b": {"host_anti_affined": [1]}})
    hosts = [host(1, vms=9), host(2), host(3, vms=1)]
    assert placed(Planner(hosts, groups={1: g}), [member(1, "a"), member(2, "b")]) == \
        {1: 3, 2: 3}


def test_an_anti_affined_role_avoids_hosts_its_running_vms_are_on():
    g = group({"db": {"policy": "ANTI_AFFINED"}}, placed_on=[("db", 1)])
    assert placed(Planner([host(1, vms=5), host(2)], groups={1: g}), [member(1, "db")]) == \
        {1: 2}


def test_an_affined_set_goes_to_one_host_and_waits_until_one_fits_all_of_it():
    g = group({"app": {}, "db": {}}, [{"policy": "AFFINED", "roles": ["app", "db"]}])
    vms = [member(1, "app", cpu=200), member(2, "db", cpu=200), member(3, "db", cpu=100)]
    # no host has 500% free: all three wait, none is placed alone
    out = placed(Planner([host(1, cpu=400), host(2, cpu=400)], groups={1: g}), vms)
    assert out == {i: "Not enough CPU capacity for the affined set of 3 VMs of VM group g: "
                      "500/400" for i in (1, 2, 3)}
    out = placed(Planner([host(1, cpu=400), host(2, cpu=600)], groups={1: g}), vms)
    assert out == {1: 2, 2: 2, 3: 2}


def test_an_affined_vm_follows_its_role_to_the_host_it_is_on():
    g = group({"web": {"policy": "AFFINED"}}, placed_on=[("web", 2)])
    assert placed(Planner([host(1, vms=9), host(2), host(3)], groups={1: g}),
                  [member(1, "web")]) == {1: 2}


def test_an_affined_set_whose_role_must_stay_apart_waits_with_the_contradiction():
    g = group({"a": {"policy": "ANTI_AFFINED"}, "b": {}},
              [{"policy": "AFFINED", "roles": ["a", "b"]}])
    out = placed(Planner([host(1), host(2)], groups={1: g}),
                 [member(1, "a"), member(2, "a"), member(3, "b")])
    assert out == {i: "VM group g: role a must share one host with its affined roles but keep "
                      "apart from a" for i in (1, 2, 3)}


@pytest.mark.parametrize("rank, rises", [
    ("RUNNING_VMS", True), ("CPU_USAGE / 100 - FREE_CPU", True), ("PRIORITY * RUNNING_VMS", True),
    ("-RUNNING_VMS", False), ("PRIORITY * 10 - RUNNING_VMS", False), ("FREE_CPU", False),
    ("MAX_MEM - MEM_USAGE", False)])
def test_only_a_rank_that_may_rise_as_vms_are_reserved_refreshes_eagerly(rank, rises):
    assert rises_with_use(compile_rank(rank)) is rises
    planner = Planner([host(1), host(2)])
    assert planner.vm_class(VmRequest(1, 100, 512, {"SCHED_RANK": rank})).eager is rises


def test_classes_of_every_size_share_one_ranking_of_the_hosts():
    planner = Planner([host(1, vms=3), host(2, vms=1), host(3, cpu=150)])
    small, big = (planner.vm_class(VmRequest(i, cpu, 512)) for i, cpu in ((1, 100), (2, 200)))
    assert len(planner.ranked_matches) == 1
    assert [entry[1] for entry in small.heap] == [1, 2, 3]     # packing: most VMs first
    assert [entry[1] for entry in big.heap] == [1, 2]          # host 3 has no room for it
