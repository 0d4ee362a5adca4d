"""A node hears of its domains' changes as they happen, from libvirt's lifecycle
events, whoever made them (in-process on test:///default; on real guests in
test_driver_qemu.py)."""
import itertools
import queue
import time

import libvirt
import pytest

from services.drivers import backend
from services.drivers.libvirt_backend import LibvirtBackend
from services.drivers.simulated import SimulatedBackend
from services.drivers.worker import NodeWorker
from tests.node_worker import now_iso

_ids = itertools.count(9500)


class Heard:
    """What a backend's watch callback was told, to wait on."""

    def __init__(self):
        self.news = queue.Queue()

    def __call__(self, deploy_id, state, reason):
        self.news.put((deploy_id, state, reason))

    def next_about(self, deploy_id, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            try:
                news = self.news.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no event about {deploy_id} within {timeout} s") from None
            if news[0] == deploy_id:
                return news[1:]


@pytest.fixture
def watched(tmp_path):
    lv = LibvirtBackend("test:///default", str(tmp_path / "datastore"))
    heard = Heard()
    lv.watch(heard)
    yield lv, heard
    lv.close()


def a_vm():
    return {"id": next(_ids), "name": "e", "cpu": 1, "vcpu": 1, "memory": 64, "template": {}}


def test_a_domain_destroyed_behind_the_backends_back_is_heard(watched):
    lv, heard = watched
    vm = a_vm()
    name = lv.deploy(vm)
    assert heard.next_about(name) == (backend.RUNNING, "STARTED/BOOTED")
    other = libvirt.open("test:///default")     # someone else's connection
    try:
        other.lookupByName(name).destroy()
    finally:
        other.close()
    assert heard.next_about(name) == (backend.POWEROFF, "STOPPED/DESTROYED")
    lv.delete(vm)
    assert heard.next_about(name) == (backend.GONE, "UNDEFINED/REMOVED")


def test_pause_resume_save_and_restore_are_heard(watched):
    lv, heard = watched
    vm = a_vm()
    name = lv.deploy(vm)
    heard.next_about(name)
    dom = lv.conn.lookupByName(name)
    dom.suspend()
    assert heard.next_about(name) == (backend.PAUSED, "SUSPENDED/PAUSED")
    dom.resume()
    assert heard.next_about(name) == (backend.RUNNING, "RESUMED/UNPAUSED")
    lv.save(vm)
    assert heard.next_about(name) == (backend.POWEROFF, "STOPPED/SAVED")
    assert heard.next_about(name) == (backend.GONE, "UNDEFINED/REMOVED")
    lv.restore(vm)
    assert heard.next_about(name) == (backend.RUNNING, "STARTED/RESTORED")
    lv.delete(vm)


def test_events_keep_coming_over_a_new_connection(watched):
    lv, heard = watched
    # test:///default lives as long as a connection to it: this one keeps it up
    keeper = libvirt.open("test:///default")
    try:
        vm = a_vm()
        name = lv.deploy(vm)
        heard.next_about(name)
        lv.close()              # as if the connection were lost; the next call opens another
        lv.cancel(name)
        assert lv.reconnects == 1
        assert heard.next_about(name) == (backend.POWEROFF, "STOPPED/DESTROYED")
        lv.delete(vm)
    finally:
        keeper.close()


def test_the_worker_turns_news_of_cirrus_domains_into_vm_events():
    worker = NodeWorker({"node-e": SimulatedBackend()}, "amqp://unused")
    worker.on_domain_event("node-e", "test", backend.POWEROFF, "STOPPED/DESTROYED")  # not ours
    before = now_iso()
    worker.on_domain_event("node-e", "cirrus-12", backend.POWEROFF, "STOPPED/DESTROYED")
    assert list(worker.vm_events) == [
        {"host": "node-e", "vm_id": 12, "deploy_id": "cirrus-12", "state": backend.POWEROFF,
         "reason": "STOPPED/DESTROYED", "at": worker.vm_events[0]["at"],
         "request_id": worker.vm_events[0]["request_id"]}]
    assert worker.vm_events[0]["at"] >= before
    # a request of its own, which lifecycle's transition carries on (cirrus trace)
    assert len(worker.vm_events[0]["request_id"]) == 32
    assert worker.hurried == {"node-e"}     # and its host reports early: its domains changed
