"""Nameko dependency providers, and one entrypoint, shared by the services."""
import logging
from contextlib import contextmanager
from functools import partial

import eventlet
from kombu import Queue, binding
from nameko.events import EventHandler
from nameko.exceptions import ContainerBeingKilled, RemoteError
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy

from cirrus import config, db, errors, messages, tracing
from cirrus.outbox import Relay

log = logging.getLogger(__name__)


class VmStateHandler(EventHandler):
    """``@vm_state_handler(*patterns)``: a Nameko event_handler of lifecycle's
    ``vm.state`` events whose queue is bound only to ``patterns``
    (``messages.VM_STATE_*``), so the broker drops the changes this handler
    would ignore. The queue keeps event_handler's name.

    A message of several changes (``messages.events_in``) is handled as that
    many events, each by its own worker for the request it names, and acked
    once all of them are done."""

    def __init__(self, *patterns, **kwargs):
        super().__init__(messages.LIFECYCLE, messages.VM_STATE, **kwargs)
        self.patterns = patterns

    def setup(self):
        super().setup()
        queue = self.queue
        self.queue = Queue(queue.name, durable=queue.durable, auto_delete=queue.auto_delete,
                           exclusive=queue.exclusive,
                           bindings=[binding(queue.exchange, routing_key=pattern)
                                     for pattern in self.patterns])

    def handle_message(self, body, message):
        events = messages.events_in(body)
        if events and events[0] is body:    # one event, as Nameko hands it
            return super().handle_message(body, message)
        if not events:
            log.warning("a vm.state message with no events in %s", self.queue.name)
            return self.queue_consumer.ack_message(message)
        context = self.unpack_message_headers(message)
        delivery = messages.SharedDelivery(message, len(events))
        for event in events:
            try:
                self.container.spawn_worker(
                    self, (event,), {},
                    context_data={**context, tracing.KEY: isinstance(event, dict)
                                  and event.get(tracing.KEY) or context.get(tracing.KEY)},
                    handle_result=partial(self.handle_result, delivery))
            except ContainerBeingKilled:
                return self.queue_consumer.requeue_message(delivery)


vm_state_handler = VmStateHandler.decorator


class Database(DependencyProvider):
    """Injects a sessionmaker; each call opens a session the caller closes."""

    def setup(self):
        self.factory = db.session_factory()

    def get_dependency(self, worker_ctx):
        return self.factory


# how long a handler whose message goes back to the queue waits first when
# the database is away, so a requeued message is not retried in a busy loop
REQUEUE_PAUSE = 1.0


class OutboxRelay(DependencyProvider):
    """Injects the relay that publishes what the worker's transactions wrote."""

    def setup(self):
        self.relay = Relay(config.get()["amqp"]["uri"], db.session_factory())

    def get_dependency(self, worker_ctx):
        if getattr(worker_ctx.entrypoint, "requeue_on_error", False):
            return _PausingRelay(self.relay)
        return self.relay


class _PausingRelay:
    """The relay for an event handler that requeues on error: during a
    database outage it waits a moment before failing, because the failure
    puts the message straight back to be delivered again."""

    def __init__(self, relay):
        self._relay = relay
        self.session_factory = relay.session_factory

    @contextmanager
    def transaction(self):
        try:
            with self._relay.transaction() as session:
                yield session
        except errors.Unavailable:
            eventlet.sleep(REQUEUE_PAUSE)
            raise


class Rpc(RpcProxy):
    """An RpcProxy that re-raises a remote CirrusError as itself, so that an
    InvalidArgument raised by lifecycle reaches the gateway as InvalidArgument."""

    def get_dependency(self, worker_ctx):
        return _Translating(super().get_dependency(worker_ctx))


class _Translating:
    def __init__(self, proxy):
        self._proxy = proxy

    def __getattr__(self, name):
        method = getattr(self._proxy, name)

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except RemoteError as exc:
                raise errors.from_remote(exc) from None
        return call
