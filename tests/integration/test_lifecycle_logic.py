"""lifecycle's logic against the real PostgreSQL: transitions, capacity, outbox."""
import threading
import uuid

import pytest
from sqlalchemy import func, select

from cirrus import db, messages, tracing
from cirrus.db.models import Host, Outbox, User, VirtualMachine, VmHistory
from cirrus.errors import FailedPrecondition, InvalidArgument
from services.lifecycle import logic, monitoring
from tests.vm_devices import command_sent, outbox_commands


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
    """The VM's events and driver commands in the outbox, oldest first."""
    payloads = [payload for r in s.scalars(select(Outbox).order_by(Outbox.id))
                for payload in (messages.commands_in(r.payload)
                                if r.exchange == messages.COMMANDS.name else [r.payload])]
    return [p for p in payloads if p.get("vm_id", p.get("id")) == vm_id]


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
        logic.vm_action(s, vm.id, "terminate")
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
        logic.vm_action(s, vm.id, "terminate")
        assert vm.state == "DONE"
        with pytest.raises(FailedPrecondition, match="DONE.*RUNNING"):
            logic.vm_action(s, vm.id, "terminate")


def test_an_action_delivered_again_answers_as_the_first_and_another_request_is_refused(
        factory, admin_id, host):
    """RPC messages are acked late: a lifecycle killed after committing a
    terminate but before answering gets the call delivered again, under the
    same request id, to another instance."""
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, host, "replay")
        with tracing.bound("req-terminate"):
            logic.vm_action(s, vm.id, "terminate", {"hard": True})
            seq = vm.seq
            again = logic.vm_action(s, vm.id, "terminate", {"hard": True})
        assert (logic.vm_status(again), again.seq) == ("SHUTDOWN", seq)
        with tracing.bound("req-other"), pytest.raises(FailedPrecondition, match="SHUTDOWN"):
            logic.vm_action(s, vm.id, "terminate", {"hard": True})
        with pytest.raises(FailedPrecondition, match="SHUTDOWN"):
            logic.vm_action(s, vm.id, "terminate", {"hard": True})     # no request at all


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
        logic.vm_action(s, vm.id, "terminate")
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


# ------------------------------------------------------------ the full life cycle
# Each path of the contract's table, driven through logic's functions with the
# test answering for the driver, checks at every step the status, the command
# sent and the host it goes to, and the capacity both hosts hold.

VM_CPU, VM_MEM = 1, 1024


def make_host(factory, name, cpu=400, mem=4096):
    with factory() as s, s.begin():
        h = logic.create_host(s, name)
        monitoring.handle_monitor(s, {"host": name, "monitoring": {
            "TOTALCPU": cpu, "TOTALMEMORY": mem * 1024, "URI": f"qemu+tcp://{name}/system"}})
        return h.id


@pytest.fixture
def two_hosts(factory):
    tag = uuid.uuid4().hex[:8]
    return {"a": make_host(factory, f"a-{tag}"), "b": make_host(factory, f"b-{tag}")}


def in_flight(s, vm):
    """The driver command the VM waits for, as queued in the outbox."""
    if vm.command_id is None:
        return None
    return command_sent(s, vm.command_id)


def answer(s, vm, success=True, info=None, error="driver says no"):
    cmd = in_flight(s, vm)
    assert cmd is not None, f"VM {vm.id} in {logic.vm_status(vm)} waits for no command"
    return logic.handle_result(s, messages.result(cmd, success, info, None if success else error))


def usage(s, host_id):
    return tuple(s.execute(select(Host.cpu_usage, Host.mem_usage, Host.running_vms)
                           .where(Host.id == host_id)).one())


HELD, FREE = (100 * VM_CPU, VM_MEM, 1), (0, 0, 0)


def running_vm(s, admin_id, host_id, name="life"):
    vm = logic.allocate(s, admin_id, name, VM_CPU, 1, VM_MEM, {})
    assert logic.deploy(s, vm.id, host_id)["outcome"] == "deployed"
    answer(s, vm)
    answer(s, vm, info={"deploy_id": f"cirrus-{vm.id}"})
    assert logic.vm_status(vm) == "RUNNING"
    return vm


# step: an action name or (action, options) for vm_action, ("recover", op),
# "!<action>" for a monitoring action, True / False for the driver's answer.
# expect: (status, "command@host" or None, hosts holding capacity)
PATHS = {
    "terminate": ("running", [
        ("terminate", "SHUTDOWN", "shutdown@a", "a"),
        (True, "EPILOG", "delete@a", "a"),
        (True, "DONE", None, "")]),
    "terminate hard from UNKNOWN": ("running", [
        ("!monitor_unknown", "UNKNOWN", None, "a"),
        (("terminate", {"hard": True}), "SHUTDOWN", "cancel@a", "a"),
        (True, "EPILOG", "delete@a", "a"),
        (True, "DONE", None, "")]),
    "a failed shutdown returns to RUNNING": ("running", [
        ("terminate", "SHUTDOWN", "shutdown@a", "a"),
        (False, "RUNNING", None, "a")]),
    "poweroff and resume": ("running", [
        ("poweroff", "SHUTDOWN_POWEROFF", "shutdown@a", "a"),
        (True, "POWEROFF", None, "a"),
        ("resume", "BOOT_POWEROFF", "deploy@a", "a"),
        (True, "RUNNING", None, "a")]),
    "poweroff hard, then terminate": ("running", [
        (("poweroff", {"hard": True}), "SHUTDOWN_POWEROFF", "cancel@a", "a"),
        (True, "POWEROFF", None, "a"),
        ("terminate", "EPILOG", "delete@a", "a"),
        (True, "DONE", None, "")]),
    "suspend and resume": ("running", [
        ("suspend", "SAVE_SUSPEND", "save@a", "a"),
        (True, "SUSPENDED", None, "a"),
        ("resume", "BOOT_SUSPENDED", "restore@a", "a"),
        (True, "RUNNING", None, "a")]),
    "a failed resume of a suspended VM leaves it SUSPENDED": ("running", [
        ("suspend", "SAVE_SUSPEND", "save@a", "a"),
        (True, "SUSPENDED", None, "a"),
        ("resume", "BOOT_SUSPENDED", "restore@a", "a"),
        (False, "SUSPENDED", None, "a")]),
    "stop, resume elsewhere": ("running", [
        ("stop", "SAVE_STOP", "save@a", "a"),
        (True, "EPILOG_STOP", "mv@a", "a"),
        (True, "STOPPED", None, ""),
        ("resume", "PENDING", None, ""),
        (("deploy", {"host_id": "b"}), "PROLOG_RESUME", "mv@b", "b"),
        (True, "BOOT_STOPPED", "restore@b", "b"),
        (True, "RUNNING", None, "b")]),
    "terminate a stopped VM on the host it was last on": ("running", [
        ("stop", "SAVE_STOP", "save@a", "a"),
        (True, "EPILOG_STOP", "mv@a", "a"),
        (True, "STOPPED", None, ""),
        ("terminate", "EPILOG", "delete@a", "a"),
        (True, "DONE", None, "")]),
    "undeploy and resume": ("running", [
        ("undeploy", "SHUTDOWN_UNDEPLOY", "shutdown@a", "a"),
        (True, "EPILOG_UNDEPLOY", "mv@a", "a"),
        (True, "UNDEPLOYED", None, ""),
        ("resume", "PENDING", None, ""),
        (("deploy", {"host_id": "a"}), "PROLOG_UNDEPLOY", "mv@a", "a"),
        (True, "BOOT_UNDEPLOY", "deploy@a", "a"),
        (True, "RUNNING", None, "a")]),
    "undeploy a powered-off VM": ("running", [
        (("poweroff", {"hard": True}), "SHUTDOWN_POWEROFF", "cancel@a", "a"),
        (True, "POWEROFF", None, "a"),
        ("undeploy", "EPILOG_UNDEPLOY", "mv@a", "a"),
        (False, "EPILOG_UNDEPLOY_FAILURE", None, "a"),
        (("recover", "retry"), "EPILOG_UNDEPLOY", "mv@a", "a"),
        (True, "UNDEPLOYED", None, "")]),
    "cold migration": ("running", [
        (("migrate", {"host_id": "b"}), "SAVE_MIGRATE", "save@a", "ab"),
        (True, "PROLOG_MIGRATE", "mv@b", "ab"),
        (True, "BOOT_MIGRATE", "restore@b", "ab"),
        (True, "RUNNING", None, "b")]),
    "live migration": ("running", [
        (("migrate", {"host_id": "b", "live": True}), "MIGRATE", "migrate@a", "ab"),
        (True, "BOOT_MIGRATE", "restore@b", "ab"),
        (True, "RUNNING", None, "b")]),
    "a failed live migration stays on the old host": ("running", [
        (("migrate", {"host_id": "b", "live": True}), "MIGRATE", "migrate@a", "ab"),
        (False, "RUNNING", None, "a")]),
    "a failed cold migration retried": ("running", [
        (("migrate", {"host_id": "b"}), "SAVE_MIGRATE", "save@a", "ab"),
        (True, "PROLOG_MIGRATE", "mv@b", "ab"),
        (False, "PROLOG_MIGRATE_FAILURE", None, "ab"),
        (("recover", "retry"), "PROLOG_MIGRATE", "mv@b", "ab"),
        (True, "BOOT_MIGRATE", "restore@b", "ab"),
        (False, "BOOT_MIGRATE_FAILURE", None, "ab"),
        (("recover", "success"), "RUNNING", None, "b")]),
    "a failed migration terminated": ("running", [
        (("migrate", {"host_id": "b"}), "SAVE_MIGRATE", "save@a", "ab"),
        (True, "PROLOG_MIGRATE", "mv@b", "ab"),
        (False, "PROLOG_MIGRATE_FAILURE", None, "ab"),
        ("terminate", "EPILOG", "delete@a", "a"),
        (True, "DONE", None, "")]),
    "reboot and reset": ("running", [
        ("reboot", "RUNNING", "reboot@a", "a"),
        (True, "RUNNING", None, "a"),
        (("reboot", {"hard": True}), "RUNNING", "reset@a", "a"),
        (False, "RUNNING", None, "a")]),
    "resume from UNKNOWN": ("running", [
        ("!monitor_unknown", "UNKNOWN", None, "a"),
        ("resume", "BOOT_UNKNOWN", "deploy@a", "a"),
        (True, "RUNNING", None, "a")]),
    "recover a stuck shutdown by hand": ("running", [
        ("terminate", "SHUTDOWN", "shutdown@a", "a"),
        (("recover", "retry"), "SHUTDOWN", "shutdown@a", "a"),
        (("recover", "success"), "EPILOG", "delete@a", "a"),
        (("recover", "failure"), "EPILOG_FAILURE", None, "a"),
        (("recover", "delete"), "CLEANUP_DELETE", "delete@a", "a"),
        (False, "DONE", None, "")]),
    "recover recreate": ("running", [
        (("recover", "recreate"), "CLEANUP_RESUBMIT", "delete@a", "a"),
        (True, "PENDING", None, ""),
        (("deploy", {"host_id": "b"}), "PROLOG", "clone@b", "b")]),
    "prolog failure recovered": ("pending", [
        (("deploy", {"host_id": "a"}), "PROLOG", "clone@a", "a"),
        (False, "PROLOG_FAILURE", None, "a"),
        (("recover", "success"), "BOOT", "deploy@a", "a"),
        (False, "BOOT_FAILURE", None, "a"),
        (("recover", "retry"), "BOOT", "deploy@a", "a"),
        (True, "RUNNING", None, "a")]),
    "hold, release, terminate": ("pending", [
        ("hold", "HOLD", None, ""),
        ("release", "PENDING", None, ""),
        ("hold", "HOLD", None, ""),
        (("deploy", {"host_id": "a"}), "PROLOG", "clone@a", "a"),
        (("recover", "delete"), "CLEANUP_DELETE", "delete@a", "a"),
        (True, "DONE", None, "")]),
}


def take_step(s, vm, step, hosts):
    if isinstance(step, bool):
        return answer(s, vm, step)
    if isinstance(step, str) and step.startswith("!"):
        return logic.apply(s, vm, step[1:])
    action, options = (step, {}) if isinstance(step, str) else step
    if action == "recover":
        return logic.vm_action(s, vm.id, "recover", {"operation": options})
    if "host_id" in options:
        options = {**options, "host_id": hosts[options["host_id"]]}
    return logic.vm_action(s, vm.id, action, options)


@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_of_the_life_cycle(factory, admin_id, two_hosts, path):
    start, steps = PATHS[path]
    names = {}
    with factory() as s, s.begin():
        names = {s.get(Host, i).name: key for key, i in two_hosts.items()}
        vm = (running_vm(s, admin_id, two_hosts["a"]) if start == "running"
              else logic.allocate(s, admin_id, "life", VM_CPU, 1, VM_MEM, {}))
        for step, status, command, holding in steps:
            take_step(s, vm, step, two_hosts)
            where = f"after {step!r}"
            assert logic.vm_status(vm) == status, where
            cmd = in_flight(s, vm)
            assert (f"{cmd['action']}@{names[cmd['host']]}" if cmd else None) == command, where
            for key, host_id in two_hosts.items():
                assert usage(s, host_id) == (HELD if key in holding else FREE), (where, key)
        history = logic.get_vm(s, vm.id)["history"]
        assert [h["seq"] for h in history] == list(range(1, len(history) + 1))
        assert history[-1]["to"] == status


def test_migration_commands_carry_what_the_driver_reported(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        target = s.get(Host, two_hosts["b"])
        logic.vm_action(s, vm.id, "migrate", {"host_id": target.id})
        answer(s, vm, info={"checkpoint": "/ds/7/checkpoint", "vm_dir": "/ds/7"})
        mv = in_flight(s, vm)
        assert mv["host"] == target.name
        assert mv["args"]["direction"] == "in" and mv["args"]["from_dir"] == "/ds/7"
        assert mv["args"]["vm"]["runtime"]["checkpoint"] == "/ds/7/checkpoint"
        answer(s, vm, info={"vm_dir": "/ds2/7"})
        assert vm.runtime == {"checkpoint": "/ds/7/checkpoint", "vm_dir": "/ds2/7",
                              "deploy_id": f"cirrus-{vm.id}"}
        answer(s, vm, info={"deploy_id": "cirrus-moved"})
        shown = logic.describe(s, vm)
        assert (shown["host"], shown["target_host_id"], shown["deploy_id"]) == \
            (target.name, None, "cirrus-moved")
        logic.vm_action(s, vm.id, "migrate", {"host_id": two_hosts["a"], "live": True})
        cmd = in_flight(s, vm)
        assert (cmd["action"], cmd["host"]) == ("migrate", target.name)
        a = s.get(Host, two_hosts["a"])
        assert (cmd["args"]["dest_host"], cmd["args"]["dest_uri"]) == \
            (a.name, f"qemu+tcp://{a.name}/system")
        assert logic.describe(s, vm)["target_host"] == a.name


def test_resume_from_is_remembered_until_running(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        for step in ("stop", True, True, "resume"):
            take_step(s, vm, step, two_hosts)
        shown = logic.describe(s, vm)
        assert (shown["status"], shown["resume_from"], shown["host_id"]) == \
            ("PENDING", "STOPPED", None)
        # the scheduler's deploy takes the resume path too
        assert logic.deploy(s, vm.id, two_hosts["b"])["outcome"] == "deployed"
        assert logic.vm_status(vm) == "PROLOG_RESUME"
        answer(s, vm)
        answer(s, vm)
        assert (logic.vm_status(vm), vm.resume_from) == ("RUNNING", None)


def test_reboot_failure_records_the_error_and_keeps_running(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        logic.vm_action(s, vm.id, "reboot")
        answer(s, vm, False, error="guest agent not responding")
        assert logic.vm_status(vm) == "RUNNING" and vm.command_id is None
        assert "reboot failed: guest agent not responding" in vm.error


def test_resched_sets_and_clears_the_flag_and_a_migration_clears_it(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        assert logic.describe(s, logic.vm_action(s, vm.id, "resched"))["resched"] is True
        assert logic.describe(s, logic.vm_action(s, vm.id, "unresched"))["resched"] is False
        logic.vm_action(s, vm.id, "resched")
        logic.vm_action(s, vm.id, "migrate", {"host_id": two_hosts["b"], "live": True})
        assert vm.resched is False
        with pytest.raises(FailedPrecondition,
                           match=f"^VM {vm.id}: cannot poweroff a VM in MIGRATE; "
                                 "it must be in one of: RUNNING, UNKNOWN$"):
            logic.vm_action(s, vm.id, "poweroff")


def test_two_concurrent_actions_on_one_vm_one_wins(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm_id = running_vm(s, admin_id, two_hosts["a"]).id
        seq = s.get(VirtualMachine, vm_id).seq
    outcomes = {}
    barrier = threading.Barrier(2)

    def act(action):
        try:
            with factory() as s, s.begin():
                barrier.wait()
                logic.vm_action(s, vm_id, action)
            outcomes[action] = "done"
        except FailedPrecondition as exc:
            outcomes[action] = str(exc)

    threads = [threading.Thread(target=act, args=(a,)) for a in ("suspend", "poweroff")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    [winner] = [a for a, o in outcomes.items() if o == "done"]
    [loser] = [a for a in outcomes if a != winner]
    entered = {"suspend": "SAVE_SUSPEND", "poweroff": "SHUTDOWN_POWEROFF"}[winner]
    assert outcomes[loser] == (f"VM {vm_id}: cannot {loser} a VM in {entered}; "
                               "it must be in one of: RUNNING" +
                               (", UNKNOWN" if loser == "poweroff" else ""))
    with factory() as s:
        history = logic.get_vm(s, vm_id)["history"]
        assert [(h["seq"], h["action"], h["to"]) for h in history[seq:]] == \
            [(seq + 1, winner, entered)]
        commands = [c for c in outbox_commands(s) if c["vm_id"] == vm_id
                    and c["action"] in ("save", "shutdown")]
        assert len(commands) == 1
        assert usage(s, two_hosts["a"]) == HELD


@pytest.mark.parametrize("action,options,message", [
    ("explode", {}, "^action: unknown action 'explode'; choose from deploy, hold, migrate"),
    ("suspend", {"force": True}, "^options: unknown option 'force'; known options: hard, "),
    ("suspend", {"hard": True}, "^hard: does not apply to suspend; suspend takes no options"),
    ("poweroff", {"hard": "yes"}, "^hard: must be bool, got 'yes'"),
    ("migrate", {}, "^host_id: migrate needs the host to go to"),
    ("migrate", {"host_id": "b"}, "^host_id: must be int, got 'b'"),
    ("migrate", {"host_id": True}, "^host_id: must be int, got True"),
    ("deploy", {}, "^host_id: deploy needs the host"),
    ("recover", {}, "^operation: recover needs one of success, failure, retry, delete, recreate"),
    ("recover", {"operation": "undo"},
     "^operation: unknown recover operation 'undo'; choose from success"),
    ("recover", {"operation": "delete", "hard": True}, "^hard: only recover retry has a hard form"),
    ("resume", ["hard"], "^options: must be a mapping"),
])
def test_bad_actions_and_options_are_named_and_change_nothing(factory, admin_id, two_hosts,
                                                               action, options, message):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        vm_id, seq = vm.id, vm.seq
    with pytest.raises(InvalidArgument, match=message):
        with factory() as s, s.begin():
            logic.vm_action(s, vm_id, action, options)
    with factory() as s:
        assert s.get(VirtualMachine, vm_id).seq == seq
        assert usage(s, two_hosts["a"]) == HELD and usage(s, two_hosts["b"]) == FREE


def test_unset_options_are_not_options(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        logic.vm_action(s, vm.id, "suspend", {"hard": False, "live": False, "host_id": None,
                                              "operation": None})
        assert logic.vm_status(vm) == "SAVE_SUSPEND"


def test_refused_actions_name_the_current_and_needed_statuses(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        logic.vm_action(s, vm.id, "poweroff")
        answer(s, vm)
        with pytest.raises(FailedPrecondition, match=f"^VM {vm.id}: cannot suspend a VM in "
                                                     "POWEROFF; it must be in one of: RUNNING$"):
            logic.vm_action(s, vm.id, "suspend")
        with pytest.raises(FailedPrecondition, match="cannot hold a VM in POWEROFF; .*PENDING"):
            logic.vm_action(s, vm.id, "hold")
        with pytest.raises(FailedPrecondition, match="cannot recover success a VM in POWEROFF; "
                                                     "it must be in one of: .*BOOT.*SHUTDOWN"):
            logic.vm_action(s, vm.id, "recover", {"operation": "success"})
        with pytest.raises(FailedPrecondition, match="cannot retry a VM in POWEROFF"):
            logic.vm_action(s, vm.id, "recover", {"operation": "retry"})
        with pytest.raises(FailedPrecondition, match="cannot deploy a VM in POWEROFF"):
            logic.vm_action(s, vm.id, "deploy", {"host_id": two_hosts["b"]})


def test_migrate_refuses_its_own_host_and_unfit_hosts_and_reserves_nothing(factory, admin_id,
                                                                           two_hosts):
    full = make_host(factory, f"full-{uuid.uuid4().hex[:8]}", cpu=50)
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        a, vm_id = s.get(Host, two_hosts["a"]).name, vm.id
        logic.set_host_enabled(s, two_hosts["b"], False)
    cases = [(two_hosts["a"], f"^VM {vm_id} is already on host {a}; migrate it to another host$"),
             (full, f"^VM {vm_id}: host full-.* lacks capacity: the VM needs 100% CPU and "
                    "1024 MB, it has 50% and 4096 MB free$"),
             (two_hosts["b"], f"^VM {vm_id}: host b-.* is DISABLED, not MONITORED$")]
    for host_id, message in cases:
        for live in (False, True):
            with pytest.raises(FailedPrecondition, match=message):
                with factory() as s, s.begin():
                    logic.vm_action(s, vm_id, "migrate", {"host_id": host_id, "live": live})
    with factory() as s:
        vm = s.get(VirtualMachine, vm_id)
        assert (logic.vm_status(vm), vm.target_host_id) == ("RUNNING", None)
        assert [usage(s, h) for h in (two_hosts["a"], two_hosts["b"], full)] == [HELD, FREE, FREE]


def test_recreate_on_a_fenced_host_goes_straight_to_pending(factory, admin_id, two_hosts):
    with factory() as s, s.begin():
        vm = running_vm(s, admin_id, two_hosts["a"])
        s.get(Host, two_hosts["a"]).state = "ERROR"
        logic.recover(s, vm.id, "recreate")
        shown = logic.describe(s, vm)
        assert (shown["status"], shown["host_id"], shown["deploy_id"], vm.command_id) == \
            ("PENDING", None, None, None)
        assert vm.runtime == {}
        assert usage(s, two_hosts["a"]) == FREE
        assert logic.get_vm(s, vm.id)["history"][-1]["action"] == "recover_recreate_fenced"
