"""Prometheus metrics of this process, on ``http://ADDRESS:PORT/metrics``.

Every process serves its own registry on its own port (``serve``, called
from ``cirrus.instance.start``): ``CIRRUS_METRICS_PORT`` if set (0: any free
port), else ``metrics.ports[service]`` of the configuration. A gate child
``index`` adds its index to that port. ``endpoint()`` is the URL, which
heartbeats report so ``cirrus status`` shows where to scrape.
"""
import logging
import os
import socket

log = logging.getLogger("cirrus.metrics")

DEFAULT_PORTS = {"requests": 9401, "scheduler": 9402, "lifecycle": 9403, "flow": 9404,
                 "gateway": 9405, "gate": 9406, "node": 9407}
PORT_VARIABLE = "CIRRUS_METRICS_PORT"

_server = None      # (httpd, thread, pid) of the running HTTP server
_endpoint = None


def endpoint():
    """``http://HOST:PORT/metrics`` of this process, or None before ``serve``."""
    return _endpoint


def settings(cfg=None):
    from cirrus import config
    cfg = config.get() if cfg is None else cfg
    return cfg.get("metrics") or {}


def choose_port(service, index=0, cfg=None, environ=None):
    """The port this process serves on: the environment's, else the
    configured one for its service; ``index`` (a gate child) is added, and
    0 (any free port) stays 0."""
    environ = os.environ if environ is None else environ
    text = environ.get(PORT_VARIABLE)
    if text is not None and text.strip() != "":
        try:
            port = int(text)
        except ValueError:
            raise ValueError(f"{PORT_VARIABLE}={text!r} is not a port number") from None
        where = PORT_VARIABLE
    else:
        ports = settings(cfg).get("ports") or {}
        port = ports.get(service, DEFAULT_PORTS.get(service, 0))
        where = f"metrics.ports.{service}"
        if not isinstance(port, int) or isinstance(port, bool):
            raise ValueError(f"{where}: {port!r} is not a port number")
    if not 0 <= port <= 65535 - index:
        raise ValueError(f"{where}: {port} is not a port number (0-65535)")
    return port + index if port else 0


def url(address, port, host=None):
    """Where a scraper reaches ``address:port``: a wildcard address by host name."""
    if address in ("", "0.0.0.0", "::"):
        address = host or socket.gethostname()
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port}/metrics"


def serve(identity, index=0):
    """Serve this process's metrics (again after a fork: ``index`` is the
    gate child's) and return the endpoint. A busy port is logged and a free
    one taken instead, so a second process started by hand still reports."""
    global _server, _endpoint
    from prometheus_client import start_http_server
    stop()
    address = settings().get("address", "127.0.0.1")
    port = choose_port(identity.service, index)
    try:
        httpd, thread = start_http_server(port, address)
    except OSError as exc:
        log.warning("metrics: cannot listen on %s:%s (%s); taking a free port instead",
                    address, port, exc.strerror)
        httpd, thread = start_http_server(0, address)
    _server = (httpd, thread, os.getpid())
    _endpoint = url(address, httpd.server_address[1], identity.host)
    return _endpoint


def stop():
    """Stop serving, also a server inherited through a fork (the parent's
    socket stays open in the parent)."""
    global _server, _endpoint
    if _server is not None:
        httpd, thread, _pid = _server
        httpd.shutdown()
        httpd.server_close()
        _server = _endpoint = None
