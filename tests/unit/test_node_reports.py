"""When hosts report (the spread of many simulated hosts' reports), when a change
is big enough to report early, failures scripted per host, and what a host
report says about its network and datastore, and domains changed behind the
platform's back as libvirt would report them."""
import os
import random

import libvirt
import pytest

from services.drivers import backend, reports
from services.drivers.libvirt_backend import datastore_space, event_state, parse_net_dev
from services.drivers.reports import ReportSchedule, significant_change
from services.drivers.simulated import (CHANGES, FailureScript, SimulatedBackend,
                                       SimulatedFailure, libvirt_reason)
from services.drivers.worker import control, simulated_hosts


def run_schedule(schedule, start, end, step=0.01):
    """Play the schedule from start to end; returns [(time, host index)] reported."""
    sent, now = [], start
    while now < end:
        for index in schedule.due(now):
            schedule.done(index, now)
            sent.append((now, index))
        now += step
    return sent


def test_one_host_reports_at_once_then_every_interval():
    schedule = ReportSchedule(1, 3.0, now=100.0)
    sent = run_schedule(schedule, 100.0, 110.0)
    assert [round(t, 2) for t, _ in sent] == [100.0, 103.0, 106.0, 109.0]


def test_many_hosts_ramp_up_then_spread_evenly_over_the_interval():
    count, interval = 1000, 10.0
    schedule = ReportSchedule(count, interval, now=0.0, jitter=0.1, rng=random.Random(7))
    sent = run_schedule(schedule, 0.0, 60.0)
    first = {}
    for at, index in sent:
        first.setdefault(index, at)
    # every host reports within the ramp: count / RAMP_RATE seconds
    assert len(first) == count and max(first.values()) <= count / reports.RAMP_RATE
    # after the second round, no second of an interval holds much more than its share
    later = [at for at, _ in sent if at >= 2 * interval]
    per_second = [0] * int(60 - 2 * interval)
    for at in later:
        per_second[min(int(at - 2 * interval), len(per_second) - 1)] += 1
    share = count / interval
    assert max(per_second) <= 1.5 * share and min(per_second) >= 0.5 * share, per_second
    # and each host keeps reporting about once an interval, never further apart than the jitter
    times = sorted(at for at, index in sent if index == 42)
    gaps = [b - a for a, b in zip(times[1:], times[2:])]
    assert gaps and all(interval * 0.9 - 0.02 <= gap <= interval * 1.1 + 0.02 for gap in gaps)


def test_an_early_report_comes_at_once_but_not_twice_within_the_gap():
    schedule = ReportSchedule(2, 30.0, now=0.0)
    assert [index for _at, index in run_schedule(schedule, 0.0, 0.05)] == [0, 1]   # the ramp
    schedule.hurry(1, 0.1)
    assert schedule.due(0.1) == []                  # it reported 0.1 s ago
    assert schedule.due(0.01 + reports.URGENT_GAP) == [1]
    schedule.done(1, 0.01 + reports.URGENT_GAP)
    assert schedule.due(5.0) == []                  # and then back on its schedule
    assert schedule.wake_at() == pytest.approx(30.0 * (0.5 + 0.25))    # host 0's second


@pytest.mark.parametrize("interval, jitter", [(0, 0.1), (-1, 0.1), (5, 1.0), (5, -0.1)])
def test_a_bad_schedule_is_refused(interval, jitter):
    with pytest.raises(ValueError, match="monitor (interval|jitter)"):
        ReportSchedule(3, interval, 0.0, jitter)


def host_report(**values):
    base = {"TOTALMEMORY": 1000, "USEDMEMORY": 100, "TOTALCPU": 800, "USEDCPU": 100,
            "DS_LOCATION_TOTAL_MB": 5000, "DS_LOCATION_USED_MB": 0,
            "VMS": [{"VM_ID": 1, "STATE": "RUNNING"}]}
    return {**base, **values}


@pytest.mark.parametrize("current, changed", [
    (host_report(), False),
    (host_report(USEDMEMORY=150, USEDCPU=150), False),          # small moves wait
    (host_report(USEDMEMORY=250), True),
    (host_report(USEDCPU=250), False),                          # CPU swings by itself
    (host_report(USEDCPU=300), True),
    (host_report(DS_LOCATION_USED_MB=600), True),
    (host_report(VMS=[{"VM_ID": 1, "STATE": "POWEROFF"}]), True),
    (host_report(VMS=[]), True),
    (host_report(VMS=[{"VM_ID": 1, "STATE": "RUNNING"}, {"VM_ID": 2, "STATE": "RUNNING"}]), True),
])
def test_what_change_is_reported_at_once(current, changed):
    assert significant_change(host_report(), current) is changed
    assert significant_change(None, current)        # nothing sent yet


def test_failures_are_scripted_per_action_and_counted_down():
    script = FailureScript()
    assert script.add("deploy", 2, "no room") == "the next 2 deploys fail: no room"
    assert script.add("delete", 1) == "the next delete fails"
    assert script.take("shutdown") is None
    assert [script.take("deploy") for _ in range(3)] == ["no room", "no room", None]
    assert script.take("delete") == "simulated delete failure (scripted, 0 more to fail)"
    assert script.pending() == {}
    script.add("clone", 5)
    assert script.add("clone", 0) == "no clone fails" and script.take("clone") is None


@pytest.mark.parametrize("action, count, message, named", [
    ("explode", 1, None, "action: must be one of"),
    ("deploy", -1, None, "count: must be a whole number"),
    ("deploy", "2", None, "count: must be a whole number"),
    ("deploy", True, None, "count: must be a whole number"),
    ("deploy", 1, " ", "message: must be a non-empty string"),
])
def test_a_bad_failure_script_is_refused_and_changes_nothing(action, count, message, named):
    script = FailureScript()
    with pytest.raises(ValueError, match=named):
        script.add(action, count, message)
    assert script.pending() == {}


def test_a_simulated_host_fails_its_scripted_actions_then_recovers():
    sim = SimulatedBackend()
    assert control(sim, {"what": "fail", "action": "deploy", "count": 1}) == \
        {"done": "the next deploy fails"}
    vm = {"id": 7, "memory": 64, "cpu": 1, "template": {}}
    with pytest.raises(SimulatedFailure, match="scripted"):
        sim.deploy(vm)
    assert sim.deploy(vm) == "cirrus-7"
    with pytest.raises(ValueError, match="what: unknown control request 'explode'; expected "
                                         "one of 'fail', 'change'"):
        control(sim, {"what": "explode"})
    with pytest.raises(ValueError, match="must be an object"):
        control(sim, ["fail"])


def watched_host(*vm_ids):
    """A simulated host running ``vm_ids``, and the list its watcher hears into."""
    sim, heard = SimulatedBackend(), []
    sim.watch(lambda *event: heard.append(event))
    for vm_id in vm_ids:
        sim.deploy({"id": vm_id, "memory": 64, "cpu": 1, "template": {}})
    return sim, heard


def domain_states(sim):
    return {vm["DEPLOY_ID"]: vm["STATE"] for vm in sim.monitor()["VMS"]}


def test_a_domain_changed_behind_the_platforms_back_is_heard_as_from_libvirt():
    sim, heard = watched_host(7, 8)

    def change(state, reason=None):
        return control(sim, {"what": "change", "vm_id": 7, "state": state, "reason": reason})
    assert change("POWEROFF") == {"done": "cirrus-7 RUNNING -> POWEROFF (STOPPED/DESTROYED)"}
    assert domain_states(sim) == {"cirrus-7": "POWEROFF", "cirrus-8": "RUNNING"}
    change("RUNNING")
    change("PAUSED", "the operator paused it")
    change("RUNNING")
    assert domain_states(sim)["cirrus-7"] == "RUNNING"
    change("GONE")
    assert domain_states(sim) == {"cirrus-8": "RUNNING"}
    assert heard == [("cirrus-7", "POWEROFF", "STOPPED/DESTROYED"),
                     ("cirrus-7", "RUNNING", "STARTED/BOOTED"),
                     ("cirrus-7", "PAUSED", "the operator paused it"),
                     ("cirrus-7", "RUNNING", "RESUMED/UNPAUSED"),
                     ("cirrus-7", "GONE", "UNDEFINED/REMOVED")]


@pytest.mark.parametrize("request_, named", [
    ({"vm_id": 7, "state": "EXPLODED"}, "state: must be one of RUNNING, PAUSED, POWEROFF, GONE, "
                                        "got 'EXPLODED'"),
    ({"vm_id": 9, "state": "POWEROFF"}, "no domain cirrus-9 on this host: VM 9 is not here"),
    ({"vm_id": "7", "state": "POWEROFF"}, "vm_id: must be a VM id"),
    ({"state": "POWEROFF"}, "vm_id: must be a VM id"),
    ({"vm_id": 7, "state": "RUNNING"}, "cirrus-7 is already RUNNING"),
    ({"vm_id": 8, "state": "PAUSED"}, "cirrus-8 is POWEROFF: only a running domain can be paused"),
    ({"vm_id": 7, "state": "GONE", "reason": " "}, "reason: must be a non-empty string"),
])
def test_a_bad_change_is_refused_and_changes_nothing(request_, named):
    sim, heard = watched_host(7, 8)
    sim.change("cirrus-8", "POWEROFF")
    heard.clear()
    before = domain_states(sim)
    with pytest.raises(ValueError, match=named):
        control(sim, {"what": "change", **request_})
    assert domain_states(sim) == before and heard == []


def test_only_a_simulated_host_changes_domains_behind_the_platforms_back():
    class RealHost:
        pass
    with pytest.raises(ValueError, match="the RealHost cannot change domains behind the "
                                         "platform's back; only simulated hosts can"):
        control(RealHost(), {"what": "change", "vm_id": 7, "state": "POWEROFF"})


@pytest.mark.parametrize("before", [backend.RUNNING, backend.PAUSED, backend.POWEROFF])
@pytest.mark.parametrize("after", CHANGES)
def test_the_reason_of_a_change_is_the_libvirt_event_that_means_that_state(before, after):
    event, detail = libvirt_reason(before, after).split("/")
    assert event_state(getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}"),
                       getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}_{detail}")) == \
        (after, f"{event}/{detail}")


def test_simulated_host_names():
    assert simulated_hosts(3, "sim") == ["sim-0001", "sim-0002", "sim-0003"]
    assert simulated_hosts(10000, "s")[-1] == "s-10000"


NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1000  10    0    0    0     0          0         0 1000  10    0    0    0     0       0          0
  eth0: 500    5    0    0    0     0          0         0  300   3    0    0    0     0       0          0
  eth1: 20     1    0    0    0     0          0         0   10   1    0    0    0     0       0          0
 vnet3: 7000   9    0    0    0     0          0         0 9000   9    0    0    0     0       0          0
"""


def test_host_network_counters_leave_out_loopback_and_guest_nics():
    assert parse_net_dev(NET_DEV) == {"NETRX": 520, "NETTX": 310}
    assert parse_net_dev("") == {"NETRX": 0, "NETTX": 0}


def test_datastore_space_is_statvfs_of_its_directory_or_nearest_parent(tmp_path):
    fs = os.statvfs(tmp_path)
    space = datastore_space(str(tmp_path / "not" / "made" / "yet"))
    assert space["DS_LOCATION_TOTAL_MB"] == fs.f_blocks * fs.f_frsize // 2**20
    assert abs(space["DS_LOCATION_FREE_MB"] - fs.f_bavail * fs.f_frsize // 2**20) <= 64
    assert space["DS_LOCATION_USED_MB"] + space["DS_LOCATION_FREE_MB"] == \
        space["DS_LOCATION_TOTAL_MB"]
