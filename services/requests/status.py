"""Who is running (issue 9): heartbeats kept in ``instances``, read back for
``cirrus status`` with each process's state, uptime and queue depths.

A process is UP while heard from within ``status.down_after`` seconds,
STOPPED once its last heartbeat said so (a clean stop), else DOWN. Rows not
heard from for ``status.forget_after`` seconds are forgotten.
"""
from datetime import datetime, timedelta

import amqp.exceptions
from kombu import Connection
from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert

from cirrus import messages
from cirrus.db import iso
from cirrus.db.models import Instance
from cirrus.errors import InvalidArgument, Unavailable

# the kinds of process, in the order status lists them
SERVICES = ("requests", "scheduler", "lifecycle", "flow", "gateway", "gate", "node")
ROLES = ("admin", "cloud-admin")     # who may see the status
BEAT_FIELDS = ("service", "host", "pid", "version", "started_at", "beat", "metrics_url",
               "queues", "queue_count", "hosts", "host_count")


def record(session, beat):
    """Keep ``beat`` as its process's row, unless the row holds a newer one
    (handlers run concurrently, so beats may be applied out of order): a
    later start, or a later beat of the same start."""
    now = func.now()
    values = {key: beat[key] for key in BEAT_FIELDS}
    values["started_at"] = datetime.fromisoformat(beat["started_at"])
    upsert = insert(Instance).values(name=beat["name"], last_seen=now,
                                     stopped_at=now if beat.get("stopping") else None,
                                     **values)
    new = upsert.excluded
    session.execute(upsert.on_conflict_do_update(
        index_elements=[Instance.name],
        set_={key: new[key] for key in (*BEAT_FIELDS, "last_seen", "stopped_at")},
        where=or_(new.started_at > Instance.started_at,
                  and_(new.started_at == Instance.started_at, new.beat > Instance.beat))))


def state(last_seen, stopped_at, now, down_after):
    """UP, DOWN (not heard from for more than ``down_after`` seconds) or STOPPED."""
    if stopped_at is not None:
        return "STOPPED"
    return "UP" if (now - last_seen).total_seconds() <= down_after else "DOWN"


def uptime(started_at, last_seen, now, current_state):
    """Seconds it has run: until now if it is up, else until it was last heard from."""
    end = now if current_state == "UP" else last_seen
    return max(0.0, (end - started_at).total_seconds())


def queue_depths(amqp_uri, names, timeout=5):
    """{name: {"name", "messages", "consumers", "missing"}} through passive
    declares on one connection; a queue that does not exist is missing."""
    depths = {}
    try:
        with Connection(amqp_uri, connect_timeout=timeout,
                        transport_options={"max_retries": 1}) as conn:
            channel = conn.channel()
            for name in names:
                try:
                    _, messages, consumers = channel.queue_declare(name, passive=True)
                    depths[name] = {"name": name, "messages": messages, "consumers": consumers,
                                    "missing": False}
                except amqp.exceptions.NotFound:
                    depths[name] = {"name": name, "messages": None, "consumers": None,
                                    "missing": True}
                    channel = conn.channel()    # the broker closed the one that asked
    except messages.BROKER_ERRORS as exc:
        raise Unavailable(f"cannot reach the message broker for queue depths: {exc}") from None
    return depths


def instance_dict(row, now, down_after, depths):
    current = state(row.last_seen, row.stopped_at, now, down_after)
    return {"name": row.name, "service": row.service, "host": row.host, "pid": row.pid,
            "version": row.version, "state": current, "started_at": iso(row.started_at),
            "last_seen": iso(row.last_seen), "stopped_at": iso(row.stopped_at),
            "uptime_seconds": uptime(row.started_at, row.last_seen, now, current),
            "last_seen_seconds": max(0.0, (now - row.last_seen).total_seconds()),
            "metrics_url": row.metrics_url, "queues": [depths[name] for name in row.queues],
            "queue_count": row.queue_count, "hosts": row.hosts, "host_count": row.host_count}


def order(row):
    kind = SERVICES.index(row.service) if row.service in SERVICES else len(SERVICES)
    return kind, row.service, row.name


def report(session, amqp_uri, settings, service=None):
    """Every process heard from (of ``service``, if given), forgetting those
    silent for longer than ``forget_after``."""
    if service is not None and service not in SERVICES:
        raise InvalidArgument(f"service: unknown service {service!r}; choose from "
                              f"{', '.join(SERVICES)}")
    now = session.scalar(select(func.now()))
    session.execute(delete(Instance).where(
        Instance.last_seen < now - timedelta(seconds=settings["forget_after"])))
    query = select(Instance)
    if service is not None:
        query = query.where(Instance.service == service)
    rows = sorted(session.scalars(query), key=order)
    names = sorted({name for row in rows for name in row.queues})
    depths = queue_depths(amqp_uri, names) if names else {}
    return {"instances": [instance_dict(row, now, settings["down_after"], depths)
                          for row in rows],
            "heartbeat_interval": settings["heartbeat_interval"],
            "down_after": settings["down_after"]}
