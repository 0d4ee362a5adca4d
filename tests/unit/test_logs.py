"""cirrus.logs: the JSON and text lines every process writes, its file per
instance, and reading them back into one request's timeline (cirrus trace)."""
import io
import json
import logging
import threading
from datetime import datetime

import pytest

from cirrus import config, instance, logs, tracing


@pytest.fixture
def identity():
    saved = instance._current
    yield instance.identify("lifecycle", "lifecycle.2")
    instance._current = saved


def record(message="VM %s: %s", args=(5, "RUNNING"), level=logging.INFO, **extra):
    made = logging.LogRecord("cirrus.lifecycle", level, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def as_json(made):
    return json.loads(logs.JsonFormatter(tracing.current).format(made))


def test_a_json_line_names_the_process_the_request_and_the_vm(identity):
    with tracing.bound("req-1", 5):
        line = as_json(record())
    assert line["service"] == "lifecycle" and line["instance"] == "lifecycle.2"
    assert (line["level"], line["logger"], line["msg"]) == ("INFO", "cirrus.lifecycle",
                                                            "VM 5: RUNNING")
    assert (line["request_id"], line["vm_id"]) == ("req-1", 5)
    assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).tzinfo is not None
    assert line["ts"].endswith("Z") and len(line["ts"].split(".")[1]) == 7    # microseconds


def test_a_lines_own_request_wins_and_unknowns_are_left_out(identity):
    with tracing.bound("the-pass"):
        line = as_json(record(**tracing.fields("vm-own", 7)))
    assert (line["request_id"], line["vm_id"]) == ("vm-own", 7)
    plain = as_json(record())
    assert "request_id" not in plain and "vm_id" not in plain and "exc" not in plain


def test_a_traceback_is_one_field_and_quotes_stay_json(identity):
    try:
        raise ValueError('bad "thing"\nsecond line')
    except ValueError:
        import sys
        made = record('said "%s"', ("é",), level=logging.ERROR, exc_info=sys.exc_info())
    text = logs.JsonFormatter(tracing.current).format(made)
    assert "\n" not in text
    line = json.loads(text)
    assert line["msg"] == 'said "é"' and "ValueError: bad" in line["exc"]


def test_a_record_is_formatted_once_for_every_handler(identity):
    made = record()
    formatter = logs.JsonFormatter(tracing.current)
    first = formatter.format(made)
    made.msg = "changed"
    assert formatter.format(made) is first


def test_the_text_line_is_for_people(identity):
    with tracing.bound("req-9", 3):
        text = logs.TextFormatter(tracing.current).format(record())
    assert text.endswith("INFO cirrus.lifecycle: VM 5: RUNNING [request req-9, VM 3]")


def test_the_current_request_belongs_to_one_thread():
    seen = {}

    def other():
        seen["other"] = tracing.current()
    with tracing.bound("mine", 1):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert tracing.current() == ("mine", 1)
        with tracing.detached():
            assert tracing.current() == (None, None)
        assert tracing.request_id() == "mine"
    assert seen["other"] == (None, None) and tracing.current() == (None, None)


def test_each_instance_writes_its_own_file_and_a_renamed_process_moves(tmp_path, identity):
    handler = logs.InstanceFile(tmp_path / "logs", 0, 0)
    handler.setFormatter(logs.JsonFormatter(tracing.current))
    handler.emit(record())
    instance.identify("gate", "gate.1/2")      # a forked gate process names itself
    handler.emit(record("second", ()))
    handler.close()
    first = (tmp_path / "logs" / "lifecycle.2.jsonl").read_text().splitlines()
    second = (tmp_path / "logs" / "gate.1_2.jsonl").read_text().splitlines()
    assert [json.loads(line)["instance"] for line in first + second] == ["lifecycle.2",
                                                                         "gate.1/2"]


def test_the_files_rotate(tmp_path, identity):
    handler = logs.InstanceFile(tmp_path, 300, 2)
    handler.setFormatter(logs.JsonFormatter(tracing.current))
    for _ in range(10):
        handler.emit(record())
    handler.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["lifecycle.2.jsonl", "lifecycle.2.jsonl.1", "lifecycle.2.jsonl.2"]
    assert [path.name for path in logs.log_files(tmp_path)] == names


def test_settings_name_a_bad_value(monkeypatch):
    monkeypatch.delenv("CIRRUS_LOG_LEVEL", raising=False)
    assert logs.settings({"logging": {"format": "text"}})["format"] == "text"
    for section, named in [({"format": "xml"}, "logging.format"),
                           ({"level": "LOUD"}, "logging.level"),
                           ({"backups": -1}, "logging.backups"),
                           ({"max_bytes": "big"}, "logging.max_bytes")]:
        with pytest.raises(config.ConfigError, match=named):
            logs.settings({"logging": section})


def test_the_environment_sets_logging_even_without_a_section(tmp_path):
    without = tmp_path / "cirrus.yaml"
    without.write_text("amqp:\n  uri: amqp://a/\n")
    cfg = config.load(without, environ={"CIRRUS_LOGGING_DIR": "/tmp/there"})
    assert logs.settings(cfg)["dir"] == "/tmp/there"
    assert logs.log_dir({"logging": {"dir": "/tmp/here"}}) == "/tmp/here"
    assert logs.log_dir(config.load(without, environ={})) == logs.DEFAULT_DIR


# ---------------------------------------------------------------- reading them back

def line(ts, instance_name, msg, request_id="r1", **more):
    return json.dumps({"ts": ts, "level": "INFO", "service": instance_name.split(".")[0],
                       "instance": instance_name, "logger": "x", "msg": msg,
                       "request_id": request_id, **more})


def test_a_line_is_read_behind_a_launcher_or_journald_prefix():
    text = line("2026-01-02T10:00:00.000001Z", "lifecycle.1", "hi")
    assert logs.parse_line("lifecycle.1 | " + text)["msg"] == "hi"
    assert logs.parse_line("Jan 02 host cirrus-lifecycle[12]: " + text)["instance"] == "lifecycle.1"
    for bad in ("no json here", "{broken", "[1, 2]", '{"ts": 5, "msg": "x"}',
                '{"ts": "yesterday", "msg": "x"}', '{"msg": "no time"}'):
        assert logs.parse_line(bad) is None, bad


def test_the_timeline_of_a_request_across_files_in_time_order(tmp_path):
    (tmp_path / "gateway.1.jsonl").write_text("\n".join([
        line("2026-01-02T10:00:00.050000Z", "gateway.1", "SubmitVm -> OK (50 ms)"),
        line("2026-01-02T10:00:00.000000Z", "gateway.1", "another request", "r2")]) + "\n")
    (tmp_path / "lifecycle.1.jsonl").write_text("\n".join([
        line("2026-01-02T10:00:00.020000Z", "lifecycle.1", "VM 1: INIT -> PENDING", vm_id=1),
        "lifecycle.1 garbage that names r1 but is not JSON",
        line("2026-01-02T10:00:01.500000Z", "lifecycle.1", "VM 1: BOOT -> RUNNING", vm_id=1),
    ]) + "\n")
    (tmp_path / "lifecycle.1.jsonl.1").write_text(
        line("2026-01-02T09:59:59.990000Z", "lifecycle.1", "older, rotated") + "\n")
    (tmp_path / "notes.txt").write_text(line("2026-01-02T10:00:00Z", "x.1", "not a log file"))
    records, read, skipped = logs.gather("r1", logs.sources([str(tmp_path)], None))
    assert [r["msg"] for r in records] == ["older, rotated", "VM 1: INIT -> PENDING",
                                           "SubmitVm -> OK (50 ms)", "VM 1: BOOT -> RUNNING"]
    assert (read, skipped) == (6, 1)
    shown = logs.timeline(records)
    assert shown[0].startswith("request r1: 4 lines from 2 instances, from "
                               "2026-01-02T09:59:59.990000Z over 1.510 s")
    assert shown[1].split()[:3] == ["+0.000s", "lifecycle.1", "INFO"]
    assert shown[2].split()[:5] == ["+0.030s", "lifecycle.1", "INFO", "VM", "1"]
    assert shown[4].split()[:2] == ["+1.510s", "lifecycle.1"]


def test_lines_at_the_same_time_keep_their_order():
    same = "2026-01-02T10:00:00.000000Z"
    stream = io.StringIO("\n".join(line(same, "a.1", f"m{i}") for i in range(5)))
    records, _, _ = logs.gather("r1", [("s", stream)])
    assert [r["msg"] for r in records] == [f"m{i}" for i in range(5)]


def test_trace_reads_stdin_and_prints_json_with_offsets(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join([
        line("2026-01-02T10:00:00.250000Z", "scheduler.1", "VM 1 placed on node-1"),
        line("2026-01-02T10:00:00.000000Z", "gateway.1", "SubmitVm -> OK")])))
    out = io.StringIO()
    assert logs.trace("r1", ["-"], as_json=True, out=out) == 0
    printed = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [(p["instance"], p["offset"]) for p in printed] == [("gateway.1", 0.0),
                                                               ("scheduler.1", 0.25)]


def test_an_unknown_request_says_so_and_counts_what_it_skipped(tmp_path):
    (tmp_path / "a.1.jsonl").write_text(line("2026-01-02T10:00:00Z", "a.1", "x", "r2")
                                        + "\nnot json but names nope\n")
    err = io.StringIO()
    with pytest.raises(logs.TraceError, match="no log line carries request id nope "
                                              r"\(2 lines read from 1 sources\)"):
        logs.trace("nope", [str(tmp_path)], err=err)
    assert "skipped 1 lines that name nope" in err.getvalue()


def test_missing_logs_are_named(tmp_path):
    with pytest.raises(logs.TraceError, match="no log files in"):
        logs.trace("r1", [], default_dir=str(tmp_path / "none"))
    with pytest.raises(logs.TraceError, match="no such file or directory"):
        logs.trace("r1", [str(tmp_path / "missing.jsonl")])
    with pytest.raises(logs.TraceError, match="no .jsonl log files"):
        logs.trace("r1", [str(tmp_path)])
    with pytest.raises(logs.TraceError, match="must not be empty"):
        logs.trace("  ", [str(tmp_path)])
