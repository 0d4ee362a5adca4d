"""Nameko dependency providers shared by the services."""
from nameko.extensions import DependencyProvider

from cirrus import config, db
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
