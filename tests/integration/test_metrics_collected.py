"""Metrics on the real database and broker: a lifecycle process serving its
/metrics (RPC calls by outcome, timers, VMs per status, its identity), the
outbox relay's lag, and the counts read from the database at scrape."""
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from cirrus import db, messages, outbox, states
from cirrus.db.models import Outbox, VirtualMachine
from cirrus.errors import NotFound
from cirrus.metrics import ClusterCollector
from tests.broker import FakeNodeTransport, rpc_proxy
from tests.procs import free_port, start_services, wait_until
from tests.scrape import scrape, total


@pytest.fixture(scope="module")
def lifecycle(cirrus_env, tmp_path_factory):
    port = free_port()
    env = {**cirrus_env, "CIRRUS_METRICS_PORT": str(port), "CIRRUS_INSTANCE": "lifecycle.7"}
    procs = start_services(["lifecycle"], env, tmp_path_factory.mktemp("metrics"))
    yield f"http://127.0.0.1:{port}/metrics"
    for proc in procs:
        proc.stop()


def test_a_service_counts_its_rpc_calls_by_outcome_and_its_timers(lifecycle, amqp_uri):
    before = scrape(lifecycle)
    with rpc_proxy(amqp_uri, "lifecycle") as service:
        made = service.create_host("metrics-host")
        with pytest.raises(Exception, match="NotFound"):
            service.get_host(10**9)
        service.get_host(made["id"])

    def counted():
        after = scrape(lifecycle)
        return all(total(after, "cirrus_rpc_calls_total", method=method, outcome=outcome)
                   >= total(before, "cirrus_rpc_calls_total", method=method, outcome=outcome) + 1
                   for method, outcome in (("create_host", "ok"), ("get_host", "ok"),
                                           ("get_host", NotFound.__name__))) and after
    after = wait_until(counted, 10, 0.2, "the calls counted")
    assert total(after, "cirrus_rpc_seconds_count", service="lifecycle", method="get_host") \
        >= total(before, "cirrus_rpc_seconds_count", method="get_host") + 2
    # the outbox sweep runs every second
    wait_until(lambda: total(scrape(lifecycle), "cirrus_timer_runs_total", service="lifecycle",
                             outcome="ok") > total(before, "cirrus_timer_runs_total"),
               10, 0.5, "a timer run counted")
    assert after["cirrus_instance_info"][0][0]["name"] == "lifecycle.7"
    assert {labels["status"] for labels, _ in after["cirrus_vms"]} == set(states.ALL_STATUSES)


def test_the_vm_and_outbox_counts_are_the_databases(cirrus_env):
    factory = db.session_factory()
    with factory() as s, s.begin():
        outbox.add_event(s, messages.LIFECYCLE, "metrics.unsent", {"id": 0})
    try:
        families = {f.name: f for f in ClusterCollector(db.engine()).collect()}
        with factory() as s:
            vms = dict(s.execute(select(VirtualMachine.state, func.count())
                                 .where(VirtualMachine.state != "ACTIVE")
                                 .group_by(VirtualMachine.state)).all())
            waiting = s.scalar(select(func.count()).select_from(Outbox))
        reported = {sample.labels["status"]: sample.value for sample in families["cirrus_vms"].samples}
        assert all(reported[state] == count for state, count in vms.items())
        assert families["cirrus_outbox_rows_waiting"].samples[0].value == waiting >= 1
        assert families["cirrus_outbox_oldest_seconds"].samples[0].value >= 0
    finally:
        with factory() as s, s.begin():
            s.execute(Outbox.__table__.delete().where(Outbox.routing_key == "metrics.unsent"))


def test_a_database_away_leaves_the_counts_out_not_the_scrape():
    from sqlalchemy import create_engine
    nowhere = create_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none",
                            connect_args={"connect_timeout": 1})
    assert list(ClusterCollector(nowhere).collect()) == []


def test_the_relay_observes_each_rows_lag_once_published(cirrus_env, amqp_uri):
    node = FakeNodeTransport(amqp_uri, "metrics-lag")
    relay = outbox.Relay(amqp_uri, db.session_factory())
    count = REGISTRY.get_sample_value("cirrus_outbox_lag_seconds_count") or 0
    with relay.transaction() as s:
        for vm_id in (1, 2):
            outbox.add_command(s, {"id": f"lag{vm_id}", "action": "poll", "vm_id": vm_id,
                                   "host": "metrics-lag", "args": {}})
    assert relay.wait_sent(30)
    assert REGISTRY.get_sample_value("cirrus_outbox_lag_seconds_count") == count + 2
    assert REGISTRY.get_sample_value("cirrus_outbox_lag_seconds_bucket", {"le": "5.0"}) >= 2
    assert node.queue.get(no_ack=True) is not None
