"""A message of several VM state changes, as lifecycle's outbox sends the
changes one transaction made under one routing key, reaching a Nameko
handler (``vm_state_handler``) in a real service process: each change is
handled on its own, for the request it names, and the message is acked once
all are done, or comes back whole if one of them asks for that."""
import json

import pytest
from kombu import Connection

from cirrus import db, messages, outbox, tracing
from tests.procs import Proc, wait_until

# Nameko's name for the queue of tests/event_probe.py (a process: importing it
# here would monkey-patch this one)
PROBE_QUEUE = "evt-lifecycle-vm.state--event_probe.on_vm_state"


@pytest.fixture
def probe(cirrus_env, tmp_path):
    heard = tmp_path / "heard.jsonl"
    heard.touch()
    proc = Proc(["python", "-m", "tests.event_probe", str(heard)], cirrus_env,
                tmp_path / "probe.log").start()
    proc.wait_for("event_probe started")
    proc.heard = lambda: [json.loads(line) for line in heard.read_text().splitlines()]
    yield proc
    proc.stop()


def publish(amqp_uri, changes):
    relay = outbox.Relay(amqp_uri, db.session_factory())
    key = messages.vm_state_key("PROBE")
    with relay.transaction() as session:
        outbox.add_many(session, [
            outbox.event_row(messages.LIFECYCLE, key, {"id": vm_id, **extra},
                             tracing.headers(request_id))
            for vm_id, request_id, extra in changes])
        assert len(session.info["outbox"]) == 1     # one message for all of them
    assert relay.wait_sent(30)


def waiting_in_queue(amqp_uri):
    """Messages ready in the probe's queue: an unacked one is back there once
    its consumer has gone."""
    with Connection(amqp_uri) as conn:
        return conn.default_channel.queue_declare(PROBE_QUEUE, passive=True)[1]


def test_each_change_of_a_message_is_handled_for_its_own_request_and_acked_once(
        probe, amqp_uri):
    publish(amqp_uri, [(1, "req-a", {}), (2, "req-b", {}), (3, None, {})])
    heard = wait_until(lambda: len(probe.heard()) == 3 and probe.heard(), timeout=20,
                       what="three changes handled")
    assert sorted((h["id"], h["request_id"]) for h in heard) == \
        [(1, "req-a"), (2, "req-b"), (3, None)]
    probe.stop()
    assert waiting_in_queue(amqp_uri) == 0


def test_a_change_that_fails_puts_the_whole_message_back(probe, amqp_uri):
    publish(amqp_uri, [(11, "req-c", {}), (12, "req-d", {"fail": True}), (13, "req-e", {})])
    wait_until(lambda: 12 in {h["id"] for h in probe.heard()}, timeout=20,
               what="the failed change handled on redelivery")
    wait_until(lambda: len(probe.heard()) == 5, timeout=10, what="the others handled again")
    ids = sorted(h["id"] for h in probe.heard())
    assert ids == [11, 11, 12, 13, 13]      # the others again: harmless, as their seq says
    assert {h["id"]: h["request_id"] for h in probe.heard()} == \
        {11: "req-c", 12: "req-d", 13: "req-e"}
    probe.stop()
    assert waiting_in_queue(amqp_uri) == 0


def test_a_message_of_no_changes_is_dropped_with_a_warning(probe, amqp_uri):
    with Connection(amqp_uri) as conn:
        conn.Producer().publish({"events": []}, exchange=messages.event_exchange(
            messages.LIFECYCLE), routing_key=messages.vm_state_key("PROBE"),
            serializer="json")
    probe.wait_for("a vm.state message with no events", timeout=20)
    probe.stop()
    assert waiting_in_queue(amqp_uri) == 0
