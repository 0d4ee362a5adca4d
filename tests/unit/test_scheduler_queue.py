"""The scheduler's pieces that need no broker: merged passes and its settings."""
import pytest

from cirrus import config
from cirrus.expressions import ExpressionError
from services.scheduler.service import PassQueue, Settings


def make_queue():
    queue = PassQueue()
    queue.setup()
    return queue


def test_requests_during_a_pass_wait_and_are_merged_into_one_next_pass():
    queue, passes = make_queue(), []

    def do_pass(ids):
        passes.append(None if ids is None else sorted(ids))
        if len(passes) == 1:
            # two events arrive while the first pass runs: they return at once
            queue.run([5], do_pass)
            queue.run([6, 5], do_pass)
    queue.run([1, 2], do_pass)
    assert passes == [[1, 2], [5, 6]]


def test_a_request_for_every_vm_absorbs_the_ids_waiting_with_it():
    queue, passes = make_queue(), []

    def do_pass(ids):
        passes.append(None if ids is None else sorted(ids))
        if len(passes) == 1:
            queue.run([7], do_pass)
            queue.run(None, do_pass)
    queue.run([1], do_pass)
    assert passes == [[1], None]
    queue.run([3], do_pass)
    assert passes == [[1], None, [3]]


def test_a_failed_pass_releases_the_queue():
    queue = make_queue()

    def failing(ids):
        raise RuntimeError("lifecycle away")
    try:
        queue.run([1], failing)
    except RuntimeError:
        pass
    passes = []
    queue.run([2], lambda ids: passes.append(sorted(ids)))
    assert passes == [[2]]


@pytest.fixture
def scheduler_config(monkeypatch):
    def load(**values):
        for key, value in values.items():
            monkeypatch.setenv(f"CIRRUS_SCHEDULER_{key.upper()}", value)
        monkeypatch.setattr(config, "_cached", None)
        return Settings()
    yield load
    config._cached = None


def test_settings_come_from_the_configuration_with_no_limits_by_default(scheduler_config):
    settings = scheduler_config()
    assert (settings.policy, settings.max_vm, settings.max_dispatch, settings.max_host) == \
        ("packing", 0, 0, 0)
    assert settings.live_migration is True
    settings = scheduler_config(policy="1", rank="FREE_CPU", max_host="3",
                                live_migration="false")
    assert (settings.policy, settings.rank, settings.max_host, settings.live_migration) == \
        ("striping", "FREE_CPU", 3, False)


def test_a_bad_policy_or_rank_stops_the_scheduler_with_the_reason(scheduler_config):
    with pytest.raises(ValueError, match="unknown policy 'best'"):
        scheduler_config(policy="best")
    with pytest.raises(ExpressionError, match="SCHED_RANK"):
        scheduler_config(policy="custom", rank="FREE_CPU +")
