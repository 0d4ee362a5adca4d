"""Which request this code works for, so every log line and message can say so.

A request id is made at the gRPC gateway (or taken from the caller's
``x-request-id``) and travels on its own from there: Nameko puts the
caller's ``request_id`` in the headers of every RPC and event a worker sends
(``nameko.request_id``), the outbox writes it into the headers of the events
it publishes, driver commands carry it in their body and their results bring
it back. Inside a process it is the *current* request, one per green thread
or thread (a context variable), which cirrus.logs adds to every line.

Batched work (a scheduler pass, ``deploy_many``, driver results applied
together) serves many requests at once: it runs ``detached()``, and each VM
is logged and messaged with the request id of the last action on it,
``vms.last_request_id``.
"""
import logging
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar

from nameko.extensions import DependencyProvider
from nameko.rpc import Rpc

HEADER = "nameko.request_id"    # how nameko names the context key request_id in headers
KEY = "request_id"              # ... and in a worker's context data

log = logging.getLogger("cirrus.calls")

# (request id, VM id) of the code running now; a new thread or green thread starts empty
_current = ContextVar("cirrus_request", default=(None, None))


def current():
    """(request id, VM id) of the work in progress, each None when unknown."""
    return _current.get()


def request_id():
    return _current.get()[0]


def new_id():
    return uuid.uuid4().hex


@contextmanager
def bound(request_id, vm_id=None):
    """Run the block as work for ``request_id`` (and ``vm_id``)."""
    token = _current.set((request_id, vm_id))
    try:
        yield
    finally:
        _current.reset(token)


def detached():
    """Run the block for no request in particular: batched work, where each
    VM brings its own request id."""
    return bound(None)


def fields(request_id, vm_id=None):
    """``extra=`` for a log line about a VM that is not the current one."""
    return {"request_id": request_id, "vm_id": vm_id}


def headers(request_id):
    """AMQP headers that give a Nameko event handler ``request_id``."""
    return {HEADER: request_id} if request_id else {}


def stamp(rows):
    """Outbox rows without a request id in their headers take the current one."""
    current_id = _current.get()[0]
    if current_id:
        for row in rows:
            row_headers = row.get("headers") or {}
            if HEADER not in row_headers:
                row["headers"] = {**row_headers, HEADER: current_id}
    return rows


# lines a transaction holds back until it commits: what a rolled back
# transaction (or savepoint) did not do is never logged as done
_HELD = "cirrus_log_lines"


def log_after_commit(session, logger, message, *args, request_id=None, vm_id=None):
    """Log ``message`` at INFO once ``session``'s transaction commits (the
    outbox relay calls ``committed``)."""
    session.info.setdefault(_HELD, []).append(
        (logger, message, args, {"request_id": request_id, "vm_id": vm_id}))


def held(session):
    """How many lines ``session`` holds: a mark for ``forget_since``."""
    return len(session.info.get(_HELD, ()))


def forget_since(session, mark):
    """Drop the lines held since ``mark``: a savepoint rolled back."""
    del session.info.get(_HELD, [])[mark:]


def committed(session):
    """Write the lines ``session`` held, now that its transaction committed."""
    for logger, message, args, extra in session.info.pop(_HELD, ()):
        logger.info(message, *args, extra=extra)


class Trace:
    """What a Nameko worker knows of its request (the ``Tracing`` dependency)."""

    def __init__(self, worker_ctx):
        self.worker_ctx = worker_ctx

    @property
    def request_id(self):
        return self.worker_ctx.data.get(KEY)

    @contextmanager
    def acting_for(self, request_id, vm_id=None):
        """Log, call and publish in the block as work for ``request_id``: a
        scheduler pass acting on one VM among many uses that VM's request."""
        data = self.worker_ctx.data
        before = data.pop(KEY, None)
        if request_id:
            data[KEY] = request_id
        try:
            with bound(request_id, vm_id):
                yield
        finally:
            data.pop(KEY, None)
            if before is not None:
                data[KEY] = before


class Tracing(DependencyProvider):
    """Makes the request id Nameko received with a call or an event (its
    ``nameko.request_id`` header) the worker's current request, so its log
    lines carry it; RPCs and events the worker sends carry it on by
    themselves. With ``log_calls`` (the requests service, Cirrus's API behind
    the gateway) each RPC answered is logged at INFO, else at DEBUG."""

    def __init__(self, log_calls=False):
        self.level = logging.INFO if log_calls else logging.DEBUG

    def get_dependency(self, worker_ctx):
        return Trace(worker_ctx)

    def worker_setup(self, worker_ctx):
        _current.set((worker_ctx.data.get(KEY), None))
        if isinstance(worker_ctx.entrypoint, Rpc):
            worker_ctx.cirrus_started = time.monotonic()

    def worker_result(self, worker_ctx, result=None, exc_info=None):
        started = getattr(worker_ctx, "cirrus_started", None)
        if started is None or not log.isEnabledFor(self.level):
            return
        took = (time.monotonic() - started) * 1000
        name = worker_ctx.entrypoint.method_name
        if exc_info is None:
            log.log(self.level, "%s -> OK (%.0f ms)", name, took)
        else:
            log.log(self.level, "%s -> %s: %s (%.0f ms)", name, exc_info[0].__name__,
                    exc_info[1], took)

    def worker_teardown(self, worker_ctx):
        _current.set((None, None))
