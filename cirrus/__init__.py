"""Cirrus: the shared core (configuration, database, states, messages, client and CLI)."""
import warnings

__version__ = "0.1.0"

# Nameko 2.14 needs eventlet, which warns on import that it is in bugfix mode;
# we know, and the warning would open every log.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
