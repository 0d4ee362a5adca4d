"""The CLI's placement commands without a gateway: parsing and output."""
import pytest

from cirrus import cli
from tests.unit.test_cli import parse, usage_error


def test_host_update_takes_key_value_pairs_and_or_ha():
    args = parse("host", "update", "node-1", "ssd=yes", "RESERVED_CPU=-100", "ZONE=")
    assert (args.id, args.pairs, args.ha) == (
        "node-1", [("SSD", "yes"), ("RESERVED_CPU", "-100"), ("ZONE", "")], None)
    assert parse("host", "update", "3", "--ha", "reschedule").pairs == []


def test_host_update_with_nothing_to_change_is_refused():
    with pytest.raises(cli.UsageError, match="give --ha or KEY=VALUE pairs"):
        cli.cmd_host_update(parse("host", "update", "3"))


def test_cluster_commands():
    args = parse("cluster", "create", "gold", "TIER=gold", "RESERVED_MEM=1024")
    assert (args.name, args.pairs) == ("gold", [("TIER", "gold"), ("RESERVED_MEM", "1024")])
    args = parse("cluster", "addhost", "gold", "node-1")
    assert (args.id, args.host, args.func.__name__) == ("gold", "node-1", "run")
    assert parse("cluster", "delhost", "2", "7").host == 7
    assert parse("cluster", "show", "gold").id == "gold"


def test_vmgroup_create_reads_roles_rules_and_host_lists():
    args = parse("vmgroup", "create", "web", "--role", "db:anti_affined", "--role", "app",
                 "--anti-affined", "db,app", "--host-affined", "app:1,2",
                 "--host-anti-affined", "db:3")
    assert args.role == [{"name": "db", "policy": "ANTI_AFFINED"},
                         {"name": "app", "policy": None}]
    assert (args.anti_affined, args.affined) == ([["db", "app"]], None)
    assert (args.host_affined, args.host_anti_affined) == ([("app", [1, 2])], [("db", [3])])


@pytest.mark.parametrize("argv, message", [
    (("vmgroup", "create", "g"), "--role"),
    (("vmgroup", "create", "g", "--role", "a", "--affined", "a"), "give two roles or more"),
    (("vmgroup", "create", "g", "--role", "a", "--host-affined", "a:x"),
     "give ROLE:HOST_ID"),
    (("cluster", "create", "c", "TIER"), "give KEY=VALUE"),
])
def test_bad_placement_arguments_are_usage_errors(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_vm_create_takes_requirements_rank_and_a_vm_group():
    args = parse("vm", "create", "--memory", "512", "--requirements", 'SSD = "yes"',
                 "--rank=-RUNNING_VMS", "--vmgroup", "web:db")
    assert (args.requirements, args.rank, args.vmgroup) == ('SSD = "yes"', "-RUNNING_VMS",
                                                            "web:db")


def test_cluster_and_vmgroup_views():
    assert cli.cluster_view({"id": 2, "name": "gold", "template": {"TIER": "gold"},
                             "hosts": [{"id": 5, "name": "n5"}]}) == (
        'CLUSTER 2\n  NAME   gold\n  HOSTS  n5 (5)\n\nTEMPLATE\n  TIER = "gold"')
    view = cli.vmgroup_view({"id": 1, "name": "web", "roles": [
        {"name": "db", "policy": "ANTI_AFFINED", "host_affined": [1, 2], "vms": [9]},
        {"name": "app"}], "rules": [{"policy": "ANTI_AFFINED", "roles": ["db", "app"]}]})
    assert view.splitlines() == [
        "VM GROUP 1", "  NAME  web", "", "ROLES",
        "NAME  POLICY        HOST_AFFINED  HOST_ANTI_AFFINED  VMS",
        "db    ANTI_AFFINED  1,2           -                  9",
        "app   NONE          -             -                  -",
        "", "RULES", "  ANTI_AFFINED  db,app"]
    assert cli.vmgroup_table([{"id": 1, "name": "web", "roles": [
        {"name": "db", "vms": [9, 10]}, {"name": "app"}]}]).splitlines() == [
        "ID  NAME  ROLES   VMS", "1   web   db,app  2"]
