"""lifecycle's bulk paths (allocate_many, deploy_many, handle_results) against the real
PostgreSQL: they reserve atomically, never over-commit, and write each
transition exactly as apply does."""
import re
import threading
import uuid

import eventlet
import pytest
from sqlalchemy import func, select

from cirrus import messages, tracing
from cirrus.db.models import Host, Outbox, VirtualMachine, VmHistory
from cirrus.errors import InvalidArgument
from services.lifecycle import logic, monitoring
from services.lifecycle.service import Batches
from tests.vm_devices import admin_id, command_sent, factory  # noqa: F401 (fixtures)


def make_host(factory, cpu=400, mem=4096):
    name = f"bulk-{uuid.uuid4().hex[:8]}"
    with factory() as s, s.begin():
        h = logic.create_host(s, name)
        monitoring.handle_monitor(s, {"host": name, "monitoring": {
            "TOTALCPU": cpu, "TOTALMEMORY": mem * 1024, "URI": f"qemu+tcp://{name}/system"}})
        return h.id


def make_vms(factory, admin_id, n, template=None, name="bulk"):
    with factory() as s, s.begin():
        return [logic.allocate(s, admin_id, f"{name}{i}", 1, 1, 1024, dict(template or {})).id
                for i in range(n)]


def usage(s, host_id):
    return tuple(s.execute(select(Host.cpu_usage, Host.mem_usage, Host.running_vms)
                           .where(Host.id == host_id)).one())


def in_flight(s, vm_id):
    command_id = s.scalar(select(VirtualMachine.command_id).where(VirtualMachine.id == vm_id))
    return command_sent(s, command_id)


def written(s, vm_id):
    """What the transitions of a VM wrote, with what differs between two VMs
    by nature (ids, names, times, command ids) taken out."""
    vm = s.get(VirtualMachine, vm_id, populate_existing=True)
    history = [(h.seq, h.action, h.from_status, h.to_status, h.host_id, h.message)
               for h in s.scalars(select(VmHistory).where(VmHistory.vm_id == vm_id)
                                  .order_by(VmHistory.seq))]
    sent = []
    for row in s.scalars(select(Outbox).order_by(Outbox.id)):
        if row.exchange == messages.COMMANDS.name:
            for payload in messages.commands_in(row.payload):
                if payload["vm_id"] == vm_id:
                    spec = payload["args"]["vm"]
                    sent.append(("command", row.routing_key, payload["action"],
                                 sorted(payload["args"]), spec["runtime"], spec["deploy_id"],
                                 sorted(spec), spec["disks"], spec["nics"]))
        elif row.routing_key.startswith(messages.VM_STATE + "."):
            sent.extend(("event", row.routing_key, payload["key"].replace(str(vm_id), "ID"),
                         payload["status"], payload["seq"], payload["host"],
                         payload["host_id"], payload["error"], payload["freed"],
                         sorted(set(payload) - {tracing.KEY}))    # in a message of several
                        for payload in messages.events_in(row.payload)
                        if payload["id"] == vm_id)
    return (vm.state, vm.lcm_state, vm.seq, vm.host_id, vm.deploy_id, vm.runtime, vm.error,
            vm.command_id is not None), history, sent


def test_the_bulk_path_writes_each_transition_as_apply_does(factory, admin_id):
    host = make_host(factory)
    one, bulk = make_vms(factory, admin_id, 2, {"CONTEXT": {"ROLE": "web"}})
    with factory() as s, s.begin():
        assert logic.deploy(s, one, host)["outcome"] == "deployed"
    with factory() as s, s.begin():
        assert logic.deploy_many(s, [[bulk, host]])[0]["outcome"] == "deployed"
    # clone succeeds reporting where the VM's files are, deploy fails
    for success, info, error in ((True, {"vm_dir": "/d"}, None), (False, {}, "no room")):
        with factory() as s, s.begin():
            logic.handle_result(s, messages.result(in_flight(s, one), success, info, error))
        with factory() as s, s.begin():
            result = messages.result(in_flight(s, bulk), success, info, error)
            assert logic.handle_results(s, [result]) == 1
    with factory() as s:
        single, batched = written(s, one), written(s, bulk)
        assert batched == single
        assert [h[3] for h in single[1]] == ["PENDING", "PROLOG", "BOOT", "BOOT_FAILURE"]
        assert single[0][:3] == ("ACTIVE", "BOOT_FAILURE", 4)
        assert usage(s, host) == (200, 2048, 2)


def test_a_repeated_result_in_a_batch_moves_the_vm_once(factory, admin_id):
    host = make_host(factory)
    [vm_id] = make_vms(factory, admin_id, 1)
    with factory() as s, s.begin():
        logic.deploy_many(s, [[vm_id, host]])
    with factory() as s, s.begin():
        result = messages.result(in_flight(s, vm_id), True, {"vm_dir": "/d"})
        assert logic.handle_results(s, [result, dict(result), dict(result)]) == 1
    with factory() as s:
        assert s.get(VirtualMachine, vm_id).lcm_state == "BOOT"
        assert s.scalar(select(func.count()).select_from(VmHistory)
                        .where(VmHistory.vm_id == vm_id)) == 3


def test_a_batch_bigger_than_its_host_fills_it_and_no_more(factory, admin_id):
    """Six one-CPU VMs for a host with room for four: the share does not fit
    whole, so the VMs are reserved one by one, in id order."""
    host = make_host(factory)
    ids = make_vms(factory, admin_id, 6)
    with factory() as s, s.begin():
        answers = logic.deploy_many(s, [[vm_id, host] for vm_id in ids])
    assert [a["vm_id"] for a in answers] == ids
    assert [a["outcome"] for a in answers] == ["deployed"] * 4 + ["host_unfit"] * 2
    assert "lacks capacity" in answers[-1]["reason"]
    with factory() as s:
        assert usage(s, host) == (400, 4096, 4)
        assert [s.get(VirtualMachine, v).state for v in ids] == ["ACTIVE"] * 4 + ["PENDING"] * 2


def test_concurrent_batches_never_over_commit(factory, admin_id):
    """Three batches (three schedulers) race for two hosts with room for four
    VMs each, every batch asking for six on each: exactly eight VMs win."""
    hosts = [make_host(factory), make_host(factory)]
    batches = [make_vms(factory, admin_id, 12, name=f"race{b}-") for b in range(3)]
    outcomes, errors = [], []
    barrier = threading.Barrier(len(batches))

    def deploy(ids):
        try:
            with factory() as s, s.begin():
                barrier.wait()
                outcomes.extend(a["outcome"] for a in logic.deploy_many(
                    s, [[vm_id, hosts[i % 2]] for i, vm_id in enumerate(ids)]))
        except Exception as exc:   # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(ids,)) for ids in batches]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    assert sorted(outcomes) == ["deployed"] * 8 + ["host_unfit"] * 28
    with factory() as s:
        for host in hosts:
            assert usage(s, host) == (400, 4096, 4)
            assert s.scalar(select(func.count()).select_from(VirtualMachine)
                            .where(VirtualMachine.host_id == host)) == 4


def test_a_vm_already_placed_is_refused_in_a_batch(factory, admin_id):
    host = make_host(factory)
    first, second = make_vms(factory, admin_id, 2)
    with factory() as s, s.begin():
        logic.deploy_many(s, [[first, host]])
    with factory() as s, s.begin():
        answers = logic.deploy_many(s, [[first, host], [second, host], [999999, host]])
    assert [a["outcome"] for a in answers] == ["vm_not_pending", "deployed", "vm_not_pending"]
    with factory() as s:
        assert usage(s, host) == (200, 2048, 2)


@pytest.mark.parametrize("placements, named", [
    ([["x", 1]], "each must be [vm_id, host_id]"),
    ([[1]], "each must be [vm_id, host_id]"),
    ([[1, 2], [1, 3]], "VM 1 is placed twice"),
])
def test_bad_placements_are_named_and_change_nothing(factory, admin_id, placements, named):
    host = make_host(factory)
    [vm_id] = make_vms(factory, admin_id, 1)
    with factory() as s, s.begin():
        with pytest.raises(InvalidArgument, match=re.escape(named)):
            logic.deploy_many(s, [[vm_id, host], *placements])
    with factory() as s:
        assert s.get(VirtualMachine, vm_id).state == "PENDING"
        assert usage(s, host) == (0, 0, 0)


def to_epilog(factory, vm_id):
    """Answer a placed VM's driver commands until it is RUNNING, then
    terminate it and answer the shutdown: it waits in EPILOG for its delete."""
    for info in ({"vm_dir": "/d"}, {"deploy_id": f"cirrus-{vm_id}"}):
        with factory() as s, s.begin():
            logic.handle_results(s, [messages.result(in_flight(s, vm_id), True, info)])
    with factory() as s, s.begin():
        logic.vm_action(s, vm_id, "terminate")
    with factory() as s, s.begin():
        logic.handle_results(s, [messages.result(in_flight(s, vm_id), True)])
        assert s.get(VirtualMachine, vm_id).lcm_state == "EPILOG"


def test_result_batches_freeing_several_hosts_at_once_do_not_deadlock(factory, admin_id):
    """Two batches of results each free a VM on both hosts, listed in opposite
    orders, while a deploy batch reserves on both: all three commit."""
    hosts = [make_host(factory), make_host(factory)]
    ids = make_vms(factory, admin_id, 6, name="free")
    with factory() as s, s.begin():
        logic.deploy_many(s, [[vm_id, hosts[i % 2]] for i, vm_id in enumerate(ids[:4])])
    for vm_id in ids[:4]:
        to_epilog(factory, vm_id)
    with factory() as s:
        deletes = [messages.result(in_flight(s, vm_id), True) for vm_id in ids[:4]]
    errors, barrier = [], threading.Barrier(3)

    def run(work):
        try:
            with factory() as s, s.begin():
                barrier.wait()
                work(s)
        except Exception as exc:   # reported in the test's thread
            errors.append(exc)

    works = [lambda s: logic.handle_results(s, [deletes[1], deletes[0]]),     # host b, then a
             lambda s: logic.handle_results(s, [deletes[2], deletes[3]]),     # host a, then b
             lambda s: logic.deploy_many(s, [[ids[4], hosts[1]], [ids[5], hosts[0]]])]
    threads = [threading.Thread(target=run, args=(work,)) for work in works]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors
    with factory() as s:
        assert [s.get(VirtualMachine, v).state for v in ids[:4]] == ["DONE"] * 4
        for host in hosts:
            assert usage(s, host) == (100, 1024, 1)


# ---------------------------------------------------------------- creates in batches

def create(admin_id, name, **extra):
    return {"owner_id": admin_id, "name": name, "cpu": 1, "vcpu": 1, "memory": 1024,
            "template": {"CONTEXT": {"ROLE": "web"}}, "hold": False, "request_id": None,
            **extra}


def create_together(factory, creates):
    """The creates through lifecycle's Batches as concurrent RPCs make them:
    {index: described VM or the exception}, and the sizes of the batches."""
    provider, sizes, outcomes = Batches(), [], {}
    provider.setup()

    def apply_batch(items):
        eventlet.sleep(0)       # the others queue behind the first
        sizes.append(len(items))
        with factory() as s, s.begin():
            return logic.allocate_many(s, items)

    def caller(index, item):
        try:
            outcomes[index] = provider.apply(item, apply_batch)
        except Exception as exc:
            outcomes[index] = exc

    pool = eventlet.GreenPool()
    for index, item in enumerate(creates):
        pool.spawn(caller, index, item)
    pool.waitall()
    return outcomes, sizes


def test_a_bad_create_in_a_batch_fails_alone(factory, admin_id):
    creates = [create(admin_id, f"batch{i}") for i in range(6)]
    bad = f"bad-{uuid.uuid4().hex[:8]}"
    creates[3] = create(admin_id, bad, memory=0)
    outcomes, sizes = create_together(factory, creates)
    assert max(sizes) > 1
    assert isinstance(outcomes[3], InvalidArgument) and "memory" in str(outcomes[3])
    made = [outcomes[i] for i in (0, 1, 2, 4, 5)]
    assert [vm["name"] for vm in made] == ["batch0", "batch1", "batch2", "batch4", "batch5"]
    assert all(vm["status"] == "PENDING" and vm["owner"] == "admin" for vm in made)
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(VirtualMachine)
                        .where(VirtualMachine.name == bad)) == 0
        assert [logic.get_vm(s, vm["id"])["name"] for vm in made] == [vm["name"] for vm in made]


def test_one_request_id_twice_in_a_batch_makes_one_vm(factory, admin_id):
    request = uuid.uuid4().hex
    creates = [create(admin_id, "first", request_id=request), create(admin_id, "other"),
               create(admin_id, "again", request_id=request)]
    with factory() as s, s.begin():
        first, other, again = logic.allocate_many(s, creates)
    assert first == again and first["name"] == "first" and other["id"] != first["id"]
    # and a later batch finds it too
    with factory() as s, s.begin():
        [later] = logic.allocate_many(s, [create(admin_id, "later", request_id=request)])
    assert later["id"] == first["id"]
    with factory() as s:
        assert s.scalar(select(func.count()).select_from(VirtualMachine)
                        .where(VirtualMachine.request_id == request)) == 1


def test_a_batch_of_creates_writes_each_vm_as_allocate_does(factory, admin_id):
    with factory() as s, s.begin():
        lone = logic.allocate(s, admin_id, "lone", 1, 1, 1024, {"CONTEXT": {"ROLE": "web"}})
        lone_held = logic.allocate(s, admin_id, "held", 1, 1, 1024, {}, hold=True)
        described = [logic.describe(s, lone), logic.describe(s, lone_held)]
    with factory() as s, s.begin():
        batch = logic.allocate_many(s, [create(admin_id, "lone"),
                                        create(admin_id, "held", template={}, hold=True)])
    differs = ("id", "created_at", "updated_at")
    assert ([{k: v for k, v in vm.items() if k not in differs} for vm in batch]
            == [{k: v for k, v in vm.items() if k not in differs} for vm in described])
    with factory() as s:
        assert written(s, batch[0]["id"]) == written(s, lone.id)
        assert written(s, batch[1]["id"]) == written(s, lone_held.id)
        assert (s.get(VirtualMachine, batch[0]["id"]).template
                == s.get(VirtualMachine, lone.id).template)
