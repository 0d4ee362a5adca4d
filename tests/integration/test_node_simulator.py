"""``cirrus-node --simulate``: many simulated hosts in one process, on the real broker.

Each host answers on its own queue; failures scripted at runtime for one host
and one action hit exactly that many of its commands; a domain changed behind
the platform's back is reported as a vm.event, as libvirt's would be; a command the process
dies on is done again when it comes back (late ack), as for one host."""
import signal
import subprocess
import sys
import time
import uuid

import pytest

from cirrus import config, messages
from services.drivers.worker import send_control
from tests.node_worker import a_vm, bus, now_iso, run_ok, start_node, vm_states  # noqa: F401
from tests.procs import wait_until


@pytest.fixture
def start_simulator(cirrus_env, tmp_path):
    procs = []

    def start(count, *extra, prefix=None):
        prefix = prefix or f"sim{uuid.uuid4().hex[:5]}"
        log_path = tmp_path / f"{prefix}-{len(procs)}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.drivers.worker", "--simulate", str(count),
             "--prefix", prefix, "--monitor-interval", "1", *extra],
            env=cirrus_env, stdout=log, stderr=subprocess.STDOUT, cwd=config.REPO_ROOT)
        proc.prefix, proc.log, proc.log_path = prefix, log, log_path
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=40)
        proc.log.close()


def host(proc, index):
    return f"{proc.prefix}-{index:04d}"


def test_each_simulated_host_has_its_queue_domains_and_reports(start_simulator, bus):
    sim = start_simulator(5, "--sim-cores", "8", "--sim-memory", "4096")
    reports = {}
    for index in range(1, 6):
        reports[index] = bus.wait_for(lambda k, b: k == messages.HOST_MONITOR
                                      and b["host"] == host(sim, index))
        assert reports[index]["sync"]
        mon = reports[index]["monitoring"]
        assert (mon["HYPERVISOR"], mon["TOTALCPU"], mon["TOTALMEMORY"]) == \
            ("simulated", 800, 4096 * 1024)
        assert mon["DS_LOCATION_FREE_MB"] == mon["DS_LOCATION_TOTAL_MB"] > 0
    first, third = a_vm(), a_vm()
    assert run_ok(bus, host(sim, 1), first, "deploy") == {"deploy_id": f"cirrus-{first['id']}"}
    run_ok(bus, host(sim, 3), third, "deploy")
    since = now_iso()
    assert vm_states(bus.monitor_after(host(sim, 1), since)) == {first["id"]: "RUNNING"}
    assert vm_states(bus.monitor_after(host(sim, 3), since)) == {third["id"]: "RUNNING"}
    assert vm_states(bus.monitor_after(host(sim, 2), since)) == {}
    # a result names the host whose queue the command came from
    assert {b["host"] for k, b in bus.received if k == messages.COMMAND_RESULT} == \
        {host(sim, 1), host(sim, 3)}


def test_results_ready_together_go_in_one_message(start_simulator, bus):
    """Commands queued for 20 hosts before their node starts all arrive at
    once and finish together: the node sends their results in fewer
    messages than results."""
    prefix = f"sim{uuid.uuid4().hex[:5]}"
    names = [f"{prefix}-{index:04d}" for index in range(1, 21)]
    commands = [bus.send(name, messages.command("deploy", vm["id"], name, vm=vm))
                for name, vm in ((name, a_vm()) for name in names)]
    start_simulator(20, prefix=prefix)
    for cmd in commands:
        assert bus.result(cmd)["success"]
    assert sum(bus.result_messages) == 20 and len(bus.result_messages) < 20
    assert all(len(bus.results_of(cmd)) == 1 for cmd in commands)


def test_scripted_failures_hit_the_next_deploys_of_one_host_only(start_simulator, bus,
                                                                  amqp_uri):
    sim = start_simulator(3)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host(sim, 3))
    answer = send_control(amqp_uri, host(sim, 2),
                          {"what": "fail", "action": "deploy", "count": 2,
                           "message": "disk on fire"})
    assert answer == {"ok": True, "host": host(sim, 2), "done": "the next 2 deploys fail: "
                                                               "disk on fire"}

    def deploy(index):
        vm = a_vm()
        return bus.result(bus.send(host(sim, index),
                                   messages.command("deploy", vm["id"], host(sim, index), vm=vm)))
    other = deploy(1)                       # another host is not touched
    assert other["success"]
    first, second, third = deploy(2), deploy(2), deploy(2)
    assert (first["success"], first["error"]) == (False, "disk on fire")
    assert (second["success"], second["error"]) == (False, "disk on fire")
    assert third["success"]
    # another action of the same host is not touched either
    vm = a_vm()
    run_ok(bus, host(sim, 2), vm, "clone")


def node_command(cirrus_env, *args):
    return subprocess.run([sys.executable, "-m", "services.drivers.worker", *args],
                          env=cirrus_env, capture_output=True, text=True, cwd=config.REPO_ROOT,
                          timeout=60)


def test_simulate_fail_command_line_and_its_bad_input(start_simulator, bus, cirrus_env):
    sim = start_simulator(2)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host(sim, 2))

    def simulate_fail(*args):
        return node_command(cirrus_env, "simulate-fail", *args)
    done = simulate_fail("--host", host(sim, 1), "--action", "shutdown", "--count", "1")
    assert done.returncode == 0
    assert done.stdout.strip() == f"{host(sim, 1)}: the next shutdown fails"
    vm = {**a_vm(), "deploy_id": None}
    run_ok(bus, host(sim, 1), vm, "deploy")
    vm["deploy_id"] = f"cirrus-{vm['id']}"
    failed = bus.result(bus.send(host(sim, 1), messages.command("shutdown", vm["id"],
                                                                host(sim, 1), vm=vm)))
    assert not failed["success"] and "scripted" in failed["error"]
    run_ok(bus, host(sim, 1), vm, "shutdown")

    bad = simulate_fail("--host", host(sim, 1), "--action", "explode")
    assert bad.returncode == 2 and "--action" in bad.stderr
    negative = simulate_fail("--host", host(sim, 1), "--action", "deploy", "--count", "-1")
    assert negative.returncode == 2 and "--count: must be 0 or more" in negative.stderr
    nobody = simulate_fail("--host", f"nobody-{uuid.uuid4().hex[:4]}", "--action", "deploy",
                           "--timeout", "1")
    assert nobody.returncode == 1 and "no worker answered" in nobody.stderr


def test_simulate_change_powers_a_domain_off_behind_the_platforms_back(start_simulator, bus,
                                                                        cirrus_env):
    sim = start_simulator(2)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host(sim, 2))
    vm = a_vm()
    run_ok(bus, host(sim, 2), vm, "deploy")

    def vm_events():
        return [(b["host"], b["deploy_id"], b["state"], b["reason"]) for k, b in bus.received
                if k == messages.VM_EVENT and b["vm_id"] == vm["id"]]

    def change(*args, on=host(sim, 2)):
        return node_command(cirrus_env, "simulate-change", "--host", on, "--vm", str(vm["id"]),
                            *args)
    since = now_iso()
    off = change("--state", "POWEROFF")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == \
        f"{host(sim, 2)}: cirrus-{vm['id']} RUNNING -> POWEROFF (STOPPED/DESTROYED)"
    bus.wait_for(lambda k, b: k == messages.VM_EVENT and b["vm_id"] == vm["id"])
    assert vm_events() == [(host(sim, 2), f"cirrus-{vm['id']}", "POWEROFF", "STOPPED/DESTROYED")]
    # the host's next report, made early since its domain changed, says so too
    assert vm_states(bus.monitor_after(host(sim, 2), since)) == {vm["id"]: "POWEROFF"}

    # bad input: named, and nothing changes
    unknown = change("--state", "EXPLODED")
    assert unknown.returncode == 2 and "--state: invalid choice: 'EXPLODED'" in unknown.stderr
    elsewhere = change("--state", "RUNNING", on=host(sim, 1))
    assert elsewhere.returncode == 1
    assert elsewhere.stderr.strip() == (f"cirrus-node simulate-change: {host(sim, 1)}: no domain "
                                        f"cirrus-{vm['id']} on this host: VM {vm['id']} is not "
                                        f"here")
    again = change("--state", "POWEROFF")
    assert again.returncode == 1 and f"cirrus-{vm['id']} is already POWEROFF" in again.stderr
    nobody = change("--state", "RUNNING", "--timeout", "1", on=f"nobody-{uuid.uuid4().hex[:4]}")
    assert nobody.returncode == 1 and "no worker answered" in nobody.stderr

    on = change("--state", "RUNNING", "--reason", "started by hand")
    assert on.returncode == 0, on.stderr
    bus.wait_for(lambda k, b: k == messages.VM_EVENT and b["vm_id"] == vm["id"]
                 and b["state"] == "RUNNING")
    assert vm_events() == [(host(sim, 2), f"cirrus-{vm['id']}", "POWEROFF", "STOPPED/DESTROYED"),
                           (host(sim, 2), f"cirrus-{vm['id']}", "RUNNING", "started by hand")]


def test_a_control_request_a_real_host_cannot_do_is_refused(start_node, bus, amqp_uri):
    node = start_node(f"node-{uuid.uuid4().hex[:6]}")
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == node.host)
    answer = send_control(amqp_uri, node.host, {"what": "fail", "action": "deploy", "count": 1})
    assert answer == {"ok": False, "host": node.host,
                      "error": "the LibvirtBackend cannot script failures; only simulated "
                               "hosts can"}
    assert send_control(amqp_uri, node.host, {"what": "reboot"})["error"] == \
        "what: unknown control request 'reboot'; expected one of 'fail', 'change'"
    assert send_control(amqp_uri, node.host, {"what": "change", "vm_id": 1, "state": "GONE"}) \
        == {"ok": False, "host": node.host,
            "error": "the LibvirtBackend cannot change domains behind the platform's back; "
                     "only simulated hosts can"}


def test_a_command_the_simulator_dies_on_is_done_after_a_restart(start_simulator, bus):
    prefix = f"sim{uuid.uuid4().hex[:5]}"
    first = start_simulator(4, "--sim-delay", "3", prefix=prefix)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host(first, 4))
    vm = a_vm()
    cmd = bus.send(host(first, 4), messages.command("deploy", vm["id"], host(first, 4), vm=vm))
    time.sleep(1)                       # the command is running...
    first.send_signal(signal.SIGKILL)   # ...when the process dies: it was never acked
    first.wait()
    assert bus.results_of(cmd) == []
    second = start_simulator(4, prefix=prefix)
    result = bus.result(cmd)
    assert result["success"] and result["info"] == {"deploy_id": f"cirrus-{vm['id']}"}
    assert result["host"] == host(second, 4)
    assert "redelivered command " + cmd["id"] in second.log_path.read_text()


def test_a_message_of_several_commands_is_acked_once_all_are_answered(start_simulator, bus):
    """Lifecycle sends a host the commands of one transaction in one message.
    The node acks it when the last result is out: killed after the first,
    it is handed the whole message again, and each command is answered."""
    prefix = f"sim{uuid.uuid4().hex[:5]}"
    first = start_simulator(1, "--sim-delay", "2", "--threads", "1", prefix=prefix)
    name = host(first, 1)
    bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == name)
    commands = [messages.command("deploy", vm["id"], name, vm=vm) for vm in (a_vm(), a_vm())]
    bus.send(name, {"commands": commands})
    bus.result(commands[0])             # one done, the other running...
    first.send_signal(signal.SIGKILL)   # ...when the process dies: the message was not acked
    first.wait()
    assert bus.results_of(commands[1]) == []
    second = start_simulator(1, prefix=prefix)
    for cmd in commands:
        assert bus.result(cmd)["success"]
        wait_until(lambda: "redelivered command " + cmd["id"] in second.log_path.read_text(),
                   what="the redelivery logged")
    assert len(bus.results_of(commands[0])) == 2     # done again: harmless, by its id


@pytest.mark.parametrize("args, named", [
    (["--simulate", "0"], "--simulate: must be 1 or more"),
    (["--simulate", "3", "--host", "x"], "--host: not with --simulate"),
    (["--simulate", "3", "--prefix", "bad name"], "--prefix"),
    (["--simulate", "3", "--sim-state", "/tmp/one.json"], "must contain {host}"),
    (["--simulate", "3", "--monitor-interval", "20"], "lifecycle.host_timeout"),
])
def test_bad_simulator_arguments_are_named(args, named, cirrus_env):
    done = node_command(cirrus_env, *args)
    assert done.returncode == 2 and named in done.stderr, done.stderr
