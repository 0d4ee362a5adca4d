"""The scheduler merges placement requests that arrive while a pass runs."""
from services.scheduler.service import PassQueue


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
