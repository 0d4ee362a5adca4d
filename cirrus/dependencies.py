"""Nameko dependency providers shared by the services."""
from nameko.exceptions import RemoteError
from nameko.extensions import DependencyProvider
from nameko.rpc import RpcProxy

from cirrus import config, db, errors
from cirrus.outbox import Relay


class Database(DependencyProvider):
    """Injects a sessionmaker; each call opens a session the caller closes."""

    def setup(self):
        self.factory = db.session_factory()

    def get_dependency(self, worker_ctx):
        return self.factory


class OutboxRelay(DependencyProvider):
    """Injects the relay that publishes what the worker's transactions wrote."""

    def setup(self):
        self.relay = Relay(config.get()["amqp"]["uri"], db.session_factory())

    def get_dependency(self, worker_ctx):
        return self.relay


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
