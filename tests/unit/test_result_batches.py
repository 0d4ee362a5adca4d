"""lifecycle's Batches: driver results arriving together are applied in one
batch, each caller returns once its batch is done, and a bad result fails alone."""
import eventlet
import pytest

from services.lifecycle.service import Batches


def batches():
    provider = Batches()
    provider.setup()
    return provider


def test_results_arriving_together_go_in_one_batch_and_every_caller_returns_after_it():
    provider, applied, finished = batches(), [], []

    def apply_batch(items):
        eventlet.sleep(0.01)        # the transaction: others queue meanwhile
        applied.append(list(items))

    def handler(item):
        provider.apply(item, apply_batch)
        finished.append(item)

    pool = eventlet.GreenPool()
    for item in range(20):
        pool.spawn(handler, item)
    pool.waitall()
    assert sorted(finished) == list(range(20))
    assert sorted(i for batch in applied for i in batch) == list(range(20))
    assert len(applied) < 20 and max(len(batch) for batch in applied) > 1
    # nobody returned before the batch holding its item was applied
    done_before = {i for batch in applied for i in batch}
    assert set(finished) <= done_before


def test_a_bad_result_fails_alone_and_the_rest_of_its_batch_is_applied():
    provider, applied, outcomes = batches(), [], {}

    def apply_batch(items):
        eventlet.sleep(0.01)
        if "bad" in items:
            raise ValueError("bad result")
        applied.extend(items)

    def handler(item):
        try:
            provider.apply(item, apply_batch)
            outcomes[item] = "ok"
        except ValueError as exc:
            outcomes[item] = str(exc)

    pool = eventlet.GreenPool()
    for item in ["a", "b", "bad", "c", "d"]:
        pool.spawn(handler, item)
    pool.waitall()
    assert outcomes == {"a": "ok", "b": "ok", "bad": "bad result", "c": "ok", "d": "ok"}
    assert sorted(applied) == ["a", "b", "c", "d"]


def test_one_result_alone_is_applied_at_once():
    provider, applied = batches(), []
    provider.apply("only", applied.append)
    assert applied == [["only"]]
    with pytest.raises(KeyError):
        provider.apply("fails", lambda items: {}["missing"])
