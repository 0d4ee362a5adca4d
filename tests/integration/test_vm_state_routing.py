"""vm.state routing keys against RabbitMQ's own topic matching: each
consumer's patterns (messages.VM_STATE_*) let through exactly the changes it
acts on."""
import socket
import uuid

from kombu import Connection, Consumer, Producer, Queue, binding

from cirrus import messages

CONSUMERS = {"scheduler": messages.VM_STATE_TO_PLACE, "flow": messages.VM_STATE_IN_FLOW,
             "requests": messages.VM_STATE_DONE, "gateway": messages.VM_STATE_ANY}

# (status, freed, resched, in a flow) -> who hears it besides the gateway
CASES = {
    ("PENDING", False, False, False): {"scheduler"},
    ("PROLOG", False, False, False): set(),
    ("BOOT", False, False, False): set(),
    ("RUNNING", False, False, False): set(),
    ("RUNNING", False, True, False): {"scheduler"},
    ("RUNNING", True, False, False): {"scheduler"},    # a migration arrived: the old host freed
    ("POWEROFF", True, False, False): {"scheduler"},
    ("DONE", True, False, False): {"scheduler", "requests"},
    ("DONE", False, False, False): {"requests"},       # never placed
    ("PENDING", False, False, True): {"scheduler", "flow"},
    ("BOOT", False, False, True): {"flow"},
    ("DONE", True, False, True): {"scheduler", "requests", "flow"},
}


def test_each_consumer_hears_only_the_changes_it_acts_on(amqp_uri):
    exchange = messages.event_exchange(messages.LIFECYCLE)
    heard = {name: [] for name in CONSUMERS}
    with Connection(amqp_uri) as conn:
        channel = conn.channel()
        queues = [Queue(f"routing-{name}-{uuid.uuid4().hex[:6]}", exclusive=True,
                        bindings=[binding(exchange, routing_key=p) for p in patterns])
                  for name, patterns in CONSUMERS.items()]

        def hear(name):
            return lambda body, message: heard[name].append(tuple(body["case"]))

        consumers = [Consumer(channel, [queue], callbacks=[hear(name)], accept=["json"],
                              no_ack=True) for name, queue in zip(CONSUMERS, queues)]
        for consumer in consumers:
            consumer.consume()
        producer = Producer(channel, exchange=exchange)
        for case in CASES:
            producer.publish({"case": case}, routing_key=messages.vm_state_key(*case),
                             serializer="json")
        while sum(map(len, heard.values())) < sum(len(who) + 1 for who in CASES.values()):
            try:
                conn.drain_events(timeout=5)
            except socket.timeout:
                break
    for case, who in CASES.items():
        got = {name for name, cases in heard.items() if case in cases}
        assert got == who | {"gateway"}, case
    assert all(len(cases) == len(set(cases)) for cases in heard.values())   # each once
