"""The scheduler keeps hosts' attributes between passes: a pass reads every
MONITORED host's usage, and all of a host only when the database bumped its
revision (its template, cluster, capacity or monitoring changed) or its
cluster's template changed. Real database, no broker."""
import uuid

import pytest
from sqlalchemy import update

from cirrus import db
from cirrus.db.models import Host
from services.lifecycle import clusters, logic, monitoring
from services.scheduler.service import monitored_hosts


def in_transaction(work, *args):
    with db.session_factory()() as s, s.begin():
        return work(s, *args)


def read(known):
    with db.session_factory()() as s:
        return {view.id: view for view in monitored_hosts(s, known)}


@pytest.fixture
def two_hosts(cirrus_env):
    tag = uuid.uuid4().hex[:6]
    cluster = in_transaction(clusters.create_cluster, f"cache-{tag}", {"TIER": "gold"}).id
    ids = []
    for name in (f"cache-a-{tag}", f"cache-b-{tag}"):
        host_id = in_transaction(logic.create_host, name).id
        in_transaction(monitoring.handle_monitor, {"host": name, "monitoring": {
            "TOTALCPU": 800, "TOTALMEMORY": 8192 * 1024, "HYPERVISOR": "kvm"}})
        in_transaction(clusters.add_host, cluster, host_id)
        ids.append(host_id)
    yield cluster, ids
    with db.session_factory()() as s, s.begin():
        s.execute(update(Host).where(Host.id.in_(ids)).values(state="DISABLED"))


def test_an_unchanged_host_is_not_read_again_but_its_usage_is(two_hosts):
    _, (a, b) = two_hosts
    known = {}
    first = read(known)
    cached = known[a]
    in_transaction(logic.reserve_capacity, a, 150, 1024, 1)
    second = read(known)
    assert known[a] is cached      # same revision, same cluster template: not re-read
    assert (second[a].cpu_usage, second[a].mem_usage, second[a].running_vms) == (
        first[a].cpu_usage + 150, first[a].mem_usage + 1024, first[a].running_vms + 1)
    assert second[a].attributes["CPU_USAGE"] == first[a].attributes["CPU_USAGE"] + 150
    assert second[a] is not first[a] and second[a].attributes is not cached[2].attributes


def test_a_host_template_cluster_or_monitoring_change_is_seen_at_the_next_pass(two_hosts):
    cluster, (a, b) = two_hosts
    known = {}
    assert read(known)[a].attributes["TIER"] == "gold"
    in_transaction(clusters.update_host, a, {"RACK": "r7"})
    views = read(known)
    assert views[a].attributes["RACK"] == "r7" and "RACK" not in views[b].attributes
    in_transaction(clusters.update_cluster, cluster, {"TIER": "silver"})
    assert {read(known)[h].attributes["TIER"] for h in (a, b)} == {"silver"}
    name = views[b].name
    in_transaction(monitoring.handle_monitor, {"host": name, "monitoring": {
        "TOTALCPU": 1600, "TOTALMEMORY": 8192 * 1024, "HYPERVISOR": "kvm", "MODEL": "epyc"}})
    view = read(known)[b]
    assert (view.max_cpu, view.attributes["MODEL"]) == (1600, "epyc")


def test_a_host_no_longer_monitored_leaves_the_pass_and_the_cache(two_hosts):
    _, (a, b) = two_hosts
    known = {}
    read(known)
    in_transaction(logic.set_host_enabled, a, False)
    views = read(known)
    assert a not in views and a not in known and b in views


def test_the_revision_moves_only_when_what_placement_reads_changes(two_hosts):
    _, (a, _) = two_hosts
    revision = lambda: in_transaction(lambda s: s.get(Host, a).revision)  # noqa: E731
    before = revision()
    in_transaction(logic.reserve_capacity, a, 100, 512, 1)
    in_transaction(clusters.update_host, a, {})         # nothing new in the template
    assert revision() == before
    in_transaction(clusters.update_host, a, {"SSD": "yes"})
    assert revision() == before + 1
