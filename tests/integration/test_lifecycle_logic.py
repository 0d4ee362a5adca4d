"""lifecycle's logic against the real PostgreSQL: transitions, capacity, outbox."""
import threading

import pytest
from sqlalchemy import func, select

from cirrus import db
from cirrus.db.models import Host, Outbox, User, VirtualMachine, VmHistory
from cirrus.errors import FailedPrecondition, InvalidArgument
from services.lifecycle import logic, monitoring


@pytest.fixture
def factory(cirrus_env):
    return db.session_factory()


@pytest.fixture
def admin_id(factory):
    with factory() as s:
        return s.scalar(select(User.id).where(User.name == "admin"))


@pytest.fixture
def host(factory, request):
    """A monitored host with room for 4 one-CPU, 1 GB VMs."""
    with factory() as s, s.begin():
        h = logic.create_host(s, f"h-{request.node.name}"[:60])
        monitoring.handle_monitor(s, {"host": h.name, "monitoring": {
            "TOTALCPU": 400, "TOTALMEMORY": 4096 * 1024}})
        return h.id


def outbox_rows(s, vm_id):
    return [r.payload for r in s.scalars(select(Outbox).order_by(Outbox.id))
            if r.payload.get("vm_id", r.payload.get("id")) == vm_id]


def test_a_vm_walks_to_running_with_history_events_and_commands(factory, admin_id, host):
    with factory() as s, s.begin():
        vm = logic.allocate(s, admin_id, "web", 1, 1, 1024, {})
        assert logic.deploy(s, vm.id, host)["outcome"] == "deployed"
        vm_id = vm.id
    with factory() as s, s.begin():
        clone = [m for m in outbox_rows(s, vm_id) if m.get("action") == "clone"][-1]
        assert clone["args"]["vm"]["memory"] == 1024
        logic.handle_result(s, {**clone, "command_id": clone["id"], "success": True,
                                "info": {}, "error": None})
        deploy = [m for m in outbox_rows(s, vm_id) if m.get("action") == "deploy"][-1]
        logic.handle_result(s, {**deploy, "command_id": deploy["id"], "success": True,
                                "info": {"deploy_id": "cirrus-x"}, "error": None})
    with factory() as s:
        shown = logic.get_vm(s, vm_id)
        assert (shown["state"], shown["lcm_state"], shown["deploy_id"]) == \
            ("ACTIVE", "RUNNING", "cirrus-x")
        assert [h["to"] for h in shown["history"]] == ["PENDING", "PROLOG", "BOOT", "RUNNING"]
        keys = [m["key"] for m in outbox_rows(s, vm_id) if "key" in m]
        assert keys[-1] == f"VM/ACTIVE/RUNNING/{vm_id}"
        assert s.get(Host, host).cpu_usage == 100


def test_a_repeated_or_stale_result_moves_the_vm_at_most_once(factory, admin_id, host):
    with factory() as s, s.begin():
        vm = logic.allocate(s, admin_id, "once", 1, 1, 512, {})
        logic.deploy(s, vm.id, host)
        clone = [m for m in outbox_rows(s, vm.id) if m.get("action") == "clone"][-1]
        result = {**clone, "command_id": clone["id"], "success": True, "info": {}, "error": None}
        assert logic.handle_result(s, result).lcm_state == "BOOT"
        assert logic.handle_result(s, result) is None
        assert logic.handle_result(s, {**result, "command_id": "stale"}) is None
        assert s.scalar(select(func.count()).select_from(VmHistory)
                        .where(VmHistory.vm_id == vm.id)) == 3


def test_a_driver_failure_sets_the_failure_state_and_message(factory, admin_id, host):
    with factory() as s, s.begin():
        vm = logic.allocate(s, admin_id, "bad", 1, 1, 512, {})
        logic.deploy(s, vm.id, host)
        clone = [m for m in outbox_rows(s, vm.id) if m.get("action") == "clone"][-1]
        logic.handle_result(s, {**clone, "command_id": clone["id"], "success": False,
                                "info": {}, "error": "no such file /x.qcow2"})
        assert vm.lcm_state == "PROLOG_FAILURE"
        assert "no such file /x.qcow2" in vm.error
        logic.terminate(s, vm.id)
        assert vm.lcm_state == "EPILOG"


@pytest.mark.parametrize("field,kwargs", [
    ("memory", dict(memory=0)), ("memory", dict(memory=None)), ("cpu", dict(cpu=0)),
    ("cpu", dict(cpu=-1)), ("name", dict(name="  ")), ("vcpu", dict(vcpu=0)),
])
def test_bad_input_names_the_field_and_persists_nothing(factory, admin_id, field, kwargs):
    args = dict(name="x", cpu=1, vcpu=1, memory=128, template={}) | kwargs
    with factory() as s:
        before = s.scalar(select(func.count()).select_from(VirtualMachine))
    with pytest.raises(InvalidArgument, match=f"^{field}"):
        with factory() as s, s.begin():
            logic.allocate(s, admin_id, **args)
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(VirtualMachine)) == before


def test_terminating_a_done_vm_is_refused_with_the_states_it_needs(factory, admin_id):
    with factory() as s, s.begin():
        vm = logic.allocate(s, admin_id, "gone", 1, 1, 128, {})
        logic.terminate(s, vm.id)
        assert vm.state == "DONE"
        with pytest.raises(FailedPrecondition, match="DONE.*RUNNING"):
            logic.terminate(s, vm.id)


def test_concurrent_deploys_never_overcommit_a_host(factory, admin_id, host):
    """Eight VMs race for a host with room for four: exactly four win."""
    with factory() as s, s.begin():
        ids = [logic.allocate(s, admin_id, f"race{i}", 1, 1, 1024, {}).id for i in range(8)]
    outcomes = []
    barrier = threading.Barrier(len(ids))

    def race(vm_id):
        with factory() as s, s.begin():
            barrier.wait()
            outcomes.append(logic.deploy(s, vm_id, host)["outcome"])

    threads = [threading.Thread(target=race, args=(i,)) for i in ids]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes) == ["deployed"] * 4 + ["host_unfit"] * 4
    with factory() as s:
        h = s.get(Host, host)
        assert (h.cpu_usage, h.mem_usage, h.running_vms) == (400, 4096, 4)


def test_leaving_the_host_releases_capacity(factory, admin_id, host):
    with factory() as s, s.begin():
        vm = logic.allocate(s, admin_id, "brief", 2, 1, 2048, {})
        logic.deploy(s, vm.id, host)
        assert s.get(Host, host).cpu_usage == 200
        clone = [m for m in outbox_rows(s, vm.id) if m.get("action") == "clone"][-1]
        logic.handle_result(s, {**clone, "command_id": clone["id"], "success": False,
                                "info": {}, "error": "boom"})
        logic.terminate(s, vm.id)
        delete = [m for m in outbox_rows(s, vm.id) if m.get("action") == "delete"][-1]
        logic.handle_result(s, {**delete, "command_id": delete["id"], "success": True,
                                "info": {}, "error": None})
        assert vm.state == "DONE"
        h = s.get(Host, host)
        assert (h.cpu_usage, h.mem_usage, h.running_vms) == (0, 0, 0)


def test_a_repeated_create_request_makes_one_vm(factory, admin_id):
    with factory() as s, s.begin():
        first = logic.allocate(s, admin_id, "idem", 1, 1, 64, {}, request_id="req-42")
    with factory() as s, s.begin():
        again = logic.allocate(s, admin_id, "idem", 1, 1, 64, {}, request_id="req-42")
        assert again.id == first.id
        assert s.scalar(select(func.count()).select_from(VirtualMachine)
                        .where(VirtualMachine.request_id == "req-42")) == 1
