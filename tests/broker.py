"""The broker as a test sees it: playing a node, and listening to VM events."""
import socket
from contextlib import contextmanager

from kombu import Connection, Consumer, Queue
from nameko.standalone.rpc import ClusterRpcProxy

from cirrus import messages
from tests.procs import wait_until


class FakeNodeTransport:
    """The node's side of the broker: its command queue and the events exchange."""

    def __init__(self, amqp_uri, host):
        self.conn = Connection(amqp_uri)
        self.host = host
        self.queue = messages.node_queue(host)(self.conn.default_channel)
        self.queue.declare()
        self.taken = []     # commands of a message taken, not yet asked for

    def next_command(self, timeout=10):
        def got():
            if not self.taken:
                message = self.queue.get(no_ack=False)
                if message:
                    message.ack()
                    self.taken.extend(messages.commands_in(message.payload))
            return self.taken.pop(0) if self.taken else None
        return wait_until(got, timeout, what=f"a command on {self.host}'s queue")

    def waiting_commands(self):
        """Every command in the queue now (taken from it)."""
        taken, self.taken = self.taken, []
        return taken + [cmd for sent in self.waiting_messages() for cmd in sent]

    def waiting_messages(self):
        """The commands of each message in the queue now (taken from it): a
        message holds the commands one transaction made for this host."""
        sent = []
        while (message := self.queue.get(no_ack=True)) is not None:
            sent.append(messages.commands_in(message.payload))
        return sent

    def publish(self, event_type, payload):
        with self.conn.Producer() as producer:
            producer.publish(payload, exchange=messages.event_exchange(messages.NODE),
                             routing_key=event_type, serializer="json", retry=True,
                             declare=[messages.event_exchange(messages.NODE)])


def join_node(lifecycle, amqp_uri, name, cpu=400, memory_mb=4096):
    """A fake node for a new host, which its first report makes MONITORED."""
    node = FakeNodeTransport(amqp_uri, name)
    host = lifecycle.create_host(name)
    node.publish(messages.HOST_MONITOR, {"host": name, "monitoring": {
        "TOTALCPU": cpu, "TOTALMEMORY": memory_mb * 1024, "URI": f"qemu+tcp://{name}/system"}})
    wait_until(lambda: lifecycle.get_host(host["id"])["state"] == "MONITORED",
               what=f"{name} MONITORED")
    return node, host


def vm_events(amqp_uri):
    """A consumer of every VM state change: ``seen`` gets each change, one by
    one also when a message carries several."""
    conn = Connection(amqp_uri)
    queue = Queue(exchange=messages.event_exchange(messages.LIFECYCLE),
                  routing_key=messages.VM_STATE_ANY[0], exclusive=True, auto_delete=True)
    seen = []
    consumer = Consumer(conn, [queue], accept=["json"], callbacks=[
        lambda body, msg: (seen.extend(messages.events_in(body)), msg.ack())])
    consumer.consume()
    return conn, seen


def drain(conn, seen, until, timeout=10):
    def check():
        try:
            conn.drain_events(timeout=0.2)
        except socket.timeout:
            pass
        return until(seen)
    return wait_until(check, timeout, interval=0, what="events")


@contextmanager
def rpc_proxy(amqp_uri, service):
    """A standalone Nameko proxy to ``service``, as another service would call it."""
    with ClusterRpcProxy({"AMQP_URI": amqp_uri, "serializer": "json"}) as proxy:
        yield getattr(proxy, service)
