"""Monitoring by events, host failure and HA, VM metrics and accounting.

lifecycle runs as a process on the real broker and database; the test plays
the nodes: it answers driver commands, sends each host's periodic report from
a heartbeat thread, and publishes hypervisor events (vm.event) and sync
reports itself. A few rules are also checked on the functions directly, where
"ignored" must be seen at once rather than as nothing happening.
"""
import threading
from datetime import timedelta

import pytest
from nameko.exceptions import RemoteError
from sqlalchemy import event, insert, select, update

from cirrus import db, messages
from cirrus.db.models import Host, User, VirtualMachine, utcnow
from services.lifecycle import logic, monitoring
from tests.broker import FakeNodeTransport, rpc_proxy
from tests.procs import start_services, wait_until

HOST_TIMEOUT = 4
METRICS_SAMPLES = 3
CAPACITY = {"TOTALCPU": 800, "TOTALMEMORY": 8 * 1024 * 1024, "HYPERVISOR": "test"}


def report(host, vms=(), sync=False):
    return {"host": host, "at": utcnow().isoformat(), "sync": sync,
            "monitoring": {**CAPACITY, "VMS": list(vms)}}


def domain(vm, state, cpu=1.0):
    return {"DEPLOY_ID": f"cirrus-{vm['id']}", "VM_ID": vm["id"], "STATE": state, "CPU": cpu,
            "MEMORY": 262144, "NETRX": 1, "NETTX": 2, "DISKRDBYTES": 3, "DISKWRBYTES": 4}


class Heartbeat(threading.Thread):
    """Sends a plain (not sync, no domains) report for each host it beats for,
    twice a second, as a live driver worker would."""

    def __init__(self, amqp_uri):
        super().__init__(daemon=True)
        self.transport = FakeNodeTransport(amqp_uri, "mon-heartbeat")
        self.hosts = set()
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.5):
            for host in list(self.hosts):
                self.transport.publish(messages.HOST_MONITOR, report(host))


@pytest.fixture(scope="module")
def lifecycle(cirrus_env, tmp_path_factory):
    env = {**cirrus_env, "CIRRUS_LIFECYCLE_HOST_TIMEOUT": str(HOST_TIMEOUT),
           "CIRRUS_LIFECYCLE_METRICS_SAMPLES": str(METRICS_SAMPLES)}
    [proc] = start_services(["lifecycle"], env, tmp_path_factory.mktemp("lcmon"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def heartbeat(lifecycle, amqp_uri):
    beat = Heartbeat(amqp_uri)
    beat.start()
    yield beat
    beat.stopping.set()
    beat.join()


@pytest.fixture
def rpc(lifecycle, amqp_uri):
    with rpc_proxy(amqp_uri, "lifecycle") as proxy:
        yield proxy


class Node:
    """One host played by the test: its command queue and its events."""

    def __init__(self, rpc, amqp_uri, heartbeat, name, ha="none"):
        self.rpc, self.name, self.heartbeat = rpc, name, heartbeat
        self.transport = FakeNodeTransport(amqp_uri, name)
        self.host = rpc.create_host(name, ha)
        self.id = self.host["id"]
        self.transport.publish(messages.HOST_MONITOR, report(name))
        heartbeat.hosts.add(name)
        self.wait_host("MONITORED")

    def wait_host(self, state):
        return wait_for(lambda: self.rpc.get_host(self.id), lambda h: h["state"] == state,
                        f"host {self.name} {state}")

    def publish(self, event_type, payload):
        self.transport.publish(event_type, payload)

    def answer(self, action, info=None):
        cmd = self.transport.next_command()
        assert cmd["action"] == action, cmd
        self.publish(messages.COMMAND_RESULT, messages.result(cmd, True, info))
        return cmd

    def running_vm(self, name, owner_id=1):
        vm = self.rpc.allocate(owner_id, name, 1.0, 1, 256, {"MEMORY": "256"})
        assert self.rpc.deploy(vm["id"], self.id)["outcome"] == "deployed"
        self.answer("clone")
        self.answer("deploy", {"deploy_id": f"cirrus-{vm['id']}"})
        return wait_status(self.rpc, vm, "RUNNING")

    def vm_event(self, vm, state, at=None, reason=None):
        self.publish(messages.VM_EVENT, {
            "host": self.name, "vm_id": vm["id"], "deploy_id": f"cirrus-{vm['id']}",
            "state": state, "reason": reason, "at": (at or utcnow()).isoformat()})


def wait_for(get, check, what):
    """The first value of get() that passes check."""
    return wait_until(lambda: (lambda value: value if check(value) else None)(get()), what=what)


def wait_status(rpc, vm, status):
    return wait_for(lambda: rpc.get_vm(vm["id"]), lambda v: v["status"] == status,
                    f"VM {vm['id']} {status}")


@pytest.fixture
def node(rpc, amqp_uri, heartbeat, request):
    return Node(rpc, amqp_uri, heartbeat, f"mon-{request.node.name}"[:60])


def db_vm(vm_id):
    with db.session_factory()() as s:
        return s.get(VirtualMachine, vm_id)


def actions(rpc, vm):
    return [h["action"] for h in rpc.get_vm(vm["id"])["history"]]


# ---------------------------------------------------------------- vm.event

def test_a_domain_stopped_outside_cirrus_makes_the_vm_poweroff_and_back_running(rpc, node):
    vm = node.running_vm("ev-off")
    node.vm_event(vm, "POWEROFF", reason="DESTROYED")
    shown = wait_status(rpc, vm, "POWEROFF")
    last = shown["history"][-1]
    assert (last["action"], last["from"], last["to"]) == ("monitor_poweroff", "RUNNING", "POWEROFF")
    assert "DESTROYED" in last["message"]
    node.vm_event(vm, "RUNNING")
    wait_status(rpc, vm, "RUNNING")
    node.vm_event(vm, "PAUSED")
    wait_status(rpc, vm, "SUSPENDED")


def test_an_old_event_is_ignored(rpc, node):
    vm = node.running_vm("ev-old")
    before = db_vm(vm["id"]).updated_at - timedelta(seconds=5)
    node.vm_event(vm, "POWEROFF", at=before)
    # a fresh event after it: had the old one applied, PAUSED would not be allowed from POWEROFF
    node.vm_event(vm, "PAUSED")
    wait_status(rpc, vm, "SUSPENDED")
    assert "monitor_poweroff" not in actions(rpc, vm)


def test_an_event_for_a_vm_with_a_command_in_flight_is_ignored(rpc, node):
    busy, probe = node.running_vm("ev-busy"), node.running_vm("ev-probe")
    with db.session_factory()() as s, s.begin():
        s.execute(update(VirtualMachine).where(VirtualMachine.id == busy["id"])
                  .values(command_id="in-flight"))
    node.vm_event(busy, "POWEROFF")
    node.vm_event(probe, "POWEROFF")
    wait_status(rpc, probe, "POWEROFF")
    assert rpc.get_vm(busy["id"])["status"] == "RUNNING"


def test_the_rules_that_ignore_a_monitoring_event(cirrus_env, node, rpc):
    """Checked on the function: each case must be ignored now, not later."""
    vm = node.running_vm("ev-rules")
    factory = db.session_factory()
    base = {"host": node.name, "vm_id": vm["id"], "state": "POWEROFF"}
    with factory() as s:
        now = utcnow().isoformat()
        assert monitoring.handle_vm_event(s, {**base, "host": "another-host", "at": now}) is None
        assert monitoring.handle_vm_event(s, {**base, "state": "RUNNING", "at": now}) is None
        assert monitoring.handle_vm_event(s, {**base, "state": "NOSTATE", "at": now}) is None
        old = (db_vm(vm["id"]).updated_at - timedelta(seconds=1)).isoformat()
        assert monitoring.handle_vm_event(s, {**base, "at": old}) is None
        s.get(VirtualMachine, vm["id"]).command_id = "x"
        assert monitoring.handle_vm_event(s, {**base, "at": now}) is None
        s.rollback()
    with factory() as s, s.begin():
        moved = monitoring.handle_vm_event(s, {**base, "at": utcnow().isoformat()})
        assert logic.vm_status(moved) == "POWEROFF"


# ---------------------------------------------------------------- sync reports

def test_a_sync_report_reconciles_the_vms_with_the_domains(rpc, node):
    gone, paused, back = (node.running_vm(f"sync-{n}") for n in ("gone", "paused", "back"))
    node.vm_event(back, "POWEROFF")
    wait_status(rpc, back, "POWEROFF")
    node.publish(messages.HOST_MONITOR, report(node.name, sync=True, vms=[
        domain(paused, "PAUSED"), domain(back, "RUNNING")]))
    wait_status(rpc, gone, "POWEROFF")
    wait_status(rpc, paused, "SUSPENDED")
    wait_status(rpc, back, "RUNNING")
    assert "missing from" in rpc.get_vm(gone["id"])["history"][-1]["message"]

    # a suspended VM has no domain (it is saved): missing is normal for it, as for a POWEROFF one
    node.publish(messages.HOST_MONITOR, report(node.name, sync=True, vms=[
        domain(back, "RUNNING", cpu=42.0)]))
    wait_until(lambda: db_vm(back["id"]).monitoring.get("CPU") == 42.0, what="the report stored")
    assert rpc.get_vm(paused["id"])["status"] == "SUSPENDED"
    assert rpc.get_vm(gone["id"])["status"] == "POWEROFF"


def test_a_plain_report_only_stores_metrics(rpc, node):
    vm = node.running_vm("plain")
    node.publish(messages.HOST_MONITOR, report(node.name, vms=[domain(vm, "POWEROFF", cpu=7.0)]))
    wait_until(lambda: db_vm(vm["id"]).monitoring.get("CPU") == 7.0, what="metrics")
    assert rpc.get_vm(vm["id"])["status"] == "RUNNING"


# ---------------------------------------------------------------- metrics

def test_metrics_keep_the_latest_values_and_a_capped_series(rpc, node, amqp_uri, heartbeat):
    vm = node.running_vm("metrics")
    other = Node(rpc, amqp_uri, heartbeat, "mon-metrics-other")
    elsewhere = other.running_vm("metrics-elsewhere")
    for cpu in (10.0, 20.0, 30.0, 40.0, 50.0):
        node.publish(messages.HOST_MONITOR, report(node.name, vms=[
            domain(vm, "RUNNING", cpu), domain(elsewhere, "RUNNING", cpu),
            {"DEPLOY_ID": "not-ours", "VM_ID": None, "STATE": "RUNNING"}]))
        wait_until(lambda: db_vm(vm["id"]).monitoring.get("CPU") == cpu, what=f"CPU {cpu}")
    shown = rpc.get_vm(vm["id"])
    assert [p["CPU"] for p in shown["metrics"]] == [30.0, 40.0, 50.0]
    assert set(shown["metrics"][-1]) == {"at", "CPU", "MEMORY", "NETRX", "NETTX",
                                         "DISKRDBYTES", "DISKWRBYTES"}
    latest = db_vm(vm["id"])
    assert latest.monitoring["MEMORY"] == 262144 and latest.monitoring["STATE"] == "RUNNING"
    assert latest.monitored_at is not None
    assert db_vm(elsewhere["id"]).metrics == [], "only the VM's own host writes its metrics"


def test_a_report_for_many_vms_stores_their_metrics_in_one_statement(cirrus_env, node):
    factory = db.session_factory()
    with factory() as s, s.begin():
        ids = s.scalars(insert(VirtualMachine).returning(VirtualMachine.id), [
            {"name": f"bulk-{i}", "owner_id": 1, "state": "ACTIVE", "lcm_state": "RUNNING",
             "seq": 1, "cpu": 0.1, "vcpu": 1, "memory": 64, "template": {}, "host_id": node.id}
            for i in range(500)]).all()
    statements = []
    engine = factory.kw["bind"]
    listener = lambda conn, cursor, stmt, *a: statements.append(stmt)   # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with factory() as s, s.begin():
            monitoring.handle_monitor(s, report(node.name, vms=[
                domain({"id": i}, "RUNNING", cpu=float(i % 100)) for i in ids]), keep=2)
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert len([st for st in statements if "UPDATE vms" in st]) == 1
    with factory() as s:
        stored = dict(s.execute(select(VirtualMachine.id, VirtualMachine.monitoring)
                                .where(VirtualMachine.id.in_(ids))).all())
        assert all(stored[i]["CPU"] == float(i % 100) for i in ids)
        s.execute(update(VirtualMachine).where(VirtualMachine.id.in_(ids)).values(state="DONE"))
        s.commit()


# ---------------------------------------------------------------- host failure

def test_a_silent_host_goes_error_with_its_vms_unknown_and_reconciles_when_back(rpc, node):
    running, off = node.running_vm("fail-run"), node.running_vm("fail-off")
    node.vm_event(off, "POWEROFF")
    wait_status(rpc, off, "POWEROFF")
    node.heartbeat.hosts.discard(node.name)
    host = node.wait_host("ERROR")
    assert "no monitoring report" in host["monitoring"]["ERROR"]
    wait_status(rpc, running, "UNKNOWN")
    assert rpc.get_vm(off["id"])["status"] == "POWEROFF"

    # back: the first report after reconnecting is a sync one
    node.publish(messages.HOST_MONITOR, report(node.name, sync=True, vms=[
        domain(running, "RUNNING")]))
    host = node.wait_host("MONITORED")
    assert "ERROR" not in host["monitoring"]
    node.heartbeat.hosts.add(node.name)
    wait_status(rpc, running, "RUNNING")
    assert actions(rpc, running)[-2:] == ["monitor_unknown", "monitor_running"]
    assert rpc.get_vm(off["id"])["status"] == "POWEROFF"


def test_of_several_lifecycle_instances_one_fails_a_silent_host(cirrus_env, rpc):
    """Two sessions stand for two instances' timers running at the same moment."""
    host = rpc.create_host("mon-two-timers")
    factory = db.session_factory()
    with factory() as first, factory() as second:
        old = utcnow() - timedelta(seconds=10 * HOST_TIMEOUT)
        first.execute(update(Host).where(Host.id == host["id"])
                      .values(state="MONITORED", last_monitored_at=old))
        assert "mon-two-timers" in monitoring.detect_failed_hosts(first, HOST_TIMEOUT)
        assert "mon-two-timers" not in monitoring.detect_failed_hosts(second, HOST_TIMEOUT)
        second.commit()
        first.commit()
        assert "mon-two-timers" not in monitoring.detect_failed_hosts(second, HOST_TIMEOUT)
        second.commit()
    assert rpc.get_host(host["id"])["state"] == "ERROR"


def test_a_disabled_host_that_goes_silent_stays_disabled(rpc, node):
    vm = node.running_vm("dis-run")
    rpc.disable_host(node.id)
    node.heartbeat.hosts.discard(node.name)
    wait_status(rpc, vm, "UNKNOWN")
    assert rpc.get_host(node.id)["state"] == "DISABLED"
    node.publish(messages.HOST_MONITOR, report(node.name, sync=True, vms=[domain(vm, "RUNNING")]))
    node.heartbeat.hosts.add(node.name)
    wait_status(rpc, vm, "RUNNING")
    host = rpc.get_host(node.id)
    assert host["state"] == "DISABLED" and "ERROR" not in host["monitoring"]


def test_a_failed_host_with_ha_reschedule_recreates_its_vms(rpc, amqp_uri, heartbeat):
    node = Node(rpc, amqp_uri, heartbeat, "mon-ha", ha="reschedule")
    assert node.host["ha"] == "reschedule"
    vm = node.running_vm("ha-vm")
    heartbeat.hosts.discard(node.name)
    node.wait_host("ERROR")
    shown = wait_status(rpc, vm, "PENDING")
    assert shown["host_id"] is None
    assert rpc.get_host(node.id)["cpu_usage"] == 0
    assert "monitor_unknown" in actions(rpc, vm)


# ---------------------------------------------------------------- host commands

def test_ha_policy_is_checked_and_can_be_changed(rpc, node):
    assert rpc.set_host_ha(node.id, "reschedule")["ha"] == "reschedule"
    assert rpc.get_host(node.id)["ha"] == "reschedule"
    for call in (lambda: rpc.set_host_ha(node.id, "sometimes"),
                 lambda: rpc.create_host("mon-bad-ha", "sometimes")):
        with pytest.raises(RemoteError) as err:
            call()
        assert err.value.exc_type == "InvalidArgument" and "ha:" in err.value.value
    assert "mon-bad-ha" not in [h["name"] for h in rpc.list_hosts()]


def test_offline_is_refused_while_vms_are_on_the_host(rpc, node):
    vm = node.running_vm("offline-vm")
    with pytest.raises(RemoteError) as err:
        rpc.offline_host(node.id)
    assert err.value.exc_type == "FailedPrecondition" and f"VM {vm['id']}" in err.value.value
    assert rpc.get_host(node.id)["state"] == "MONITORED"


def test_an_offline_host_is_not_monitored_nor_failed_until_enabled(cirrus_env, rpc, node):
    assert rpc.offline_host(node.id)["state"] == "OFFLINE"
    factory = db.session_factory()
    with factory() as s, s.begin():
        old = utcnow() - timedelta(seconds=10 * HOST_TIMEOUT)
        s.execute(update(Host).where(Host.id == node.id).values(last_monitored_at=old))
        assert monitoring.handle_monitor(s, report(node.name)) is False
        assert node.name not in monitoring.detect_failed_hosts(s, HOST_TIMEOUT)
        host = s.get(Host, node.id)
        assert (host.state, host.last_monitored_at) == ("OFFLINE", old)
    assert rpc.enable_host(node.id)["state"] == "INIT"
    node.wait_host("MONITORED")


def test_flush_disables_the_host_and_reschedules_its_running_vms(rpc, node):
    vms = [node.running_vm(f"flush-{i}") for i in range(2)]
    assert rpc.flush_host(node.id)["state"] == "DISABLED"
    assert all(db_vm(vm["id"]).resched for vm in vms)


# ---------------------------------------------------------------- accounting

def test_accounting_sums_the_stays_per_vm_and_per_user(rpc, node):
    with db.session_factory()() as s, s.begin():
        user = User(name="acct-user", password_hash="-")
        s.add(user)
        s.flush()
        user_id = user.id
    vm = node.running_vm("acct", owner_id=user_id)
    rpc.vm_action(vm["id"], "terminate", {"hard": True})
    node.answer("cancel")
    node.answer("delete")
    wait_status(rpc, vm, "DONE")

    [stay] = rpc.get_vm(vm["id"])["stays"]
    assert (stay["host"], stay["reason"]) == (node.name, "terminate_hard")
    assert stay["end"] is not None and stay["running_seconds"] > 0

    out = rpc.accounting(user_id)
    [line] = out["vms"]
    assert (line["id"], line["owner"], line["owner_id"]) == (vm["id"], "acct-user", user_id)
    assert line["hours"] > 0
    assert line["cpu_hours"] == pytest.approx(1.0 * line["hours"])
    assert line["memory_gb_hours"] == pytest.approx(0.25 * line["hours"])
    assert out["users"] == [{"owner": "acct-user", "owner_id": user_id, "vms": 1,
                             "cpu_hours": line["cpu_hours"],
                             "memory_gb_hours": line["memory_gb_hours"]}]

    before = (utcnow() - timedelta(days=1)).isoformat()
    assert rpc.accounting(user_id, None, before)["vms"] == []
    with pytest.raises(RemoteError) as err:
        rpc.accounting(user_id, "last tuesday")
    assert err.value.exc_type == "InvalidArgument" and "start" in err.value.value


# ---------------------------------------------------------------- host reports

def test_a_hosts_whole_report_is_stored_and_shown(rpc, amqp_uri, request):
    """What a node measures (capacity, datastore, network counters) is kept as sent."""
    from services.drivers.simulated import SimulatedBackend
    name = f"mon-report-{request.node.name}"[:60]
    host = rpc.create_host(name, "none")
    sim = SimulatedBackend(cores=4, memory_mb=2048, datastore_mb=5000)
    sim.deploy({"id": 10**8 + host["id"], "memory": 256, "cpu": 1, "template": {}})
    mon = sim.monitor()
    FakeNodeTransport(amqp_uri, name).publish(
        messages.HOST_MONITOR, {"host": name, "at": utcnow().isoformat(), "sync": False,
                                "monitoring": mon})
    shown = wait_for(lambda: rpc.get_host(host["id"]), lambda h: h["state"] == "MONITORED",
                     f"host {name} MONITORED")
    assert shown["monitoring"] == mon
    assert (shown["max_cpu"], shown["max_mem"]) == (400, 2048)
    for key in ("DS_LOCATION_TOTAL_MB", "DS_LOCATION_USED_MB", "DS_LOCATION_FREE_MB", "NETRX",
                "NETTX", "USEDCPU", "USEDMEMORY", "CPUSPEED"):
        assert isinstance(shown["monitoring"][key], int), key
    rpc.offline_host(host["id"])        # stop the failure timer minding it
