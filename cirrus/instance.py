"""Who this process is, for heartbeats, metrics and logs.

Every Cirrus process (a Nameko service, the gRPC gateway, the gate, a driver
worker) calls ``start(service)`` first thing in its ``main``. The instance's
name comes from ``CIRRUS_INSTANCE`` (the launcher sets ``lifecycle.2``, a
systemd unit ``lifecycle@2``), else ``<service>@<host>:<pid>``, which is unique
on a cluster of machines without any setting.
"""
import gc
import os
import socket
import time
from dataclasses import dataclass

import cirrus


@dataclass(frozen=True)
class Identity:
    service: str        # requests, scheduler, lifecycle, flow, gateway, gate, node
    name: str           # unique per running process, e.g. lifecycle.2
    host: str           # the machine's name
    pid: int
    version: str
    started_at: float   # time.time() at start


_current = None
GC_THRESHOLDS = (10_000, 10, 10)    # (700, 10, 10) by default


def identify(service, name=None):
    """Sets and returns this process's identity (again after a fork: new pid)."""
    global _current
    host = socket.gethostname()
    pid = os.getpid()
    name = name or os.environ.get("CIRRUS_INSTANCE") or f"{service}@{host}:{pid}"
    _current = Identity(service=service, name=name, host=host, pid=pid,
                        version=cirrus.__version__, started_at=time.time())
    return _current


def current():
    """This process's identity; one made from the program name if none was set."""
    return _current or identify(os.path.basename(os.sys.argv[0]) or "cirrus")


def start(service, name=None):
    """What every process does first: knows who it is, then logs as that."""
    # Python's default collects young objects every 700 allocations, and a
    # batch of 500 placements makes hundreds of thousands: a quarter of
    # deploy_many's CPU went to collections that found little garbage
    gc.set_threshold(*GC_THRESHOLDS)
    from cirrus import heartbeat
    from cirrus import metrics
    from cirrus.logs import setup_logging
    identity = identify(service, name)
    setup_logging(identity.service)
    metrics.serve(identity)         # before the first heartbeat, which reports it
    heartbeat.start(identity)
    return identity
