"""The CMDB sink: a record for every provisioned VM or service, every request
that ends without one, and every VM that reaches DONE.

Records are first written to ``cmdb_outbox`` in the transaction of the change
they describe, then delivered by the configured sink; one that fails stays
there and is retried with a growing delay, so a CMDB that is down loses
nothing. Delivery is at least once: each record carries ``record_id``.

Sinks (``requests.cmdb_sink``): ``jsonl`` appends one JSON line per record to
``requests.cmdb_path``; ``webhook`` POSTs the record as JSON to
``requests.cmdb_url``, trying ``requests.cmdb_retries`` times per delivery;
``none`` keeps nothing (the records are dropped as delivered).
"""
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from cirrus.db.models import CmdbOutbox, utcnow

log = logging.getLogger(__name__)

MAX_BACKOFF = 300       # seconds between two deliveries of a failing record, at most
BATCH = 100


class SinkError(Exception):
    """The CMDB did not take a record."""


class JsonLinesSink:
    def __init__(self, path):
        self.path = Path(path)
        self.lock = threading.Lock()

    def send(self, record):
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self.lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as out:
                    out.write(line)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                raise SinkError(f"cannot append to {self.path}: {exc}") from exc


class WebhookSink:
    def __init__(self, url, retries=3, timeout=5.0, pause=0.5):
        self.url = url
        self.retries = max(1, int(retries))
        self.timeout = float(timeout)
        self.pause = float(pause)

    def send(self, record):
        body = json.dumps(record, default=str).encode()
        error = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.pause * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    if 200 <= answer.status < 300:
                        return
                    error = f"HTTP {answer.status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                error = str(getattr(exc, "reason", exc))
        raise SinkError(f"{self.url}: {error} after {self.retries} attempts")


class NoSink:
    def send(self, record):
        pass


def make_sink(settings):
    kind = str(settings.get("cmdb_sink") or "jsonl")
    if kind == "jsonl":
        return JsonLinesSink(settings.get("cmdb_path") or "/var/tmp/cirrus/cmdb.jsonl")
    if kind == "webhook":
        if not settings.get("cmdb_url"):
            raise ValueError("requests.cmdb_sink is webhook but requests.cmdb_url is not set")
        return WebhookSink(settings["cmdb_url"], settings.get("cmdb_retries", 3),
                           settings.get("cmdb_timeout", 5))
    if kind == "none":
        return NoSink()
    raise ValueError(f"requests.cmdb_sink: unknown sink {kind!r}; choose jsonl, webhook or none")


def enqueue(session, record):
    """Queue a record in the caller's transaction; it gets its record_id here."""
    row = CmdbOutbox(record=record)
    session.add(row)
    session.flush()
    row.record = {**record, "record_id": row.id}
    return row.id


def backoff(attempts):
    return timedelta(seconds=min(MAX_BACKOFF, 2 ** min(attempts, 16)))


def deliver_due(session_factory, sink, ids=None):
    """Send the records that are due (or those of ``ids``, due or not); a
    record sent is removed, a failed one waits longer. Returns (sent, failed).
    Rows are taken FOR UPDATE SKIP LOCKED, so several instances share the work."""
    sent = failed = 0
    with session_factory() as session, session.begin():
        query = select(CmdbOutbox).order_by(CmdbOutbox.id).limit(BATCH) \
            .with_for_update(skip_locked=True)
        query = query.where(CmdbOutbox.id.in_(ids)) if ids else \
            query.where(CmdbOutbox.next_attempt_at <= utcnow())
        for row in session.scalars(query).all():
            try:
                sink.send(row.record)
            except SinkError as exc:
                row.attempts += 1
                row.last_error = str(exc)
                row.next_attempt_at = utcnow() + backoff(row.attempts)
                failed += 1
                log.warning("CMDB record %s not delivered (attempt %s): %s", row.id,
                            row.attempts, exc)
                continue
            session.delete(row)
            sent += 1
    return sent, failed


def pending(session):
    """The records still waiting, with their attempts and last error."""
    return [{"id": r.id, "attempts": r.attempts, "last_error": r.last_error,
             "next_attempt_at": r.next_attempt_at.isoformat(), "record": r.record}
            for r in session.scalars(select(CmdbOutbox).order_by(CmdbOutbox.id))]
