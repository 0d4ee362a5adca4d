"""Pure logic of request management (issue 8): quota arithmetic and the
default process's decisions given a request's data."""
from datetime import datetime, timedelta, timezone

import pytest

from cirrus import config
from cirrus.errors import InvalidArgument
from services.requests import approvals, quotas
from services.requests.provisioning import median_waits

BPMN = (config.REPO_ROOT / "deploy" / "processes" / "provision.bpmn").read_text()


def test_overruns_name_each_resource_and_by_how_much():
    limits = {"vms": 2, "cpu": 8, "memory": None, "images": 0}
    used = {"vms": 2, "cpu": 6, "memory": 10 ** 6, "images": 0}
    need = quotas.need_of(vms=1, cpu=4, memory=4096)
    assert quotas.overruns(limits, used, need) == [("vms", 2, 2, 1, 1), ("cpu", 8, 6, 4, 2)]
    assert quotas.overruns(limits, used, quotas.need_of()) == []
    assert quotas.overruns(limits, {"cpu": 4}, quotas.need_of(cpu=4)) == []   # up to the limit
    assert quotas.overruns(limits, used, quotas.need_of(images=1)) == [("images", 0, 0, 1, 1)]
    assert quotas.overrun_message("user alice's", ("cpu", 8, 6, 4, 2)) == \
        "user alice's quota of cpu exceeded by 2: 8 vCPUs allowed, 6 in use, this request needs 4"


@pytest.mark.parametrize("limits, expected", [
    ({"vms": 3, "cpu": -1}, {"vms": 3, "cpu": None}),
    ({"memory": None, "images": 0}, {"memory": None, "images": 0}),
])
def test_limits_are_whole_numbers_or_none(limits, expected):
    assert quotas.check_limits(limits) == expected


@pytest.mark.parametrize("limits", [{"vms": -2}, {"cpu": 1.5}, {"vms": True}, {"gpus": 1}])
def test_bad_limits_are_refused(limits):
    with pytest.raises(InvalidArgument):
        quotas.check_limits(limits)


def run(vcpu, memory_gb, decide=()):
    """The default process over a request; returns the roles asked, in order,
    and the outcome, deciding each wait with the next of ``decide``."""
    data = approvals.process_data("vm", {"vcpu": vcpu, "memory": memory_gb * 1024}, "alice",
                                  "user", [], {})
    workflow = approvals.start(BPMN, data)
    asked, decisions = [], list(decide)
    while approvals.waiting(workflow):
        [(task, _, role)] = approvals.waiting(workflow)
        asked.append(role)
        workflow = approvals.loads(approvals.dumps(workflow))   # as between two calls
        [(task, _, role)] = approvals.waiting(workflow)
        workflow = approvals.decide(workflow, task, decisions.pop(0), "why", "bob")
    return asked, approvals.outcome(workflow)


@pytest.mark.parametrize("vcpu, memory_gb, decide, asked, outcome", [
    (1, 4, (), [], "approved"),
    (3, 64, (), [], "approved"),
    (4, 4, (True,), ["cloud-admin"], "approved"),
    (4, 31, (False,), ["cloud-admin"], "rejected"),
    (4, 32, (True, True), ["finance", "cloud-admin"], "approved"),
    (16, 128, (False,), ["finance"], "rejected"),
    (4, 32, (True, False), ["finance", "cloud-admin"], "rejected"),
])
def test_the_default_rules(vcpu, memory_gb, decide, asked, outcome):
    assert run(vcpu, memory_gb, decide) == (asked, outcome)


def test_conditions_cannot_reach_beyond_the_data():
    evil = BPMN.replace("vcpu &gt;= 4 and memory_gb &lt; 32", "__import__('os').getpid() &gt; 0")
    data = approvals.process_data("vm", {"vcpu": 4, "memory": 1024}, "a", "user", [], {})
    with pytest.raises(InvalidArgument, match="approval process failed"):
        approvals.start(evil, data)


def test_median_waits_count_open_waits_up_to_now():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    now = start + timedelta(seconds=100)
    rows = [("Finance approval", "finance", start, start + timedelta(seconds=10)),
            ("Finance approval", "finance", start, start + timedelta(seconds=30)),
            ("Finance approval", "finance", start, None),
            ("Cloud administrator approval", "cloud-admin", start, start + timedelta(seconds=4))]
    assert median_waits(rows, now) == {("Finance approval", "finance"): 30,
                                       ("Cloud administrator approval", "cloud-admin"): 4}
