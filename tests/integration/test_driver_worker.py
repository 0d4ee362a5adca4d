"""The node worker as a process, on the real broker and libvirt's test:///default.

Commands go to the node's durable queue; results and monitoring come back as
Nameko events, read here through an exclusive queue bound to the node events
exchange."""
import signal
import subprocess
import time
import uuid

from cirrus import messages
from tests.node_worker import (a_vm, bus, node, now_iso, run_ok, start_node,  # noqa: F401
                               vm_states)


def test_first_monitoring_report_comes_at_start(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    start_node(host)
    report = bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host,
                          timeout=10)
    mon = report["monitoring"]
    assert mon["HYPERVISOR"] == "test"
    assert mon["TOTALCPU"] == 1600 and mon["TOTALMEMORY"] == 3 * 1024 * 1024
    assert mon["FREEMEMORY"] + mon["USEDMEMORY"] == mon["TOTALMEMORY"]
    assert mon["VMS"] == []      # the test driver's own "test" domain is not listed
    # and again every monitor_interval (1 s in the tests)
    bus.monitor_after(host, report["at"], timeout=5)


def test_deploy_poll_shutdown_delete(node, bus):
    vm = a_vm(OS={"KERNEL": "/boot/vmlinuz"})

    def run(action):
        cmd = bus.send(node.host, messages.command(action, vm["id"], node.host, vm=vm))
        result = bus.result(cmd)
        assert result["success"], result
        assert (result["action"], result["vm_id"], result["host"]) == (action, vm["id"], node.host)
        return result["info"]

    assert run("clone")["disks"] == []
    assert run("deploy") == {"deploy_id": f"cirrus-{vm['id']}"}
    vm["deploy_id"] = f"cirrus-{vm['id']}"
    assert run("poll")["STATE"] == "RUNNING"
    assert vm_states(bus.monitor_after(node.host, now_iso()))[vm["id"]] == "RUNNING"
    run("shutdown")
    assert run("poll")["STATE"] == "POWEROFF"
    run("delete")
    assert run("poll") == {"STATE": "GONE"}
    assert vm["id"] not in vm_states(bus.monitor_after(node.host, now_iso()))


def test_a_duplicate_deploy_is_harmless(node, bus):
    vm = a_vm()
    cmd = messages.command("deploy", vm["id"], node.host, vm=vm)
    bus.send(node.host, cmd)
    bus.send(node.host, cmd)
    bus.wait_for(lambda k, b: len(bus.results_of(cmd)) == 2)
    first, second = bus.results_of(cmd)
    assert first["success"] and second["success"]
    assert first["info"] == second["info"] == {"deploy_id": f"cirrus-{vm['id']}"}
    report = bus.monitor_after(node.host, now_iso())
    assert [v["VM_ID"] for v in report["monitoring"]["VMS"]].count(vm["id"]) == 1


def test_bad_commands_get_a_failure_naming_the_problem(node, bus):
    vm = a_vm()
    unknown = bus.send(node.host, {**messages.command("deploy", vm["id"], node.host, vm=vm),
                                   "action": "explode"})
    result = bus.result(unknown)
    assert not result["success"] and "unknown action 'explode'" in result["error"]

    no_vm = bus.send(node.host, {"id": "c-1", "action": "deploy", "vm_id": 1, "host": node.host,
                                 "args": {}})
    assert "args.vm" in bus.result(no_vm)["error"]

    bus.send(node.host, b"{not json", serializer=None, content_type="application/json",
             content_encoding="utf-8")
    garbled = bus.wait_for(lambda k, b: k == messages.COMMAND_RESULT and b["command_id"] is None)
    assert not garbled["success"] and "not a JSON object" in garbled["error"]

    # a bad command in a message of several fails alone; an empty message is dropped
    bus.send(node.host, {"commands": []})
    good = messages.command("poll", vm["id"], node.host, vm=vm)
    bus.send(node.host, {"commands": [{"id": "c-2", "action": "poll", "vm_id": 2}, good]})
    assert "args.vm" in bus.wait_for(lambda k, b: k == messages.COMMAND_RESULT
                                     and b["command_id"] == "c-2")["error"]
    assert bus.result(good)["success"]
    assert "a message with no commands" in node.output()

    # and the worker is still serving
    ok = bus.send(node.host, messages.command("poll", vm["id"], node.host, vm=vm))
    assert bus.result(ok)["success"]


def test_driver_failures_carry_their_message(node, bus):
    missing = a_vm(DISK={"SOURCE": "/nonexistent/cirrus/base.img"})
    clone = bus.send(node.host, messages.command("clone", missing["id"], node.host, vm=missing))
    result = bus.result(clone)
    assert not result["success"]
    assert "/nonexistent/cirrus/base.img" in result["error"]

    refused = a_vm(OS={"ARCH": "bogus"})
    deploy = bus.send(node.host, messages.command("deploy", refused["id"], node.host, vm=refused))
    result = bus.result(deploy)
    assert not result["success"]
    assert "Unknown architecture bogus" in result["error"]


def test_a_command_sent_while_the_worker_is_down_runs_when_it_starts(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    vm = a_vm()
    cmd = bus.send(host, messages.command("deploy", vm["id"], host, vm=vm))
    time.sleep(0.5)
    assert bus.results_of(cmd) == []
    start_node(host)
    assert bus.result(cmd)["info"] == {"deploy_id": f"cirrus-{vm['id']}"}


def test_a_command_the_worker_dies_on_is_redelivered(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    first = start_node(host, "--backend", "simulated", "--sim-delay", "3")
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    vm = a_vm()
    cmd = bus.send(host, messages.command("deploy", vm["id"], host, vm=vm))
    time.sleep(1)               # the command is running...
    first.stop(signal.SIGKILL)  # ...when the worker dies
    assert bus.results_of(cmd) == []
    second = start_node(host, "--backend", "simulated")
    result = bus.result(cmd)
    assert result["success"] and result["info"] == {"deploy_id": f"cirrus-{vm['id']}"}
    assert "redelivered command " + cmd["id"] in second.output()


def test_sigterm_stops_it_cleanly(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    node = start_node(host)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    assert node.stop(signal.SIGTERM) == 0
    assert "stopped" in node.output()


def broker_connections(name):
    """rabbitmqctl's ids of the connections a client opened under ``name``."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
                            capture_output=True, text=True, check=True).stdout
    pids = [line.split()[0] for line in listed.splitlines() if name in line]
    assert pids, f"no broker connection named {name}"
    return pids


def close_broker_connections(pids):
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: broker went away"],
                       check=True, capture_output=True)


def test_it_reconnects_when_the_broker_drops_it(node, bus):
    close_broker_connections(broker_connections(f"cirrus-node:{node.host}"))
    vm = a_vm()
    cmd = bus.send(node.host, messages.command("deploy", vm["id"], node.host, vm=vm))
    assert bus.result(cmd, timeout=20)["success"]
    assert "reconnecting" in node.output()


def test_a_command_running_when_the_broker_drops_it_is_answered(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    node = start_node(host, "--backend", "simulated", "--sim-delay", "3")
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    connections = broker_connections(f"cirrus-node:{host}")
    vm = a_vm()
    cmd = bus.send(host, messages.command("deploy", vm["id"], host, vm=vm))
    time.sleep(0.3)
    close_broker_connections(connections)   # while the command runs
    assert bus.results_of(cmd) == []
    # answered once when it finishes, and again when its delivery, unacked on
    # the lost channel, comes back: lifecycle keeps only the first
    assert bus.result(cmd, timeout=20)["success"]
    bus.wait_for(lambda k, b: len(bus.results_of(cmd)) == 2, timeout=20)
    assert "redelivered command " + cmd["id"] in node.output()


def test_the_life_cycle_actions_answer_and_repeat_harmlessly(node, bus):
    vm = {**a_vm(), "runtime": {}}
    assert run_ok(bus, node.host, vm, "deploy") == {"deploy_id": f"cirrus-{vm['id']}"}
    vm["deploy_id"] = f"cirrus-{vm['id']}"
    run_ok(bus, node.host, vm, "reboot")
    run_ok(bus, node.host, vm, "reset")
    # suspend: save, then resume: restore (lifecycle merges each info into the runtime)
    saved = run_ok(bus, node.host, vm, "save")
    assert saved["checkpoint"].endswith(f"/{vm['id']}/checkpoint")
    assert run_ok(bus, node.host, vm, "save") == saved
    vm["runtime"].update(saved)
    assert run_ok(bus, node.host, vm, "restore") == {"deploy_id": vm["deploy_id"]}
    assert run_ok(bus, node.host, vm, "restore") == {"deploy_id": vm["deploy_id"]}
    # stop: save, park the files; resume: files back, restore
    vm["runtime"].update(run_ok(bus, node.host, vm, "save"))
    parked = run_ok(bus, node.host, vm, "mv", direction="out")
    assert run_ok(bus, node.host, vm, "mv", direction="out") == parked
    back = run_ok(bus, node.host, vm, "mv", direction="in", from_dir=parked["vm_dir"])
    assert back["vm_dir"] == saved["vm_dir"]
    assert run_ok(bus, node.host, vm, "mv", direction="in", from_dir=parked["vm_dir"]) == back
    run_ok(bus, node.host, vm, "restore")
    assert run_ok(bus, node.host, vm, "poll")["STATE"] == "RUNNING"
    # live migration on test:///default leaves a checkpoint for the target's restore
    moved = run_ok(bus, node.host, vm, "migrate", dest_host="node-2", dest_uri="test:///default")
    assert moved["checkpoint"] == saved["checkpoint"]
    assert run_ok(bus, node.host, vm, "poll") == {"STATE": "GONE"}
    run_ok(bus, node.host, vm, "delete")


def test_new_actions_fail_clearly(node, bus):
    vm = a_vm()
    reboot = bus.send(node.host, messages.command("reboot", vm["id"], node.host, vm=vm))
    result = bus.result(reboot)
    assert not result["success"]
    assert result["error"] == (f"cannot reboot cirrus-{vm['id']}: no such domain on "
                               f"test:///default")
    mv = bus.send(node.host, messages.command("mv", vm["id"], node.host, vm=vm, direction="up"))
    assert "args.direction: mv needs one of out, in, got 'up'" in bus.result(mv)["error"]


def test_domain_changes_are_published_as_vm_events(node, bus):
    vm = a_vm()
    run_ok(bus, node.host, vm, "deploy")
    vm["deploy_id"] = f"cirrus-{vm['id']}"
    run_ok(bus, node.host, vm, "cancel")
    stopped = bus.wait_for(lambda k, b: k == messages.VM_EVENT and b["vm_id"] == vm["id"]
                           and b["state"] == "POWEROFF")
    assert stopped == {"host": node.host, "vm_id": vm["id"], "deploy_id": vm["deploy_id"],
                       "state": "POWEROFF", "reason": "STOPPED/DESTROYED", "at": stopped["at"],
                       "request_id": stopped["request_id"]}
    started = [b for k, b in bus.received if k == messages.VM_EVENT and b["vm_id"] == vm["id"]
               and b["state"] == "RUNNING"]
    assert started and started[0]["reason"] == "STARTED/BOOTED"
    assert started[0]["at"] < stopped["at"]


def monitor_reports(bus, host, count, timeout=20):
    """The first ``count`` monitoring reports of ``host``."""
    bus.wait_for(lambda k, b: len([1 for key, body in bus.received if key == messages.HOST_MONITOR
                                   and body["host"] == host]) >= count, timeout)
    return [body for key, body in bus.received
            if key == messages.HOST_MONITOR and body["host"] == host]


def test_reports_are_sync_at_start_and_every_sync_interval(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    # monitoring every second (the tests' setting), a sync every third second
    start_node(host, env={"CIRRUS_DRIVERS_SYNC_INTERVAL": "2.5"})
    reports = monitor_reports(bus, host, 7)
    syncs = [report["sync"] for report in reports]
    assert syncs[:3] == [True, False, False], syncs
    assert True in syncs[3:], syncs
    assert reports[0]["monitoring"]["URI"] == "test:///default"


def test_a_report_after_a_broker_reconnect_is_sync(node, bus):
    first = monitor_reports(bus, node.host, 2)
    assert [r["sync"] for r in first] == [True, False]
    dropped_at = now_iso()
    close_broker_connections(broker_connections(f"cirrus-node:{node.host}"))
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == node.host
                 and b["at"] > dropped_at and b["sync"], timeout=20)


def test_simulated_domains_outlive_a_worker_restart(start_node, bus, tmp_path):
    host = f"node-{uuid.uuid4().hex[:6]}"
    state = str(tmp_path / "sim-state.json")
    first = start_node(host, "--backend", "simulated", "--sim-state", state)
    vm = a_vm()
    run_ok(bus, host, vm, "deploy")
    assert first.stop() == 0
    started = now_iso()
    start_node(host, "--backend", "simulated", "--sim-state", state)
    report = bus.monitor_after(host, started)
    assert vm_states(report)[vm["id"]] == "RUNNING" and report["sync"]
