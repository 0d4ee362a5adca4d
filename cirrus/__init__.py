"""Cirrus: the shared core (configuration, database, states, messages, client and CLI)."""

__version__ = "0.1.0"
