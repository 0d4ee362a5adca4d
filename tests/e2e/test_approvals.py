"""Issue 8 end to end through the ``cirrus`` CLI on a whole cluster: users of
each role, a VM that is provisioned at once, one that waits for finance and
then the cloud administrator, a rejection, a quota, the audit export and the
CMDB file."""
import json
import os
import stat
import subprocess

import pytest

from tests.e2e.conftest import Cluster
from tests.procs import BIN
from tests.requests_fixtures import cmdb_lines, write_config

PASSWORD = "e2e-password"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approvals")
    c = Cluster(tmp)
    c.cmdb = tmp / "cmdb.jsonl"
    c.env["CIRRUS_CONFIG"] = str(write_config(tmp / "cirrus.yaml", c.cmdb))
    c.start()
    yield c
    c.stop()


def as_user(cluster, user, *args, check=True):
    """The CLI as ``user`` (by password), in its own HOME so no token file interferes."""
    home = cluster.tmp / f"home-{user}"
    home.mkdir(exist_ok=True)
    env = {**cluster.env, "HOME": str(home), "CIRRUS_USER": user, "CIRRUS_PASSWORD": PASSWORD}
    done = subprocess.run([str(BIN / "cirrus"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"cirrus {args}: {done.stdout}{done.stderr}"
    return done


def test_approvals_through_the_cli(cluster):
    for name, role in (("dev", "user"), ("fin", "finance"), ("ops", "cloud-admin")):
        cluster.cli("user", "create", name, "--role", role, "--password", PASSWORD)

    # login stores a token only its owner can read, and it works
    home = cluster.tmp / "home-login"
    done = subprocess.run([str(BIN / "cirrus"), "login", "--user", "dev", "--password", PASSWORD],
                          env={**cluster.env, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token_file = home / ".config" / "cirrus" / "token"
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert "valid until" in done.stdout

    # 1 vCPU: a VM at once, printed as its id like before
    small = as_user(cluster, "dev", "vm", "create", "--name", "small", "--vcpu", "1",
                    "--memory", "64")
    assert small.stdout.strip().isdigit()

    # 4 vCPU and 32 GB: finance first, the administrator after
    big = as_user(cluster, "dev", "vm", "create", "--name", "big", "--vcpu", "4",
                  "--memory", str(32 * 1024), "--json")
    request = json.loads(big.stdout)
    assert (request["state"], request["waiting_for"]) == ("WAITING", "finance")
    rid = request["id"]
    waiting = json.loads(as_user(cluster, "ops", "request", "list", "--waiting-for",
                                 "cloud-admin", "--json").stdout)
    assert rid not in [r["id"] for r in waiting]
    refused = as_user(cluster, "ops", "request", "approve", rid, "--reason", "early", check=False)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    out = as_user(cluster, "fin", "request", "approve", rid, "--reason", "budgeted").stdout
    assert "waiting for cloud-admin" in out
    twice = as_user(cluster, "fin", "request", "approve", rid, "--reason", "again", check=False)
    assert twice.returncode == 1 and "FAILED_PRECONDITION" in twice.stderr
    as_user(cluster, "ops", "request", "approve", rid, "--reason", "capacity ok")
    shown = json.loads(as_user(cluster, "dev", "request", "show", rid, "--json").stdout)
    assert shown["state"] == "PROVISIONED" and len(shown["vm_ids"]) == 1
    assert shown["vm"]["name"] == "big"
    human = as_user(cluster, "dev", "request", "show", rid).stdout
    assert "DECISIONS" in human and "budgeted" in human and "capacity ok" in human

    # a rejection: the requester sees why, nothing is made
    medium = as_user(cluster, "dev", "vm", "create", "--name", "medium", "--vcpu", "4",
                     "--memory", "1024")
    assert "waits for approval by cloud-admin" in medium.stdout
    mid = int(medium.stdout.split()[1])
    as_user(cluster, "ops", "request", "reject", mid, "--reason", "use two vCPUs")
    seen = json.loads(as_user(cluster, "dev", "request", "show", mid, "--json").stdout)
    assert (seen["state"], seen["reason"], seen["vm_ids"]) == ("REJECTED", "use two vCPUs", [])

    # a quota
    cluster.cli("quota", "set", "user", "dev", "--vms", "2")
    over = as_user(cluster, "dev", "vm", "create", "--name", "third", "--memory", "64",
                   check=False)
    assert over.returncode == 1 and "RESOURCE_EXHAUSTED" in over.stderr
    assert "quota of vms exceeded by 1" in over.stderr

    stats = as_user(cluster, "fin", "request", "stats").stdout
    assert "Finance approval" in stats and "Cloud administrator approval" in stats

    # the audit export and the CMDB file hold every decision
    lines = [json.loads(line) for line in cluster.cli("audit", "list", "--jsonl").stdout
             .splitlines()]
    decisions = {(e["action"], e["actor"], e["reason"]) for e in lines}
    assert {("request.approved", "fin", "budgeted"), ("request.approved", "ops", "capacity ok"),
            ("request.rejected", "ops", "use two vCPUs")} <= decisions
    records = {r["request_id"]: r for r in cmdb_lines(cluster.cmdb)
               if r.get("type") == "provision_request"}
    assert records[rid]["state"] == "PROVISIONED"
    assert [d["decided_by"] for d in records[rid]["decisions"]] == ["fin", "ops"]
    assert records[mid]["state"] == "REJECTED"
