"""cirrus.metrics: port choice, serving, and the helpers that move the series."""
import socket
from decimal import Decimal

import grpc
import pytest
from prometheus_client import REGISTRY

from cirrus import config, instance, metrics
from tests.scrape import scrape


def value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- ports ----------------------------------------------------------------------

def test_each_service_has_its_own_port_by_default():
    assert metrics.choose_port("lifecycle", cfg={}) == 9403
    assert metrics.choose_port("node", cfg={}) == 9407
    assert len(set(metrics.DEFAULT_PORTS.values())) == len(metrics.DEFAULT_PORTS)


def test_the_configured_ports_and_a_gate_process_index():
    cfg = {"metrics": {"ports": {"gate": 9600}}}
    assert metrics.choose_port("gate", cfg=cfg) == 9600
    assert metrics.choose_port("gate", 2, cfg=cfg) == 9602


def test_the_process_port_wins_and_zero_stays_any_free_port():
    cfg = {"metrics": {"port": 9700, "ports": {"flow": 9404}}}
    assert metrics.choose_port("flow", cfg=cfg) == 9700
    assert metrics.choose_port("gate", 1, cfg=cfg) == 9701
    assert metrics.choose_port("gate", 3, cfg={"metrics": {"port": 0}}) == 0


@pytest.mark.parametrize("cfg, message", [
    ({"metrics": {"port": "many"}}, "metrics.port (CIRRUS_METRICS_PORT): 'many' is not a port"),
    ({"metrics": {"port": 70000}}, "70000 is not a port number"),
    ({"metrics": {"ports": {"scheduler": True}}}, "metrics.ports.scheduler: True"),
])
def test_a_bad_port_is_refused_naming_the_setting(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        metrics.choose_port("scheduler", cfg=cfg)


def test_an_index_past_the_last_port_is_refused():
    with pytest.raises(ValueError, match="gate process 2"):
        metrics.choose_port("gate", 2, cfg={"metrics": {"port": 65535}})


def test_a_wildcard_address_is_reached_by_host_name():
    assert metrics.url("127.0.0.1", 9401) == "http://127.0.0.1:9401/metrics"
    assert metrics.url("0.0.0.0", 9401, "node-7") == "http://node-7:9401/metrics"
    assert metrics.url("::1", 9401) == "http://[::1]:9401/metrics"


# -- serving --------------------------------------------------------------------

@pytest.fixture
def port_setting(monkeypatch):
    def use(port):
        monkeypatch.setenv("CIRRUS_METRICS_PORT", str(port))
        config._cached = None
    yield use
    metrics.stop()
    config._cached = None


def test_serve_answers_with_the_instance_and_stop_ends_it(port_setting):
    port_setting(0)
    assert metrics.endpoint() is None
    url = metrics.serve(instance.Identity("scheduler", "scheduler.3", "box", 1, "9.9", 0.0))
    assert metrics.endpoint() == url
    info = scrape(url)["cirrus_instance_info"]
    assert info == [({"service": "scheduler", "name": "scheduler.3", "host": "box",
                      "version": "9.9"}, 1.0)]
    metrics.stop()
    assert metrics.endpoint() is None
    with pytest.raises(OSError):
        scrape(url, timeout=2)


def test_a_busy_port_is_logged_and_a_free_one_taken(port_setting, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        port_setting(port)
        url = metrics.serve(instance.Identity("flow", "flow.1", "box", 1, "1", 0.0))
        assert f":{port}/" not in url
        assert "cirrus_instance_info" in scrape(url)
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


# -- what moves the series --------------------------------------------------------

class Context:
    """A grpc ServicerContext as far as the interceptor reads it."""

    def __init__(self):
        self.status = None

    def code(self):
        return self.status

    def abort(self, code, details):
        self.status = code
        raise RuntimeError(details)


def intercepted(behaviour, streaming=False, method="/cirrus.v1.TestService/Do"):
    make = grpc.unary_stream_rpc_method_handler if streaming else \
        grpc.unary_unary_rpc_method_handler
    details = type("Details", (), {"method": method})
    handler = metrics.GrpcMetrics().intercept_service(lambda d: make(behaviour), details)
    return handler.unary_stream if streaming else handler.unary_unary


def test_grpc_calls_are_counted_by_code_and_unary_ones_timed():
    method = "cirrus.v1.TestService/Do"
    before = {code: value("cirrus_grpc_calls_total", method=method, code=code)
              for code in ("OK", "NOT_FOUND", "UNKNOWN")}
    timed = value("cirrus_grpc_seconds_count", method=method)

    def refuse(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def crash(request, context):
        raise ValueError("bug")

    assert intercepted(lambda request, context: "answer")("q", Context()) == "answer"
    for behaviour in (refuse, crash):
        with pytest.raises(Exception):
            intercepted(behaviour)("q", Context())
    for code in before:
        assert value("cirrus_grpc_calls_total", method=method, code=code) == before[code] + 1
    assert value("cirrus_grpc_seconds_count", method=method) == timed + 3


def test_a_stream_is_counted_when_it_ends_and_not_timed():
    method = "cirrus.v1.TestService/Watch"
    before = value("cirrus_grpc_calls_total", method=method, code="OK")
    stream = intercepted(lambda request, context: iter([1, 2]), streaming=True,
                         method="/" + method)
    assert list(stream("q", Context())) == [1, 2]
    assert value("cirrus_grpc_calls_total", method=method, code="OK") == before + 1
    assert value("cirrus_grpc_seconds_count", method=method) == 0


def test_a_stream_its_watcher_left_is_counted_cancelled():
    method = "cirrus.v1.TestService/Follow"
    stream = intercepted(lambda request, context: iter(range(10)), streaming=True,
                         method="/" + method)("q", Context())
    assert next(stream) == 0
    stream.close()
    assert value("cirrus_grpc_calls_total", method=method, code="CANCELLED") == 1


def test_an_unknown_method_is_left_to_grpc():
    details = type("Details", (), {"method": "/nothing/Here"})
    assert metrics.GrpcMetrics().intercept_service(lambda d: None, details) is None


def test_driver_actions_are_timed_by_outcome():
    before = {outcome: value("cirrus_driver_action_seconds_count", action="reboot",
                             outcome=outcome) for outcome in ("success", "failure")}
    with metrics.driver_action("reboot"):
        pass
    with pytest.raises(OSError):
        with metrics.driver_action("reboot"):
            raise OSError("domain gone")
    for outcome in before:
        assert value("cirrus_driver_action_seconds_count", action="reboot",
                     outcome=outcome) == before[outcome] + 1


def test_gate_requests_by_route_and_code_an_unmatched_one_apart():
    before = value("cirrus_gate_requests_total", route="unmatched", code="400")
    metrics.gate_request(None, 400, 0.001)
    metrics.gate_request("GET /vm", 200, 0.002)
    assert value("cirrus_gate_requests_total", route="unmatched", code="400") == before + 1
    assert value("cirrus_gate_requests_total", route="GET /vm", code="200") >= 1
    assert value("cirrus_gate_request_seconds_count", route="GET /vm") >= 1


def test_outbox_lag_adds_the_publishing_time_to_each_rows_wait():
    count = value("cirrus_outbox_lag_seconds_count")
    total_seconds = value("cirrus_outbox_lag_seconds_sum")
    # the database's numeric comes as a Decimal; a clock a little behind stays 0
    metrics.outbox_published([Decimal("0.25"), 1.0, -0.5], 0.5)
    assert value("cirrus_outbox_lag_seconds_count") == count + 3
    assert value("cirrus_outbox_lag_seconds_sum") == pytest.approx(total_seconds + 0.75 + 1.5 + 0.5)


def test_scheduling_latency_from_the_vm_becoming_pending():
    from datetime import datetime, timedelta, timezone
    count = value("cirrus_scheduling_seconds_count")
    seconds = value("cirrus_scheduling_seconds_sum")
    metrics.scheduled(datetime.now(timezone.utc) - timedelta(seconds=2))
    metrics.scheduled(None)     # not known: not counted
    assert value("cirrus_scheduling_seconds_count") == count + 1
    assert 2 <= value("cirrus_scheduling_seconds_sum") - seconds < 10


@pytest.mark.filterwarnings("ignore:Using fork")   # eventlet's, warning any fork
def test_a_forked_child_reports_no_endpoint_until_it_serves_its_own(port_setting):
    import os
    port_setting(0)
    parent = metrics.serve(instance.Identity("gate", "gate.1", "box", 1, "1", 0.0))
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            inherited = metrics.endpoint()
            own = metrics.serve(instance.Identity("gate", "gate.1/1", "box", 2, "1", 0.0), 1)
            names = scrape(own)["cirrus_instance_info"][0][0]["name"]
            os.write(writing, f"{inherited} {own != parent} {names}".encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as answer:
        said = answer.read()
    os.waitpid(pid, 0)
    assert said == "None True gate.1/1"
    assert metrics.endpoint() == parent
    assert scrape(parent)["cirrus_instance_info"][0][0]["name"] == "gate.1"
