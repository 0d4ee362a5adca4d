"""cirrus.tracing: how a request id is carried (headers, commands, results) and
which request a Nameko worker works for."""
import logging
import os
from types import SimpleNamespace

import pytest
from nameko.events import EventHandler
from nameko.rpc import Rpc

from cirrus import launcher, logs, messages, outbox, tracing
from cirrus.cli import build_parser
from cirrus.client import Client
from services.drivers.simulated import SimulatedBackend
from services.drivers.worker import command_fields, run_command, tracing_ids


def test_headers_are_nameko_s_and_none_without_a_request():
    assert tracing.headers("r1") == {"nameko.request_id": "r1"}
    assert tracing.headers(None) == {}


def test_outbox_rows_take_the_current_request_unless_they_have_their_own():
    own = outbox.event_row("lifecycle", "vm.state", {"id": 1}, tracing.headers("vm-own"))
    bare = outbox.event_row("lifecycle", "host.state", {"id": 2})
    other = outbox.event_row("lifecycle", "vm.updated", {"id": 3}, {"x-other": "kept"})
    assert tracing.stamp([dict(bare)]) == [bare]        # no current request: unchanged
    with tracing.bound("call"):
        stamped = tracing.stamp([own, bare, other])
    assert [row["headers"] for row in stamped] == [
        {"nameko.request_id": "vm-own"}, {"nameko.request_id": "call"},
        {"x-other": "kept", "nameko.request_id": "call"}]


def test_a_command_carries_its_request_and_the_result_brings_it_back():
    cmd = messages.command("deploy", 5, "node-1", "req-5", vm={"id": 5})
    assert cmd["request_id"] == "req-5" and cmd["args"] == {"vm": {"id": 5}}
    assert messages.result(cmd, True)["request_id"] == "req-5"
    assert messages.command("poll", 5, "node-1", vm={"id": 5})["request_id"] is None
    # whatever arrived: a result still names the request if it can
    assert command_fields({"id": "c", "request_id": "r"})["request_id"] == "r"
    assert tracing_ids("not a command") == (None, None)


def test_the_node_logs_a_command_under_its_request(caplog):
    vm = {"id": 7, "name": "t", "cpu": 1, "vcpu": 1, "memory": 64, "template": {},
          "deploy_id": None}
    cmd = messages.command("deploy", 7, "node-1", "req-7", vm=vm)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.getMessage(), tracing.current()))
    logging.getLogger("cirrus.node").addHandler(handler)
    try:
        with tracing.bound(*tracing_ids(cmd)), caplog.at_level(logging.INFO, logger="cirrus.node"):
            result = run_command(SimulatedBackend(), cmd, 1)
    finally:
        logging.getLogger("cirrus.node").removeHandler(handler)
    assert result["success"] and result["request_id"] == "req-7"
    assert seen == [("deploy of VM 7 done", ("req-7", 7))]


def worker(entrypoint, data):
    return SimpleNamespace(data=data, entrypoint=entrypoint)


def rpc_entrypoint(name):
    entrypoint = Rpc()
    entrypoint.method_name = name
    return entrypoint


def test_a_worker_works_for_the_request_nameko_received(caplog):
    provider = tracing.Tracing(log_calls=True)
    ctx = worker(rpc_entrypoint("submit_vm"), {"request_id": "gw-1"})
    with caplog.at_level(logging.INFO, logger="cirrus.calls"):
        provider.worker_setup(ctx)
        assert tracing.current() == ("gw-1", None)
        provider.worker_result(ctx, {"id": 1}, None)
        try:
            raise KeyError("gone")
        except KeyError as exc:
            provider.worker_result(ctx, None, (KeyError, exc, None))
        provider.worker_teardown(ctx)
    assert tracing.current() == (None, None)
    messages_logged = [r.getMessage() for r in caplog.records]
    assert messages_logged[0].startswith("submit_vm -> OK (")
    assert messages_logged[1].startswith("submit_vm -> KeyError: 'gone' (")


def test_other_services_log_calls_at_debug_and_events_not_at_all(caplog):
    quiet = tracing.Tracing()
    ctx = worker(rpc_entrypoint("deploy_many"), {})
    event = worker(EventHandler("node", "command.result"), {"request_id": "r"})
    with caplog.at_level(logging.INFO, logger="cirrus.calls"):
        for one in (ctx, event):
            quiet.worker_setup(one)
            quiet.worker_result(one, None, None)
            quiet.worker_teardown(one)
    assert caplog.records == []


def test_acting_for_one_vm_swaps_the_request_a_call_carries_and_puts_it_back():
    ctx = worker(rpc_entrypoint("x"), {"request_id": "the-pass", "call_id_stack": []})
    trace = tracing.Tracing().get_dependency(ctx)
    with trace.acting_for("vm-9", 9):
        assert ctx.data["request_id"] == "vm-9" and tracing.current() == ("vm-9", 9)
    assert ctx.data == {"request_id": "the-pass", "call_id_stack": []}
    with trace.acting_for(None):    # nameko warns of None headers: the key goes
        assert "request_id" not in ctx.data
    assert trace.request_id == "the-pass"


class FakeSession:
    def __init__(self):
        self.info = {}


def test_lines_wait_for_the_commit_and_a_rolled_back_savepoint_drops_its_own(caplog):
    log = logging.getLogger("cirrus.test")
    session = FakeSession()
    tracing.log_after_commit(session, log, "VM %s first", 1, request_id="a", vm_id=1)
    mark = tracing.held(session)
    tracing.log_after_commit(session, log, "VM %s undone", 2, request_id="b", vm_id=2)
    tracing.forget_since(session, mark)
    with caplog.at_level(logging.INFO, logger="cirrus.test"):
        assert caplog.records == []
        tracing.committed(session)
        tracing.committed(session)      # once only
    assert [(r.getMessage(), r.request_id, r.vm_id) for r in caplog.records] == [
        ("VM 1 first", "a", 1)]


def test_the_cli_sends_the_request_id_it_is_given(capsys):
    args = build_parser().parse_args(["--request-id", "mine-1", "vm", "list"])
    assert args.request_id == "mine-1"
    api = Client(address="127.0.0.1:1", token="t", request_id=args.request_id)
    assert ("x-request-id", "mine-1") in api._metadata()
    assert ("x-request-id", "given") in api._metadata("given")
    api.close()
    for bad in ("x" * 65, "tab\there", ""):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--request-id", bad, "vm", "list"])
        assert "--request-id: " in capsys.readouterr().err


def test_the_launcher_gives_its_children_a_log_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRRUS_LOGGING_FORMAT", "json")
    monkeypatch.delenv("CIRRUS_LOGGING_DIR", raising=False)
    assert launcher.logging_env({"logging": {"dir": None}}) == logs.DEFAULT_DIR
    assert (os.environ["CIRRUS_LOGGING_DIR"], os.environ["CIRRUS_LOGGING_FORMAT"]) == (
        logs.DEFAULT_DIR, "text")
    assert launcher.logging_env({}, str(tmp_path), "json") == str(tmp_path)
    assert os.environ["CIRRUS_LOGGING_DIR"] == str(tmp_path)
