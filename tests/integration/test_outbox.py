"""The outbox relay on the real database and broker: a row is claimed by one
relay (never sent by two), and a batch whose broker connection drops is
kept whole for the next attempt (never lost)."""
import socket
import threading
import uuid
from datetime import timedelta

import pytest
from kombu import Connection
from sqlalchemy import func, select, update

from cirrus import db, messages, outbox
from cirrus.db.models import Outbox, utcnow
from tests.broker import FakeNodeTransport


@pytest.fixture
def factory(cirrus_env):
    factory = db.session_factory()
    with factory() as s, s.begin():
        s.execute(Outbox.__table__.delete())    # rows other tests of this session left
    return factory


def write_commands(factory, host, n):
    """n driver commands for ``host`` committed to the outbox, as a service
    writes them; returns their ids."""
    with factory() as s, s.begin():
        for i in range(n):      # one row each: written together, they would be one message
            outbox.add_command(s, {"id": f"c{i}", "action": "poll", "vm_id": i, "host": host,
                                   "args": {}})
        return s.info.pop("outbox")


def received(node):
    """The vm_ids of the commands waiting on a node's queue, taken off it."""
    return [cmd["vm_id"] for cmd in node.waiting_commands()]


def left_in_outbox(factory):
    with factory() as s:
        return s.scalar(select(func.count()).select_from(Outbox))


def age(factory):
    """Make every row look left behind by a crash: older than the sweep's grace."""
    with factory() as s, s.begin():
        s.execute(update(Outbox).values(created_at=utcnow() - outbox.SWEEP_GRACE
                                        - timedelta(seconds=1)))


def race(*calls):
    errors = []

    def run(call):
        try:
            call()
        except Exception as exc:   # reported below, in the test's thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_two_relays_publishing_the_same_rows_send_each_once(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-twice")
    ids = write_commands(factory, "outbox-twice", 600)
    one, two = (outbox.Relay(amqp_uri, factory, batch=50) for _ in range(2))
    # both try every row, in opposite orders, at the same time
    race(lambda: one.publish_ids(ids), lambda: two.publish_ids(ids[::-1]))
    assert sorted(received(node)) == list(range(600))
    assert left_in_outbox(factory) == 0


def test_two_sweeps_send_each_left_behind_row_once(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-sweep")
    write_commands(factory, "outbox-sweep", 500)
    age(factory)
    one, two = (outbox.Relay(amqp_uri, factory, batch=40) for _ in range(2))
    counts = []
    race(lambda: counts.append(one.flush()), lambda: counts.append(two.flush()))
    assert sum(counts) == 500
    assert sorted(received(node)) == list(range(500))


def test_a_sweep_leaves_young_rows_to_their_own_relay(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-young")
    write_commands(factory, "outbox-young", 3)
    assert outbox.Relay(amqp_uri, factory).flush() == 0
    assert received(node) == [] and left_in_outbox(factory) == 3


class DroppingPublisher(outbox.ConfirmingPublisher):
    """Its broker connection dies after ``after`` messages of a batch, on
    each of its first ``drops`` connections."""

    def __init__(self, amqp_uri, after, drops=1000):
        super().__init__(amqp_uri)
        self.after, self.drops = after, drops

    def _open(self):
        fresh = self.channel is None
        super()._open()
        if fresh and self.drops > 0:
            self.drops -= 1
            publish, count = self.channel.basic_publish, [0]

            def dropping(*args, **kwargs):
                count[0] += 1
                if count[0] == self.after:
                    self.connection.connection.transport.sock.shutdown(socket.SHUT_RDWR)
                return publish(*args, **kwargs)
            self.channel.basic_publish = dropping


def test_a_connection_dropped_mid_batch_keeps_every_row_for_the_next_try(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-drop")
    ids = write_commands(factory, "outbox-drop", 200)
    relay = outbox.Relay(amqp_uri, factory, batch=100)
    relay.publisher = DroppingPublisher(amqp_uri, after=30)
    with pytest.raises(Exception):
        relay.publish_ids(ids)
    assert left_in_outbox(factory) == 200     # the claim rolled back: nothing deleted
    relay.publisher.drops = 0                   # the broker is back
    relay.publish_ids(ids)
    got = received(node)
    # at least once: every command arrives; none is lost
    assert set(got) == set(range(200))
    assert left_in_outbox(factory) == 0


def test_a_failed_send_after_commit_is_left_to_the_sweep(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-later")
    relay = outbox.Relay(amqp_uri, factory)
    relay.publisher = DroppingPublisher(amqp_uri, after=1)
    with relay.transaction() as s:
        outbox.add_command(s, {"id": "x", "action": "poll", "vm_id": 7, "host": "outbox-later",
                               "args": {}})
    assert relay.wait_sent(30)
    assert left_in_outbox(factory) == 1 and received(node) == []
    relay.publisher.drops = 0
    age(factory)
    assert relay.flush() == 1
    assert received(node) == [7]


def test_a_send_after_commit_tries_once_more_on_a_fresh_connection(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-again")
    relay = outbox.Relay(amqp_uri, factory)
    relay.publisher = DroppingPublisher(amqp_uri, after=2, drops=1)
    with relay.transaction() as s:
        for vm_id in range(5):
            outbox.add_command(s, {"id": f"a{vm_id}", "action": "poll", "vm_id": vm_id,
                                   "host": "outbox-again", "args": {}})
    assert relay.wait_sent(30)
    assert received(node) == list(range(5))
    assert left_in_outbox(factory) == 0


def test_a_transaction_publishes_its_rows_after_commit_and_none_on_rollback(factory, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "outbox-commit")
    relay = outbox.Relay(amqp_uri, factory)
    with pytest.raises(RuntimeError):
        with relay.transaction() as s:
            outbox.add_command(s, {"id": "no", "action": "poll", "vm_id": 1,
                                   "host": "outbox-commit", "args": {}})
            raise RuntimeError("the change fails")
    with relay.transaction() as s:
        outbox.add_event(s, messages.LIFECYCLE, messages.HOST_STATE, {"id": 0})
        for vm_id in (2, 3):
            outbox.add_command(s, {"id": f"yes{vm_id}", "action": "poll", "vm_id": vm_id,
                                   "host": "outbox-commit", "args": {}})
    assert relay.wait_sent(30)
    assert received(node) == [2, 3]
    assert left_in_outbox(factory) == 0


def test_commands_written_together_go_to_each_host_as_one_message(factory, amqp_uri):
    nodes = {name: FakeNodeTransport(amqp_uri, name) for name in ("outbox-a", "outbox-b")}
    relay = outbox.Relay(amqp_uri, factory)
    with relay.transaction() as s:
        outbox.add_many(s, [outbox.command_row({"id": f"m{vm_id}", "action": "poll",
                                                "vm_id": vm_id, "host": host, "args": {}})
                            for vm_id, host in ((1, "outbox-a"), (2, "outbox-b"),
                                                (3, "outbox-a"), (4, "outbox-a"))]
                        + [outbox.event_row(messages.LIFECYCLE, messages.HOST_STATE, {"id": 0})])
        assert len(s.info["outbox"]) == 3     # a message per host, and the event
    assert relay.wait_sent(30)
    bodies = {name: node.queue.get(no_ack=True).payload for name, node in nodes.items()}
    assert [[cmd["vm_id"] for cmd in messages.commands_in(body)]
            for body in bodies.values()] == [[1, 3, 4], [2]]
    assert all(node.queue.get(no_ack=True) is None for node in nodes.values())
    assert left_in_outbox(factory) == 0


def test_a_command_for_a_host_whose_queue_does_not_exist_yet_waits_there(factory, amqp_uri):
    """The broker returns a command no queue takes; the relay declares the
    host's queue and sends it again, so the node finds it when it starts."""
    host = f"outbox-new-{uuid.uuid4().hex[:6]}"
    relay = outbox.Relay(amqp_uri, factory)
    with relay.transaction() as s:
        outbox.add_command(s, {"id": "first", "action": "poll", "vm_id": 5, "host": host,
                               "args": {}})
    assert relay.wait_sent(30) and left_in_outbox(factory) == 0
    relay.publish_ids(write_commands(factory, host, 2))    # the queue exists now
    with Connection(amqp_uri) as conn:
        _, waiting, consumers = conn.default_channel.queue_declare(
            messages.node_queue(host).name, passive=True)
    assert (waiting, consumers) == (3, 0)
    assert [cmd["vm_id"] for cmd in FakeNodeTransport(amqp_uri, host).waiting_commands()] == \
        [5, 0, 1]
