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
RANKS = [None, "FREE_CPU", "-RUNNING_VMS", "PRIORITY * 2 - RUNNING_VMS", "MAX_MEM - MEM_USAGE"]
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
