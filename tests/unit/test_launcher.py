"""The launcher's supervisor, on real tiny child processes (``python -c``)."""
import io
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cirrus.launcher import (Console, LaunchError, ProcessSpec, Supervisor, cluster_specs,
                             parse_nodes, parse_scale)
from tests.procs import wait_until

PY = sys.executable


def eventually(predicate, timeout=10.0):
    return wait_until(predicate, timeout, interval=0.05, what=str(predicate))


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[1][0] != "Z"


def python(code):
    return [PY, "-c", code]


@pytest.fixture
def output():
    return io.StringIO()


@pytest.fixture
def supervise(output):
    started = []

    def make(*specs, **options):
        sup = Supervisor(list(specs), Console(output), **options).start()
        started.append(sup)
        return sup

    yield make
    for sup in started:
        sup.stop(timeout=2)


SLEEPER = python("import time; print('up', flush=True); time.sleep(120)")


# -- arguments ------------------------------------------------------------------

def test_parse_scale_reads_counts():
    assert parse_scale("scheduler=3, lifecycle=2") == {"scheduler": 3, "lifecycle": 2}
    assert parse_scale("requests=0,gateway=1") == {"requests": 0, "gateway": 1}


@pytest.mark.parametrize("text, message", [
    ("scheduler", r"'scheduler': expected NAME=COUNT"),
    ("=2", r"'=2': expected NAME=COUNT"),
    ("schedular=2", r"unknown service 'schedular'"),
    ("scheduler=two", r"count 'two' is not a whole number"),
    ("lifecycle=-1", r"count '-1' is not a whole number >= 0"),
    ("scheduler=1,scheduler=2", r"scheduler is given twice"),
    ("gateway=2", r"'gateway=2': the gateway .* count must be 1"),
    ("gate=2", r"'gate=2': the gate .* count must be 0 or 1"),
    ("scheduler=2,", r"empty entry"),
])
def test_parse_scale_names_the_bad_part(text, message):
    with pytest.raises(LaunchError, match=message):
        parse_scale(text)


def test_parse_nodes():
    assert parse_nodes("node-1, node-2") == ["node-1", "node-2"]
    with pytest.raises(LaunchError, match="bad node name 'bad name'"):
        parse_nodes("node-1,bad name")
    with pytest.raises(LaunchError, match="bad node name ''"):
        parse_nodes("node-1,,node-2")
    with pytest.raises(LaunchError, match="node-1 is given twice"):
        parse_nodes("node-1,node-1")


def test_cluster_specs_scale_services_and_run_one_worker_per_node():
    specs = {s.name: s for s in cluster_specs({"scheduler": 2}, ["n1", "n2"], "test:///default")}
    assert {n: s.count for n, s in specs.items()} == {
        "requests": 1, "scheduler": 2, "lifecycle": 1, "flow": 1, "gateway": 1, "gate": 1,
        "n1": 1, "n2": 1}
    assert specs["gate"].argv[0].endswith("cirrus-gate")
    assert specs["scheduler"].argv[1:] == ["scheduler"]
    assert specs["n2"].argv[1:] == ["--host", "n2", "--uri", "test:///default"]


@pytest.mark.parametrize("args, message", [
    (["--scale", "schedular=2"], "unknown service 'schedular'"),
    (["--metrics-port", "70000"], "--metrics-port 70000: not a port number"),
])
def test_command_line_rejects_a_bad_argument_naming_it(args, message):
    result = subprocess.run([PY, "-m", "cirrus.launcher", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_hosts_only_fails_clearly_when_no_gateway_listens():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, CIRRUS_GATEWAY_ADDRESS="127.0.0.1", CIRRUS_GATEWAY_PORT=str(port))
    result = subprocess.run([PY, "-m", "cirrus.launcher", "--hosts-only", "--ready-timeout", "1"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert f"the gateway at 127.0.0.1:{port} did not accept connections" in result.stdout


# -- output -------------------------------------------------------------------------

def test_each_line_is_prefixed_with_its_padded_instance_name(supervise, output):
    printer = python("import sys, time; print('hello', sys.argv[1], flush=True); "
                     "print('oops', file=sys.stderr, flush=True); time.sleep(120)")
    supervise(ProcessSpec("printer", printer + ["x"], count=2), ProcessSpec("db", SLEEPER))
    eventually(lambda: output.getvalue().count("oops") == 2)
    lines = output.getvalue().splitlines()
    assert lines.count("printer.1 | hello x") == 1
    assert lines.count("printer.2 | hello x") == 1
    assert lines.count("printer.1 | oops") == 1  # stderr too
    eventually(lambda: "db.1      | up" in output.getvalue().splitlines())
    assert all("\x1b[" not in line for line in lines)  # not a terminal: no colour


def test_colour_only_on_a_terminal():
    assert Console(io.StringIO()).prefix("lifecycle.1") == "lifecycle.1 | "
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        console = Console(tty)
        assert console.colour
        assert console.prefix("lifecycle.1").startswith("\x1b[")
        assert console.prefix("lifecycle.1") != console.prefix("scheduler.1")
    os.close(leader)


def test_children_run_in_their_own_process_groups(supervise):
    sup = supervise(ProcessSpec("sleeper", SLEEPER, count=2))
    pids = sup.instances().values()
    for pid in pids:
        assert os.getpgid(pid) == pid != os.getpgid(0)


# -- restarts -----------------------------------------------------------------------

def test_a_killed_child_is_restarted_and_logged(supervise, output):
    sup = supervise(ProcessSpec("sleeper", SLEEPER), backoff=0.1)
    killed = sup.kill_one("sleeper.1")
    new_pid = eventually(lambda: sup.instances()["sleeper.1"] not in (None, killed)
                         and sup.instances()["sleeper.1"])
    assert alive(new_pid) and not alive(killed)
    assert sup.restarts("sleeper.1") == 1
    assert f"cirrus: sleeper.1 (pid {killed}) was killed by SIGKILL" in output.getvalue()


def test_restarts_back_off_while_a_child_keeps_dying(supervise, output):
    supervise(ProcessSpec("crasher", python("import sys; sys.exit(3)")), backoff=0.1)
    eventually(lambda: "restarting in 0.4 s" in output.getvalue())
    notes = [line for line in output.getvalue().splitlines() if "exited with code 3" in line]
    delays = [line.rsplit("restarting in ", 1)[1] for line in notes[:3]]
    assert delays == ["0.1 s", "0.2 s", "0.4 s"]


def test_kill_one_names_an_unknown_instance(supervise):
    sup = supervise(ProcessSpec("sleeper", SLEEPER))
    with pytest.raises(LaunchError, match=r"no process named 'sleeper.2' \(known: sleeper.1\)"):
        sup.kill_one("sleeper.2")


def test_start_reports_a_missing_program_and_stops_the_others(output):
    sup = Supervisor([ProcessSpec("sleeper", SLEEPER),
                      ProcessSpec("ghost", ["/nonexistent/cirrus-ghost"])], Console(output))
    with pytest.raises(LaunchError, match="cannot start ghost.1 .*cirrus-ghost"):
        sup.start()
    assert sup.instances()["sleeper.1"] is None


# -- stopping -----------------------------------------------------------------------

def test_stop_is_clean_and_quick_when_children_obey_sigterm(supervise, output):
    sup = supervise(ProcessSpec("sleeper", SLEEPER, count=3))
    eventually(lambda: output.getvalue().count("| up") == 3)
    pids = list(sup.instances().values())
    assert sup.stop(timeout=10) is True     # True: every child stopped on SIGTERM
    assert not any(alive(pid) for pid in pids)
    assert set(sup.instances().values()) == {None}
    time.sleep(0.6)  # longer than the backoff: nothing may come back
    assert set(sup.instances().values()) == {None}


def test_stop_kills_a_child_that_ignores_sigterm_after_the_timeout(supervise, output):
    stubborn = python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('ready', flush=True); time.sleep(120)")
    sup = supervise(ProcessSpec("stubborn", stubborn), ProcessSpec("sleeper", SLEEPER))
    eventually(lambda: "stubborn.1 | ready" in output.getvalue())
    pid = sup.instances()["stubborn.1"]
    began = time.monotonic()
    assert sup.stop(timeout=1) is False
    assert time.monotonic() - began >= 1    # it waited the timeout before SIGKILL
    assert not alive(pid)
    assert "stubborn.1 (pid %d) did not stop within 1 s: sending SIGKILL" % pid in output.getvalue()


def test_sigterm_to_a_child_group_reaches_its_own_children(supervise, output):
    # a child that forks a grandchild: stopping the group must not leave the grandchild behind
    parent = python("import subprocess, sys, time; "
                    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                    "print('grandchild', p.pid, flush=True); time.sleep(120)")
    sup = supervise(ProcessSpec("parent", parent))
    line = eventually(lambda: [l for l in output.getvalue().splitlines() if "grandchild" in l])
    grandchild = int(line[0].split()[-1])
    assert sup.stop(timeout=5) is True
    eventually(lambda: not alive(grandchild), timeout=5)


def test_signal_number_names_in_exit_notes():
    from cirrus.launcher import describe_exit
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(2) == "exited with code 2"


def test_node_args_reach_every_worker_with_its_own_name():
    specs = {s.name: s for s in cluster_specs(None, ["n1", "n2"], "test:///default",
                                              "--backend simulated --sim-state '/v t/{node}.json'")}
    assert specs["n2"].argv[-4:] == ["--backend", "simulated", "--sim-state", "/v t/n2.json"]
    assert specs["n1"].argv[-1] == "/v t/n1.json"


def test_unbalanced_node_args_are_refused_by_name():
    with pytest.raises(LaunchError, match="--node-args"):
        cluster_specs(None, ["n1"], "test:///default", "--sim-state 'open")
