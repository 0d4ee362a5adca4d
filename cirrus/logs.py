"""One log format for every process, and reading it back: ``cirrus trace``.

Each line is a JSON object (``logging.format: json``, the default) with
``ts`` (UTC, microseconds), ``level``, ``service``, ``instance``, ``logger``,
``msg``, and when known ``request_id`` and ``vm_id`` (from the line's
``extra``, else from cirrus.tracing's current request), ``exc`` for a
traceback. ``text`` is one readable line instead, for a terminal. When
``logging.dir`` is set each process also writes its lines, always JSON, to
``<dir>/<instance>.jsonl`` (rotating), which ``cirrus trace`` reads.

Kept cheap: a record is formatted once however many handlers write it, the
encoder is built once, and a timestamp's seconds are formatted once a second.
"""
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson

from cirrus import instance

FORMATS = ("json", "text")
# where cirrus-launch's clusters write their files, and where `cirrus trace` looks
# when logging.dir is not set
DEFAULT_DIR = "/var/tmp/cirrus/logs"
# libraries whose INFO lines are not Cirrus's news (SpiffWorkflow: a dozen per approval run)
NOISY = ("kombu", "amqp", "nameko", "sqlalchemy", "alembic", "spiff")

# built once; for a line that is not plain ASCII (see _encode)
_ascii_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _encode(line):
    """A log line's JSON, plain ASCII as any reader and any stdout take it:
    orjson's, ten times quicker than json's (the scheduler and lifecycle
    write one line per VM placed), unless the line holds other characters,
    which json escapes, or a value orjson refuses."""
    try:
        text = orjson.dumps(line, default=str).decode()
    except TypeError:   # an int beyond 64 bits, a lone surrogate
        return _ascii_encode(line)
    return text if text.isascii() else _ascii_encode(line)


def settings(cfg=None):
    """The ``logging:`` section with its defaults; ConfigError names a bad value."""
    from cirrus import config
    section = (cfg if cfg is not None else config.get()).get("logging") or {}
    out = {"format": section.get("format") or "json",
           "level": os.environ.get("CIRRUS_LOG_LEVEL") or section.get("level") or "INFO",
           "dir": section.get("dir") or None,
           "max_bytes": section.get("max_bytes", 50 * 2**20),
           "backups": section.get("backups", 3)}
    if out["format"] not in FORMATS:
        raise config.ConfigError(f"logging.format: must be json or text, got {out['format']!r}")
    if not isinstance(logging.getLevelName(str(out["level"]).upper()), int):
        raise config.ConfigError(f"logging.level: unknown level {out['level']!r} "
                                 f"(DEBUG, INFO, WARNING, ERROR)")
    for key in ("max_bytes", "backups"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 0:
            raise config.ConfigError(f"logging.{key}: must be a whole number >= 0, "
                                     f"got {out[key]!r}")
    return out


def log_dir(cfg=None):
    """Where this machine's log files are: logging.dir, else DEFAULT_DIR."""
    return settings(cfg)["dir"] or DEFAULT_DIR


def setup_logging(service=None, level=None):
    """Log this process (its identity: cirrus.instance) to stdout, and to
    ``<logging.dir>/<instance>.jsonl`` when that is set. ``service`` is
    unused: the identity names it (kept for callers that pass it)."""
    from cirrus import tracing
    chosen = settings()
    as_json = JsonFormatter(tracing.current)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(as_json if chosen["format"] == "json" else TextFormatter(tracing.current))
    handlers = [console]
    if chosen["dir"]:
        files = InstanceFile(chosen["dir"], chosen["max_bytes"], chosen["backups"])
        files.setFormatter(as_json)
        handlers.append(files)
    # nothing formats the caller's file and line, thread or process: Python's
    # logging HOWTO ("Optimization") on not collecting them, a fifth of a
    # line's cost (the scheduler logs one per VM placed)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(str(level or chosen["level"]).upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class _Stamp:
    """ISO 8601 UTC with microseconds; the seconds part made once a second."""

    def __init__(self):
        self._second = (None, "")

    def __call__(self, created):
        whole = int(created)
        second, text = self._second
        if second != whole:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = (whole, text)   # one assignment: safe between threads
        return f"{text}.{int((created - whole) * 1e6):06d}Z"


class _Formatter(logging.Formatter):
    """What both formats read of a record: its time, request, VM and traceback.
    ``current`` gives the current (request id, VM id): cirrus.tracing.current."""

    def __init__(self, current):
        super().__init__()
        self.current = current
        self.stamp = _Stamp()

    def context(self, record):
        """(request id, VM id): the line's own ``extra``, else the current request's."""
        found = record.__dict__
        request_id, vm_id = self.current()
        return found.get("request_id", request_id), found.get("vm_id", vm_id)

    def traceback(self, record):
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return record.exc_text


class JsonFormatter(_Formatter):
    def format(self, record):
        cached = record.__dict__.get("_cirrus_json")
        if cached is not None:
            return cached
        identity = instance.current()
        request_id, vm_id = self.context(record)
        line = {"ts": self.stamp(record.created), "level": record.levelname,
                "service": identity.service, "instance": identity.name,
                "logger": record.name, "msg": record.getMessage()}
        if request_id:
            line["request_id"] = request_id
        if vm_id is not None:
            line["vm_id"] = vm_id
        traceback = self.traceback(record)
        if traceback:
            line["exc"] = traceback
        record._cirrus_json = text = _encode(line)
        return text


class TextFormatter(_Formatter):
    """``2026-01-02T10:00:00.123456Z INFO cirrus.lifecycle: message [request R, VM 5]``"""

    def format(self, record):
        request_id, vm_id = self.context(record)
        about = ", ".join(part for part in (
            f"request {request_id}" if request_id else "",
            f"VM {vm_id}" if vm_id is not None else "") if part)
        text = (f"{self.stamp(record.created)} {record.levelname} {record.name}: "
                f"{record.getMessage()}{f' [{about}]' if about else ''}")
        traceback = self.traceback(record)
        return f"{text}\n{traceback}" if traceback else text


def file_name(instance_name):
    """``<instance>.jsonl``, the name made safe for a path (gate.1/2 -> gate.1_2)."""
    return re.sub(r"[^A-Za-z0-9@:._-]", "_", instance_name) + ".jsonl"


class InstanceFile(logging.handlers.RotatingFileHandler):
    """``<dir>/<instance>.jsonl``, rotating; it follows the process's identity,
    so a forked gate process that names itself again writes a file of its own."""

    def __init__(self, directory, max_bytes, backups):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.identity = instance.current()
        super().__init__(self.directory / file_name(self.identity.name), maxBytes=max_bytes,
                         backupCount=backups, encoding="utf-8", delay=True)

    def emit(self, record):
        identity = instance.current()
        if identity is not self.identity:
            with self.lock:
                if self.stream is not None:
                    self.stream.close()
                    self.stream = None
                self.identity = identity
                self.baseFilename = os.path.abspath(self.directory / file_name(identity.name))
        super().emit(record)


# ---------------------------------------------------------------- reading: cirrus trace

class TraceError(ValueError):
    """Nothing to trace: no log files, or no line of the request."""


def parse_line(line):
    """The record of one JSON log line, or None. Text before the first ``{``
    is ignored: the launcher's ``lifecycle.1 | `` or a journald prefix."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("ts"), str) \
            or "msg" not in record:
        return None
    try:
        record["_at"] = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return record


def log_files(directory):
    """A directory's log files, current and rotated (``x.jsonl``, ``x.jsonl.1``...)."""
    return sorted(path for path in Path(directory).iterdir()
                  if path.is_file() and re.search(r"\.jsonl(\.\d+)?$", path.name))


def sources(paths, default_dir):
    """[(name, open text stream)] for files, directories and '-' (stdin);
    with no paths, the files of ``default_dir``."""
    if not paths:
        directory = Path(default_dir)
        if not directory.is_dir() or not log_files(directory):
            raise TraceError(f"no log files in {directory}: give files or a directory, '-' "
                             f"for stdin, or set logging.dir")
        paths = [str(directory)]
    found = []
    for given in paths:
        if given == "-":
            found.append(("<stdin>", sys.stdin))
            continue
        path = Path(given)
        if path.is_dir():
            files = log_files(path)
            if not files:
                raise TraceError(f"{path}: no .jsonl log files in this directory")
        elif path.is_file():
            files = [path]
        else:
            raise TraceError(f"{path}: no such file or directory")
        for file in files:
            try:
                found.append((str(file), open(file, encoding="utf-8", errors="replace")))
            except OSError as exc:
                raise TraceError(f"{file}: {exc.strerror}") from None
    return found


def gather(request_id, streams):
    """The records of ``request_id`` from ``streams``, in time order (a line
    whose time equals another's keeps its place in its file), and how many
    lines were read and how many that mention the id were not log lines."""
    records, read, skipped = [], 0, 0
    for _name, stream in streams:
        with stream:
            for line in stream:
                read += 1
                if request_id not in line:
                    continue    # most lines: not parsed at all
                record = parse_line(line)
                if record is None:
                    skipped += 1
                elif record.get("request_id") == request_id:
                    records.append(record)
    records.sort(key=lambda record: record["_at"])
    return records, read, skipped


def timeline(records):
    """Readable lines: offset from the first line, instance, level, VM, message."""
    if not records:
        return []
    start = records[0]["_at"]
    width = max(len(str(record.get("instance", "?"))) for record in records)
    instances = {record.get("instance") for record in records}
    lines = [f"request {records[0]['request_id']}: {len(records)} lines from "
             f"{len(instances)} instances, from {records[0]['ts']} over "
             f"{records[-1]['_at'] - start:.3f} s"]
    for record in records:
        vm = f"VM {record['vm_id']}" if record.get("vm_id") is not None else ""
        lines.append(f"{record['_at'] - start:+9.3f}s  {str(record.get('instance', '?')):<{width}}"
                     f"  {record.get('level', ''):<7} {vm:<8} {record['msg']}")
        if record.get("exc"):
            lines.append(" " * 12 + record["exc"].strip().splitlines()[-1])
    return lines


def trace(request_id, paths=(), as_json=False, default_dir=None, out=None, err=None):
    """``cirrus trace``: print the timeline of ``request_id``; the exit status.
    TraceError when there is nothing to read or no line of the request."""
    out, err = out or sys.stdout, err or sys.stderr
    if not request_id.strip():
        raise TraceError("REQUEST_ID: must not be empty")
    streams = sources(list(paths), default_dir or log_dir())
    names = len(streams)
    records, read, skipped = gather(request_id, streams)
    if skipped:
        print(f"cirrus trace: skipped {skipped} lines that name {request_id} but are not "
              f"JSON log lines", file=err)
    if not records:
        raise TraceError(f"no log line carries request id {request_id} ({read} lines read "
                         f"from {names} sources)")
    if as_json:
        start = records[0]["_at"]
        for record in records:
            at = record.pop("_at")
            print(_encode({**record, "offset": round(at - start, 6)}), file=out)
    else:
        print("\n".join(timeline(records)), file=out)
    return 0
