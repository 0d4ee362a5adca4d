"""Heartbeats: every process says every few seconds that it is alive.

``start(identity)`` (from ``cirrus.instance.start``) runs a daemon thread --
a green thread in the eventlet processes, whose ``threading`` is patched, a
real one in the gateway -- that publishes a ``heartbeat`` event from the
source ``cirrus`` every ``status.heartbeat_interval`` seconds, and ``stop()``
sends a last one marked stopping on a clean stop. The ``requests`` service
keeps the newest of each process in the table ``instances`` for ``cirrus
status``. What the process consumes and serves is told with ``serving``.

Heartbeats do not go through the outbox and are not persistent: a lost beat
is harmless, the next one says the same, and one that waited in a queue for
longer than ``status.down_after`` expires, so a backlog never makes a dead
process look alive.
"""
import itertools
import logging
import os
import threading
from datetime import datetime, timezone

from kombu import Connection, Producer

from cirrus import config, messages, metrics
from cirrus.config import ConfigError

log = logging.getLogger("cirrus.heartbeat")

SOURCE = "cirrus"           # the Nameko event source: exchange cirrus.events
HEARTBEAT = "heartbeat"     # the event type
EXCHANGE = messages.event_exchange(SOURCE)
# queues and hosts named in one beat: a simulator of 2,500 hosts sends the
# first ones and the counts, not 2,500 names every few seconds
SAMPLE = 20
DEFAULTS = {"heartbeat_interval": 5, "down_after": 15, "forget_after": 3600}
CONNECT_TIMEOUT = 5         # seconds

_serving = {"queues": [], "hosts": []}
_current = None
# beats of this process, counted across restarts of its heartbeat (the gate's
# around its forks), as the requests service keeps only a higher count
_beats = itertools.count(1)


def settings(cfg=None):
    """The ``status`` section in seconds, with its defaults; ConfigError names a bad key."""
    cfg = config.get() if cfg is None else cfg
    merged = {**DEFAULTS, **(cfg.get("status") or {})}
    out = {}
    for key in DEFAULTS:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"status.{key}: {value!r} is not a number of seconds above 0")
        out[key] = float(value)
    if out["down_after"] <= out["heartbeat_interval"]:
        raise ConfigError(f"status.down_after ({out['down_after']:g} s) must be above "
                          f"status.heartbeat_interval ({out['heartbeat_interval']:g} s), or "
                          f"every process would be down between two beats")
    return out


def serving(queues=(), hosts=()):
    """Tells the heartbeat the queues this process consumes and the hosts it serves."""
    _serving["queues"] = list(queues)
    _serving["hosts"] = list(hosts)


def nameko_queues(containers):
    """The shared queues of Nameko service containers: rpc-<service> and
    their event handlers' evt- queues; not the process's own reply queue,
    which expires once it is gone."""
    names = set()
    for container in containers:
        for extension in container.extensions:
            queue = getattr(extension, "queue", None)
            if queue is None or queue.auto_delete or queue.exclusive or \
                    "x-expires" in (queue.queue_arguments or {}):
                continue
            names.add(queue.name)
    return sorted(names)


def iso(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def payload(identity, beat, stopping=False):
    """One heartbeat: who, how many beats so far, where to scrape, what it serves."""
    queues, hosts = _serving["queues"], _serving["hosts"]
    return {"name": identity.name, "service": identity.service, "host": identity.host,
            "pid": identity.pid, "version": identity.version,
            "started_at": iso(identity.started_at), "beat": beat, "stopping": stopping,
            "metrics_url": metrics.endpoint(),
            "queues": queues[:SAMPLE], "queue_count": len(queues),
            "hosts": hosts[:SAMPLE], "host_count": len(hosts)}


class Heartbeat:
    """Publishes ``payload`` every ``interval`` seconds on a connection of its
    own, and once more, marked stopping, when stopped."""

    def __init__(self, identity, amqp_uri, interval, expiration):
        self.identity = identity
        self.amqp_uri = amqp_uri
        self.interval = interval
        self.expiration = expiration
        self.pid = os.getpid()
        self.final = True           # a last beat, marked stopping, when stopped
        self.failing = False
        self.connection = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="heartbeat", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self, timeout=5.0, final=True):
        self.final = final
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def run(self):
        # a copy that a fork left in a child ends there: the child beats for itself
        while os.getpid() == self.pid:
            if self.stopping.is_set():
                if self.final:
                    self.send(stopping=True)
                self.close()
                return
            self.send()
            self.stopping.wait(self.interval)

    def send(self, stopping=False):
        body = payload(self.identity, next(_beats), stopping)
        try:
            if self.connection is None:
                self.connection = Connection(
                    self.amqp_uri, connect_timeout=CONNECT_TIMEOUT, transport_options={
                        "max_retries": 1, "client_properties": {
                            "connection_name": f"cirrus-heartbeat:{self.identity.name}"}})
                EXCHANGE(self.connection.default_channel).declare()
            # the stopping beat does not expire: "stopped" is worth keeping
            Producer(self.connection.default_channel).publish(
                body, exchange=EXCHANGE, routing_key=HEARTBEAT, serializer="json",
                delivery_mode=1, retry=False,
                expiration=None if stopping else self.expiration)
        except Exception as exc:
            if not self.failing:
                log.warning("heartbeat not sent (%s); trying again every %g s",
                            exc, self.interval)
            self.failing = True
            self.close()
            return
        if self.failing:
            log.info("heartbeats sent again")
            self.failing = False

    def close(self):
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                log.debug("closing the heartbeat connection failed", exc_info=True)


def start(identity):
    """Start this process's heartbeat (again in a forked child, whose copy of
    the parent's stops by itself without touching the parent's connection)."""
    global _current
    cfg = config.get()
    status = settings(cfg)
    _current = Heartbeat(identity, cfg["amqp"]["uri"], status["heartbeat_interval"],
                         expiration=status["down_after"]).start()
    return _current


def stop(timeout=5.0, final=True):
    """Send the last heartbeat, marked stopping, on a clean stop. Without
    ``final``, just stop beating: before a fork, so that no beat is half
    sent through a connection the child would share (each process then
    starts its own)."""
    if _current is not None and _current.pid == os.getpid():
        _current.stop(timeout, final)
