"""The transactional outbox.

A service writes the messages a change causes into the ``outbox`` table in the
same transaction as the change. After commit the relay *claims* those rows in
a transaction of its own (``DELETE ... RETURNING`` over the rows it can lock,
SKIP LOCKED), publishes them, waits once for the broker's confirms of the
whole batch, and only then commits the delete. So:

- a row is never sent by two relays: a claimed row stays locked until its
  publisher commits, and another relay skips it (or finds it gone);
- a row is never lost: if publishing or a confirm fails, or the process
  dies, the claim rolls back and the row waits for the next sweep.

Delivery is at least once (a crash between confirms and commit sends the
batch again): consumers treat a repeat as a no-op (VM events carry ``seq``,
driver results a command id).
"""
import logging
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import amqp
from amqp import spec
from kombu import Connection
from sqlalchemy import Text, bindparam, cast, extract, func, select

from cirrus import bulk, messages, metrics, tracing
from cirrus.db.models import Outbox, utcnow

log = logging.getLogger(__name__)

# The sweep leaves younger rows to the relay of the transaction that wrote
# them, which publishes them right after its commit. Only contention, not
# correctness, depends on it: a row is claimed by one relay whatever its age.
SWEEP_GRACE = timedelta(seconds=5)
# how long a batch may wait for its publisher confirms before it counts as failed
CONFIRM_TIMEOUT = 30
JSON = "application/json"

_outbox = Outbox.__table__
_INSERT = bulk.insert(_outbox, ("exchange", "routing_key", "payload", "headers"), returning="id")


def add_many(session, rows):
    """Write messages, each a dict of exchange, routing_key, payload and
    headers, merged into as few as ``merge`` can, in one INSERT; their ids
    are kept in ``session.info`` for the relay to publish after commit. A
    row without a request id in its headers takes the current one
    (cirrus.tracing), which Nameko hands the handler."""
    if not rows:
        return
    ids = session.execute(_INSERT, bulk.params(tracing.stamp(merge(rows)))
                          ).scalars().all()
    session.info.setdefault("outbox", []).extend(ids)


def event_row(source, event_type, payload, headers=None):
    return {"exchange": messages.event_exchange(source).name, "routing_key": event_type,
            "payload": payload, "headers": headers or {}}


def command_row(cmd):
    return {"exchange": messages.COMMANDS.name, "routing_key": cmd["host"],
            "payload": {"commands": [cmd]}, "headers": {}}


def merge(rows):
    """``rows`` as fewer messages, in the order given: the driver commands for
    each host merged into its first row (``messages.commands_in``), and the
    ``vm.state`` events under one routing key into one row
    (``events_row``), each VM's events still in their order: an event joins
    its key's row only if no later row holds one of its VM's."""
    merged, by_host, by_key, last_of_vm = [], {}, {}, {}
    for row in rows:
        key = row["routing_key"]
        if row["exchange"] == messages.COMMANDS.name:
            if key not in by_host:
                by_host[key] = {**row, "payload": {"commands": []}}
                merged.append(by_host[key])
            by_host[key]["payload"]["commands"].extend(row["payload"]["commands"])
        elif key.startswith(messages.VM_STATE + "."):
            vm_id, at = row["payload"]["id"], by_key.get(key)
            if at is None or last_of_vm.get(vm_id, -1) > at:
                at = by_key[key] = len(merged)
                merged.append([])
            merged[at].append(row)
            last_of_vm[vm_id] = at
        else:
            merged.append(row)
    return [row if not isinstance(row, list) else row[0] if len(row) == 1 else events_row(row)
            for row in merged]


def events_row(rows):
    """One row of several ``vm.state`` event rows under one routing key; each
    event keeps the request id its row's headers gave it, as ``request_id``."""
    return {**rows[0], "headers": {}, "payload": {"events": [
        {tracing.KEY: (row.get("headers") or {}).get(tracing.HEADER), **row["payload"]}
        for row in rows]}}


def add_event(session, source, event_type, payload, headers=None):
    add_many(session, [event_row(source, event_type, payload, headers)])


def add_command(session, cmd):
    add_many(session, [command_row(cmd)])


def claim(rows_wanted):
    """DELETE ... RETURNING of the outbox rows ``rows_wanted`` (a select of
    ids) that no other transaction holds: they are this transaction's to
    publish, and come back if it rolls back."""
    return (_outbox.delete()
            .where(_outbox.c.id.in_(rows_wanted.with_for_update(skip_locked=True)
                                    .scalar_subquery()))
            # the payload as the JSON text it is stored as: published as it is
            .returning(_outbox.c.id, _outbox.c.exchange, _outbox.c.routing_key,
                       cast(_outbox.c.payload, Text).label("payload"), _outbox.c.headers,
                       # seconds since written, by the database's clock (for the lag metric)
                       extract("epoch", func.clock_timestamp() - _outbox.c.created_at)
                       .label("waited")))


# built once: after every commit the relay claims its rows by id, and building
# the statement anew each time cost more than running it
CLAIM_IDS = claim(select(_outbox.c.id).where(_outbox.c.id == func.any(bindparam("ids")))
                  .order_by(_outbox.c.id))
CLAIM_OLD = claim(select(_outbox.c.id).where(_outbox.c.created_at < bindparam("before"))
                  .order_by(_outbox.c.id).limit(bindparam("limit")))


class ConfirmingPublisher:
    """One channel in confirm mode: ``publish_all`` sends a batch and waits
    once for the broker to confirm every message of it (a nack or a dropped
    connection raises; the caller then keeps the rows). Thread-safe (green
    threads under eventlet): batches go out one at a time.

    A driver command is published *mandatory*: if its host's queue does not
    exist yet (the node never started) the broker returns it, and it goes
    again once the queue is declared. Declaring every node queue up front
    instead costs the broker a durable binding write per queue and channel:
    seconds for 2,500 hosts."""

    def __init__(self, amqp_uri):
        self.amqp_uri = amqp_uri
        self.lock = threading.Lock()
        self.connection = self.channel = None

    def _open(self):
        if self.channel is None:
            self.connection = Connection(self.amqp_uri)
            self.channel = self.connection.channel()
            self.channel.confirm_select()
            self.declared = set()   # exchanges declared on this channel
            self.tag = 0            # delivery tags count the channel's publishes from 1
            self.unconfirmed = set()
            self.nacked = []
            self.returned = []      # (routing key, message) the broker could not route
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)

    def _on_ack(self, tag, multiple):
        if multiple:
            self.unconfirmed = {t for t in self.unconfirmed if t > tag}
        else:
            self.unconfirmed.discard(tag)

    def _on_nack(self, tag, multiple):
        self.nacked.append(tag)
        self._on_ack(tag, multiple)

    def _on_return(self, exc, exchange, routing_key, message):
        self.returned.append((routing_key, message))

    def close(self):
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:   # already gone: nothing to tidy
                log.debug("closing the outbox connection failed", exc_info=True)

    def _declare(self, exchange_name):
        """The exchange, declared once per channel, without waiting for an
        answer: a declaration the broker refuses closes the channel, and the
        batch fails as any other publish would."""
        if exchange_name not in self.declared:
            exchange(exchange_name)(self.channel).declare(nowait=True)
            self.declared.add(exchange_name)
        return exchange_name

    def publish_all(self, rows):
        with self.lock:
            try:
                self._open()
                self._send([(self._declare(row.exchange), row.routing_key,
                             amqp.Message(row.payload, content_type=JSON,
                                          content_encoding="utf-8",
                                          application_headers=row.headers or {},
                                          delivery_mode=2))
                            for row in rows])
                if self.returned:
                    returned, self.returned = self.returned, []
                    for host in {routing_key for routing_key, _ in returned}:
                        messages.node_queue(host)(self.channel).declare()
                    self._send([(messages.COMMANDS.name, routing_key, message)
                                for routing_key, message in returned])
                    if self.returned:
                        raise RuntimeError(f"no queue took {len(self.returned)} driver commands")
            except Exception:
                self.close()    # a half-confirmed channel is not reused
                raise

    def _send(self, publishes):
        """Publish [(exchange name, routing key, amqp.Message)] and wait for
        every confirm; driver commands are mandatory."""
        transport = self.connection.connection.transport
        send, frames = transport._write, bytearray()
        # py-amqp writes each message to the socket at once; gathering the
        # batch's frames into one write makes a batch cost one send, not one
        # per message (the biggest cost of a publish)
        transport._write = frames.extend
        try:
            for exchange_name, routing_key, message in publishes:
                self.channel.basic_publish(
                    message, exchange=exchange_name, routing_key=routing_key,
                    mandatory=exchange_name == messages.COMMANDS.name)
                self.tag += 1
                self.unconfirmed.add(self.tag)
        finally:
            transport._write = send
        send(frames)
        while self.unconfirmed:
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=CONFIRM_TIMEOUT)
        if self.nacked:
            nacked, self.nacked = self.nacked, []
            raise RuntimeError(f"the broker refused {len(nacked)} outbox messages")


def exchange(name):
    """The kombu Exchange an outbox row names."""
    if name == messages.COMMANDS.name:
        return messages.COMMANDS
    return messages.event_exchange(name.removesuffix(".events"))


class Relay:
    """Publishes outbox rows: a transaction's own rows right after its commit
    (by a sender thread, so the committing caller does not wait for the
    broker), and, in ``flush``, rows older than SWEEP_GRACE that a crash or
    an outage left behind. Any number of relays may run: each row is
    claimed by one."""

    def __init__(self, amqp_uri, session_factory, batch=1000):
        self.publisher = ConfirmingPublisher(amqp_uri)
        self.session_factory = session_factory
        self.batch = batch
        self.queued = []            # ids committed and not yet handed to the publisher
        self.queue_lock = threading.Lock()
        self.sender = None
        self.idle = threading.Event()
        self.idle.set()

    @contextmanager
    def transaction(self):
        """A session in a transaction; what it wrote to the outbox is published
        right after commit. If that fails the rows stay, for ``flush``."""
        with self.session_factory() as session:
            with session.begin():
                yield session
            written = session.info.pop("outbox", [])
            tracing.committed(session)      # the log lines of what it did
        if written:
            self.after_commit(written)

    def after_commit(self, ids):
        """Queue committed rows for the sender thread (a green thread under
        eventlet), started if none runs. Rows of transactions that commit
        close together go out in one batch, with one wait for confirms."""
        with self.queue_lock:
            self.queued.extend(ids)
            if self.sender is None:
                self.idle.clear()
                self.sender = threading.Thread(target=self._send_queued, daemon=True,
                                               name="outbox-sender")
                self.sender.start()

    def _send_queued(self):
        while True:
            with self.queue_lock:
                ids, self.queued = self.queued[:self.batch], self.queued[self.batch:]
                if not ids:
                    self.sender = None
                    self.idle.set()
                    return
            try:
                self.publish_ids(ids)
            except Exception:
                # once more on a fresh connection (the broker may have closed
                # an idle one), else the sweep sends them
                try:
                    self.publish_ids(ids)
                except Exception:
                    log.warning("outbox publish after commit failed; the sweep will retry",
                                exc_info=True)

    def wait_sent(self, timeout=None):
        """Until the sender has handed every queued row to the broker (or
        given up on it, leaving it to the sweep); False on timeout."""
        return self.idle.wait(timeout)

    def publish_claimed(self, claim_rows, params):
        """Claim the rows the statement ``claim_rows`` (CLAIM_IDS, CLAIM_OLD)
        selects with ``params``, publish them, wait for the confirms, then
        commit; returns how many were sent. Raises (and keeps the rows) if
        publishing fails."""
        with self.session_factory() as session, session.begin():
            rows = sorted(session.execute(claim_rows, params).all(), key=lambda r: r.id)
            if rows:
                started = time.monotonic()
                self.publisher.publish_all(rows)
                metrics.outbox_published([row.waited for row in rows],
                                         time.monotonic() - started)
            return len(rows)

    def publish_ids(self, ids):
        for start in range(0, len(ids), self.batch):
            self.publish_claimed(CLAIM_IDS, {"ids": ids[start:start + self.batch]})

    def flush(self):
        """Publish rows that a crash or an outage left behind; returns how many."""
        sent = 0
        while True:
            done = self.publish_claimed(CLAIM_OLD, {"before": utcnow() - SWEEP_GRACE,
                                                    "limit": self.batch})
            sent += done
            if done < self.batch:
                return sent
