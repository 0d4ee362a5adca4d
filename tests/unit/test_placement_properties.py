"""Property tests: the planner's heaps and caches choose exactly what a plain
scan of every host would, so no placement over-commits a host, every placed
VM satisfies its requirements, and the chosen host has the highest rank
(the lowest id among equals)."""
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from cirrus.expressions import compile_rank, compile_requirements  # noqa: E402
from services.scheduler.placement import HostView, Planner, VmRequest  # noqa: E402

REQUIREMENTS = [None, 'SSD = "yes"', 'ZONE = "a" | ZONE = "b"', "RUNNING_VMS < 3",
                'MAX_CPU > 200 & !(ZONE = "c")', "PRIORITY > 2", "CPU_USAGE < 300"]
# ranks that rise as VMs are reserved (the classes refresh eagerly), that fall
# (their stale entries are checked when they reach the top) and that stay
RANKS = [None, "FREE_CPU", "-RUNNING_VMS", "PRIORITY * 2 - RUNNING_VMS", "MAX_MEM - MEM_USAGE",
         "RUNNING_VMS * 2 + CPU_USAGE / 100", "PRIORITY * RUNNING_VMS"]
POLICY_RANKS = {
    "packing": lambda a: a["RUNNING_VMS"],
    "striping": lambda a: -a["RUNNING_VMS"],
    "load-aware": lambda a: a["FREE_CPU"],
    "fixed": lambda a: float(a.get("PRIORITY", 0)),
    "custom": lambda a: 0.0,
}

hosts_strategy = st.lists(st.fixed_dictionaries({
    "cpu": st.sampled_from([100, 200, 400, 800]), "mem": st.sampled_from([512, 2048, 4096]),
    "vms": st.integers(0, 3), "ssd": st.sampled_from(["yes", "no"]),
    "zone": st.sampled_from("abc"), "priority": st.integers(0, 5),
    "free_cpu": st.integers(0, 800)}), min_size=0, max_size=8)

vms_strategy = st.lists(st.fixed_dictionaries({
    "cpu": st.sampled_from([50, 100, 200, 400]), "mem": st.sampled_from([256, 512, 1024]),
    "requirements": st.sampled_from(REQUIREMENTS), "rank": st.sampled_from(RANKS),
    "priority": st.integers(0, 2)}), min_size=1, max_size=30)


def make_hosts(specs):
    return [HostView(i + 1, f"h{i + 1}", s["cpu"], s["mem"], 0, 0, s["vms"], attributes={
        "SSD": s["ssd"], "ZONE": s["zone"], "PRIORITY": str(s["priority"]),
        "FREE_CPU": s["free_cpu"]}) for i, s in enumerate(specs)]


def make_vms(specs):
    vms = []
    for i, s in enumerate(specs):
        template = {"USER_PRIORITY": str(s["priority"])}
        if s["requirements"]:
            template["SCHED_REQUIREMENTS"] = s["requirements"]
        if s["rank"]:
            template["SCHED_RANK"] = s["rank"]
        vms.append(VmRequest(i + 1, s["cpu"], s["mem"], template))
    return vms


def best_by_scan(vm, hosts, policy):
    """What a plain scan chooses: the fitting, matching host of highest rank, lowest id."""
    template = vm.template
    requirement = compile_requirements(template.get("SCHED_REQUIREMENTS", ""))
    rank = (compile_rank(template["SCHED_RANK"]).evaluate if "SCHED_RANK" in template
            else POLICY_RANKS[policy])
    fitting = [h for h in hosts if h.max_cpu - h.cpu_usage >= vm.cpu
               and h.max_mem - h.mem_usage >= vm.memory and requirement.evaluate(h.attributes)]
    if not fitting:
        return None
    return min(fitting, key=lambda h: (-rank(h.attributes), h.id))


@settings(max_examples=300, deadline=None)
@given(hosts_strategy, vms_strategy, st.sampled_from(sorted(POLICY_RANKS)))
def test_the_planner_chooses_what_a_scan_of_every_host_chooses(host_specs, vm_specs, policy):
    planner = Planner(make_hosts(host_specs), policy)
    reference = {h.id: h for h in make_hosts(host_specs)}
    vms = make_vms(vm_specs)
    order = []
    for members, chosen, reason in planner.plan(vms):
        (vm,) = members
        order.append(vm)
        expected = best_by_scan(vm, list(reference.values()), policy)
        if expected is None:
            assert chosen is None and reason
            continue
        assert chosen is not None and chosen.id == expected.id, reason
        # the reference host takes the VM only if it still has the room: no over-commit
        assert expected.room_cpu >= vm.cpu and expected.room_mem >= vm.memory
        assert compile_requirements(vm.template.get("SCHED_REQUIREMENTS", "")).evaluate(
            expected.attributes)
        expected.reserve(vm.cpu, vm.memory)
    assert [v.id for v in order] == [v.id for v in sorted(vms, key=lambda v: (-v.priority,
                                                                              v.id))]
    for h in planner.hosts.values():
        assert h.cpu_usage <= h.max_cpu and h.mem_usage <= h.max_mem
        assert (h.cpu_usage, h.running_vms) == (reference[h.id].cpu_usage,
                                                reference[h.id].running_vms)


group_strategy = st.fixed_dictionaries({
    "policies": st.lists(st.sampled_from(["NONE", "AFFINED", "ANTI_AFFINED"]), min_size=3,
                         max_size=3),
    "rule": st.sampled_from([None, "AFFINED", "ANTI_AFFINED"]),
    "host_affined": st.lists(st.integers(1, 6), max_size=3),
    "host_anti_affined": st.lists(st.integers(1, 6), max_size=2),
})
members_strategy = st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([50, 100, 200])),
                            min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(hosts_strategy, group_strategy, members_strategy, st.sampled_from(sorted(POLICY_RANKS)))
def test_vm_group_rules_always_hold(host_specs, spec, member_specs, policy):
    from services.scheduler.placement import Group
    roles = [{"name": name, "policy": policy_, "host_affined": [], "host_anti_affined": []}
             for name, policy_ in zip("abc", spec["policies"])]
    roles[0]["host_affined"] = sorted(set(spec["host_affined"]))
    roles[1]["host_anti_affined"] = sorted(set(spec["host_anti_affined"]))
    rules = [{"policy": spec["rule"], "roles": ["a", "b"]}] if spec["rule"] else []
    group = Group.from_dict({"id": 1, "name": "g", "roles": roles, "rules": rules})
    planner = Planner(make_hosts(host_specs), policy, groups={1: group})
    vms = [VmRequest(i + 1, cpu, 256, {}, group=1, role=role)
           for i, (role, cpu) in enumerate(member_specs)]
    where = {}
    for members, chosen, _ in planner.plan(vms):
        for vm in members:
            where[vm.id] = chosen.id if chosen else None
    on = {vm.id: (vm.role, where[vm.id]) for vm in vms if where[vm.id] is not None}
    hosts_of = {r: [h for role, h in on.values() if role == r] for r in "abc"}
    if roles[0]["host_affined"]:
        assert set(hosts_of["a"]) <= set(roles[0]["host_affined"])
    assert not set(hosts_of["b"]) & set(roles[1]["host_anti_affined"])
    for role in roles:
        placed_hosts = hosts_of[role["name"]]
        if role["policy"] == "ANTI_AFFINED":
            assert len(placed_hosts) == len(set(placed_hosts))
        if role["policy"] == "AFFINED":
            assert len(set(placed_hosts)) <= 1
    if spec["rule"] == "ANTI_AFFINED":
        assert not set(hosts_of["a"]) & set(hosts_of["b"])
    if spec["rule"] == "AFFINED":
        assert len(set(hosts_of["a"]) | set(hosts_of["b"])) <= 1
        # an affined set is placed whole or not at all
        in_set = [vm.id for vm in vms if vm.role in "ab"]
        assert len({where[i] is None for i in in_set}) <= 1
    for h in planner.hosts.values():
        assert h.cpu_usage <= h.max_cpu and h.mem_usage <= h.max_mem
