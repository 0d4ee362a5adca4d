"""`cirrus trace`: one request's path through a whole cluster, from the log
files its processes write, through the CLI as an operator would follow it."""
import uuid

import pytest


@pytest.fixture(scope="module")
def traced(cluster):
    """A VM made and then ended, each under a request id of our own."""
    create, terminate = (f"{what}-{uuid.uuid4().hex[:8]}" for what in ("create", "end"))
    made = cluster.cli("-v", "--request-id", create, "vm", "create", "--name", "traced",
                       "--cpu", "0.1", "--memory", "64")
    vm_id = int(made.stdout.strip())
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "60")
    cluster.cli("--request-id", terminate, "vm", "terminate", vm_id)
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "60")
    return {"vm": vm_id, "create": create, "terminate": terminate, "made": made}


def timeline(cluster, request_id):
    """[(instance, message)] of `cirrus trace`'s lines after its header."""
    out = cluster.cli("trace", request_id).stdout.splitlines()
    assert out[0].startswith(f"request {request_id}: ")
    rows = []
    for line in out[1:]:
        offset, instance, _level, rest = line.split(None, 3)
        assert offset.endswith("s") and float(offset[:-1]) >= 0
        rows.append((instance, rest))
    return rows


def test_the_cli_says_the_request_id_it_sent(traced):
    assert f"cirrus: request id {traced['create']}" in traced["made"].stderr


def test_a_create_is_followed_from_the_gateway_to_the_vm_running(cluster, traced):
    rows = timeline(cluster, traced["create"])
    instances = [instance for instance, _ in rows]
    assert {"gateway.1", "requests.1", "lifecycle.1", "scheduler.1", "node-1.1"} <= set(instances)
    vm = f"VM {traced['vm']}"
    said = [(instance, text.removeprefix(vm).strip()) for instance, text in rows]
    # in time order: created, placed (the scheduler says so once lifecycle took
    # the placement), cloned and booted by the node, then RUNNING
    wanted = [("lifecycle.1", f"{vm}: INIT -> PENDING (allocate)"),
              ("lifecycle.1", f"{vm}: PENDING -> PROLOG (deploy); clone sent to node-1"),
              ("node-1.1", f"clone of {vm} done"),
              ("lifecycle.1", f"{vm}: PROLOG -> BOOT (prolog_success); deploy sent to node-1"),
              ("node-1.1", f"deploy of {vm} done"),
              ("lifecycle.1", f"{vm}: BOOT -> RUNNING (boot_success)")]
    positions = [said.index(one) for one in wanted]
    assert positions == sorted(positions), said
    assert said.index(("scheduler.1", f"{vm} placed on node-1")) > positions[0]
    assert not any(text.startswith("State changed") for _, text in said)   # SpiffWorkflow's
    assert any(i == "gateway.1" and t.startswith("RequestServicer.SubmitVm -> OK") for i, t in said)
    assert any(i == "requests.1" and t.startswith("submit_vm -> OK") for i, t in said)
    assert instances[-1] == "lifecycle.1"


def test_a_terminate_has_a_timeline_of_its_own(cluster, traced):
    said = [text for _, text in timeline(cluster, traced["terminate"])]
    vm = f"VM {traced['vm']}"
    assert any(text.endswith(f"{vm}: RUNNING -> SHUTDOWN (terminate); shutdown sent to node-1")
               for text in said)
    assert any(text.endswith(f"{vm}: EPILOG -> DONE (epilog_success)") for text in said)
    assert not any("INIT -> PENDING" in text for text in said)
    instances = {row[0] for row in timeline(cluster, traced["terminate"])}
    assert {"gateway.1", "requests.1", "lifecycle.1", "node-1.1"} <= instances


def test_an_unknown_request_id_says_so(cluster, traced):
    done = cluster.cli("trace", "no-such-request", check=False)
    assert done.returncode == 1
    assert "no log line carries request id no-such-request" in done.stderr


def test_a_piped_log_is_read_from_stdin(cluster, traced):
    import subprocess
    from tests.procs import BIN
    log = next((cluster.tmp / "logs").glob("scheduler.1.jsonl")).read_text()
    done = subprocess.run([str(BIN / "cirrus"), "trace", traced["create"], "-"], input=log,
                          env=cluster.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "scheduler.1" in done.stdout and "lifecycle.1" not in done.stdout
