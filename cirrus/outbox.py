"""The transactional outbox.

A service writes the messages a change causes into the ``outbox`` table in the
same transaction as the change. ``Relay.flush`` then publishes them with
publisher confirms and deletes them, so a message is never lost when a process
dies after commit, and never sent for a change that rolled back. Delivery is at
least once: consumers treat a repeat as a no-op (VM events carry ``seq``,
driver results a command id).
"""
import logging
from contextlib import contextmanager
from datetime import timedelta

from kombu import Connection
from kombu.pools import producers
from sqlalchemy import delete, select

from cirrus import messages
from cirrus.db.models import Outbox, utcnow

log = logging.getLogger(__name__)


# The sweep leaves younger rows to the relay of the transaction that wrote
# them, which deletes what it published in batches, at its next flush.
SWEEP_GRACE = timedelta(seconds=5)


def add(session, exchange, routing_key, payload, headers=None):
    row = Outbox(exchange=exchange, routing_key=routing_key, payload=payload,
                 headers=headers or {})
    session.add(row)
    session.info.setdefault("outbox", []).append(row)


def add_event(session, source, event_type, payload, headers=None):
    add(session, messages.event_exchange(source).name, event_type, payload, headers)


def add_command(session, cmd):
    add(session, messages.COMMANDS.name, cmd["host"], cmd)


class Relay:
    """Publishes outbox rows: a transaction's own rows right after its commit,
    and, in ``flush``, rows older than SWEEP_GRACE that a crash or an outage
    left behind. Several relays may sweep at once: each takes rows with SKIP
    LOCKED, so two sweeps never send the same row."""

    def __init__(self, amqp_uri, session_factory, batch=500):
        self.connection = Connection(amqp_uri, transport_options={"confirm_publish": True})
        self.session_factory = session_factory
        self.batch = batch
        # ids published after commit, deleted in one statement by the next flush;
        # a crash before that only means they are sent again
        self.published = []

    @contextmanager
    def transaction(self):
        """A session in a transaction; what it wrote to the outbox is published
        right after commit. If that fails the rows stay, for ``flush``."""
        with self.session_factory() as session:
            with session.begin():
                yield session
            written = session.info.pop("outbox", [])
            if written:
                try:
                    self._publish(written)
                    self.published.extend(row.id for row in written)
                except Exception:
                    log.warning("outbox publish after commit failed; the sweep will retry",
                                exc_info=True)

    def _exchange(self, row):
        if row.exchange == messages.COMMANDS.name:
            return messages.COMMANDS, [messages.node_queue(row.routing_key)]
        return messages.event_exchange(row.exchange.removesuffix(".events")), []

    def _publish(self, rows):
        with producers[self.connection].acquire(block=True) as producer:
            for row in rows:
                exchange, queues = self._exchange(row)
                producer.publish(
                    row.payload, exchange=exchange, routing_key=row.routing_key,
                    headers=row.headers, serializer="json", delivery_mode=2,
                    declare=[exchange, *queues], retry=True, retry_policy={"max_retries": 3})

    def flush(self):
        """Delete what was published after commit, then publish rows that a
        crash or an outage left behind; returns how many of those it sent."""
        done, self.published = self.published, []
        if done:
            with self.session_factory() as session, session.begin():
                session.execute(delete(Outbox).where(Outbox.id.in_(done)))
        sent = 0
        while True:
            with self.session_factory() as session, session.begin():
                rows = session.scalars(
                    select(Outbox).where(Outbox.created_at < utcnow() - SWEEP_GRACE)
                    .order_by(Outbox.id).limit(self.batch)
                    .with_for_update(skip_locked=True)).all()
                if not rows:
                    return sent
                self._publish(rows)
                session.execute(delete(Outbox).where(Outbox.id.in_([r.id for r in rows])))
                sent += len(rows)
            if len(rows) < self.batch:
                return sent
