"""The CLI's OneFlow commands without a gateway: parsing, bad input and output."""
import json

import pytest

from cirrus import cli
from cirrus.client import ClientError, deployed
from tests.unit.test_cli import parse, usage_error

FLOW = {"id": 7, "name": "blog", "owner": "ann", "owner_id": 2, "template_id": 3,
        "state": "DEPLOYING", "deployment": "straight", "ready_status_gate": True,
        "custom_attrs": {"DB_PASSWORD": "s3cret"}, "networks": {"private": 4}, "message": "",
        "created_at": "2026-01-02T03:04:05Z", "updated_at": "2026-01-02T03:04:07Z",
        "roles": [
            {"name": "master", "state": "RUNNING", "cardinality": 1, "min_vms": None,
             "max_vms": None, "parents": [], "cooldown_until": None, "message": "",
             "nodes": [{"vm_id": 10, "status": "RUNNING", "ready": True}]},
            {"name": "slave", "state": "DEPLOYING", "cardinality": 3, "min_vms": 1,
             "max_vms": 5, "parents": ["master"], "cooldown_until": None, "message": "",
             "nodes": [{"vm_id": 11, "status": "RUNNING", "ready": False},
                       {"vm_id": 12, "status": "BOOT", "ready": False},
                       {"vm_id": 13, "status": "PROLOG", "ready": False}]}],
        "log": [{"at": "2026-01-02T03:04:05Z", "severity": "I",
                 "message": "deploying role master"}]}


# ----------------------------------------------------------------- parsing

def test_flow_template_commands_take_files_names_and_ids():
    assert parse("flow-template", "create", "blog.json").file == "blog.json"
    assert parse("flow-template", "create", "-").file == "-"
    args = parse("flow-template", "update", "blog", "new.json")
    assert (args.id, args.file) == ("blog", "new.json")
    assert parse("flow-template", "show", "12").id == 12
    args = parse("flow-template", "clone", "3", "blog-copy")
    assert (args.id, args.name) == (3, "blog-copy")


def test_instantiate_takes_attributes_and_networks():
    args = parse("flow-template", "instantiate", "blog", "--name", "blog-1",
                 "--attr", "DB_PASSWORD=a=b", "--attr", "Mixed_Case=", "--network", "private=4",
                 "--network", "public=lan")
    assert (args.id, args.name) == ("blog", "blog-1")
    assert args.attr == [("DB_PASSWORD", "a=b"), ("Mixed_Case", "")]
    assert args.network == [("private", 4), ("public", "lan")]
    args = parse("flow-template", "instantiate", "3")
    assert (args.attr, args.network) == (None, None)


def test_flow_commands():
    args = parse("flow", "scale", "blog", "slave", "4", "--force")
    assert (args.id, args.role, args.cardinality, args.force) == ("blog", "slave", 4, True)
    args = parse("flow", "action", "7", "slave", "poweroff", "--period", "30", "--number", "2")
    assert (args.id, args.role, args.role_action, args.period, args.number) == (
        7, "slave", "poweroff", 30, 2)
    assert (parse("flow", "action", "7", "slave", "reboot").period,
            parse("flow", "action", "7", "slave", "reboot").number) == (0, 0)
    assert parse("flow", "recover", "7", "--delete").delete is True
    assert parse("flow", "recover", "7").delete is False
    assert parse("flow", "deploy-wait", "blog").timeout == 600.0
    args = parse("flow", "add-role", "blog", "cache.json")
    assert (args.id, args.file) == ("blog", "cache.json")
    args = parse("flow", "remove-role", "7", "cache")
    assert (args.id, args.role) == (7, "cache")
    assert parse("flow", "show", "7", "--json").json is True


@pytest.mark.parametrize("argv, message", [
    (("flow-template", "instantiate", "3", "--attr", "NOVALUE"), "give NAME=VALUE"),
    (("flow-template", "instantiate", "3", "--network", "=4"), "give NAME=VALUE"),
    (("flow-template", "clone", "3"), "name"),
    (("flow", "scale", "7", "slave"), "N"),
    (("flow", "scale", "7", "slave", "two"), "invalid number 'two'"),
    (("flow", "action", "7", "slave"), "ACTION"),
    (("flow", "deploy-wait", "7", "--timeout", "0"), "must be greater than 0"),
    (("flow", "add-role", "7"), "FILE"),
    (("flow", "remove-role", "7"), "ROLE"),
    (("flow", "show", " "), "invalid service: give its name or id"),
    (("flow", "explode", "7"), "invalid choice: 'explode'"),
])
def test_bad_flow_arguments_are_usage_errors(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


# ----------------------------------------------------------------- template files

def run_main(capsys, *argv):
    """cli.main's exit code and stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_a_template_file_that_is_not_json_is_named_before_any_call(capsys, tmp_path):
    bad = tmp_path / "blog.json"
    bad.write_text('{"name": "blog",\n "roles": [}\n')
    # no gateway listens there: the file is refused before anything is sent
    for argv in (("flow-template", "create", str(bad)),
                 ("flow-template", "update", "3", str(bad)),
                 ("flow", "add-role", "3", str(bad))):
        code, err = run_main(capsys, "--address", "127.0.0.1:9", *argv)
        assert (code, err) == (1, f"cirrus: INVALID_ARGUMENT: '{bad}' is not JSON: "
                                  "Expecting value at line 2 column 12")


def test_a_missing_template_file_is_named(capsys, tmp_path):
    missing = tmp_path / "nope.json"
    code, err = run_main(capsys, "--address", "127.0.0.1:9", "flow-template", "create",
                         str(missing))
    assert (code, err) == (1, f"cirrus: INVALID_ARGUMENT: cannot read template file "
                              f"'{missing}': No such file or directory")


def test_json_from_stdin_is_read_as_it_is(monkeypatch):
    import io
    text = '{"name": "blog", "roles": [], "x-unknown": {"kept": true}}'
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert cli.read_json_file("-") == text
    monkeypatch.setattr("sys.stdin", io.StringIO("name: blog"))
    with pytest.raises(cli.UsageError, match="stdin is not JSON: Expecting value at line 1"):
        cli.read_json_file("-")


# ----------------------------------------------------------------- output

def test_flow_show_prints_roles_with_their_nodes():
    assert cli.flow_view(FLOW).splitlines() == [
        "SERVICE 7",
        "  NAME        blog",
        "  OWNER       ann",
        "  STATE       DEPLOYING",
        "  TEMPLATE    3",
        "  DEPLOYMENT  straight",
        "  READY_GATE  yes",
        "  CREATED     2026-01-02 03:04:05",
        "  UPDATED     2026-01-02 03:04:07",
        "",
        "CUSTOM ATTRIBUTES",
        "  DB_PASSWORD  s3cret",
        "",
        "NETWORKS",
        "  private  4",
        "",
        "ROLES",
        "NAME    STATE      RUNNING  MIN  MAX  PARENTS  COOLDOWN_UNTIL  MESSAGE",
        "master  RUNNING    1/1      -    -    -        -               -",
        "slave   DEPLOYING  0/3      1    5    master   -               -",
        "",
        "NODES",
        "ROLE    VM  STATUS   READY",
        "master  10  RUNNING  yes",
        "slave   11  RUNNING  no",
        "slave   12  BOOT     no",
        "slave   13  PROLOG   no",
        "",
        "LOG",
        "AT                   SEV  MESSAGE",
        "2026-01-02 03:04:05  I    deploying role master"]


def test_without_the_ready_gate_a_running_vm_counts_as_running():
    ungated = {**FLOW, "ready_status_gate": False}
    assert [cli.running_nodes(ungated, r) for r in ungated["roles"]] == [1, 1]
    assert [cli.running_nodes(FLOW, r) for r in FLOW["roles"]] == [1, 0]


def test_the_progress_view_shows_each_role_and_what_it_waits_for():
    assert cli.flow_progress(FLOW).splitlines() == [
        "SERVICE 7 (blog): DEPLOYING",
        "ROLE    STATE      PROGRESS                RUNNING  WAITING",
        "master  RUNNING    [####################]  1/1      -",
        "slave   DEPLOYING  [....................]  0/3      1 not READY, 1 BOOT, 1 PROLOG"]
    failed = {**FLOW, "state": "FAILED_DEPLOYING", "message": "VM 12 failed: boot_failure",
              "ready_status_gate": False, "roles": [{**FLOW["roles"][1], "cardinality": 0}]}
    assert cli.flow_progress(failed).splitlines() == [
        "SERVICE 7 (blog): FAILED_DEPLOYING  VM 12 failed: boot_failure",
        "ROLE   STATE      PROGRESS                RUNNING  WAITING",
        "slave  DEPLOYING  [####################]  1/0      1 BOOT, 1 PROLOG"]


def test_flow_and_template_tables():
    assert cli.flow_table([FLOW]).splitlines() == [
        "ID  NAME  OWNER  STATE      ROLES         VMS",
        "7   blog  ann    DEPLOYING  master,slave  4"]
    template = {"id": 3, "name": "blog", "owner": "ann", "created_at": "2026-01-02T03:04:05Z",
                "body": {"name": "blog", "roles": [{"name": "master"}, {"name": "slave"}]}}
    assert cli.flow_template_table([template]).splitlines() == [
        "ID  NAME  OWNER  ROLES         CREATED",
        "3   blog  ann    master,slave  2026-01-02 03:04:05"]
    view = cli.flow_template_view(template)
    assert view.startswith("SERVICE TEMPLATE 3\n  NAME     blog\n  OWNER    ann\n")
    assert json.loads(view.split("\n\n", 1)[1]) == template["body"]


def test_a_deploy_ends_running_or_fails_naming_the_state():
    assert deployed({**FLOW, "state": "RUNNING"}) is True
    for state in ("PENDING", "DEPLOYING", "WARNING", "SCALING"):
        assert deployed({**FLOW, "state": state}) is False
    for state in ("FAILED_DEPLOYING", "DONE"):
        with pytest.raises(ClientError) as exc_info:
            deployed({**FLOW, "state": state, "message": "VM 12: boot_failure"})
        assert (exc_info.value.code, exc_info.value.details) == (
            "FAILED_PRECONDITION", f"service 7 (blog) reached {state} instead of RUNNING: "
                                   "VM 12: boot_failure")


class Followed:
    """What deploy-wait reads from the SDK: the service as Watch shows it."""

    def __init__(self, states):
        self.states = states

    def flow_id(self, ref):
        return 7

    def follow_flow(self, service_id, timeout):
        for state in self.states:
            yield {**FLOW, "state": state}


def test_deploy_wait_draws_each_change_and_exits_0_when_running(capsys, monkeypatch):
    monkeypatch.setattr(cli, "client", lambda args: Followed(["DEPLOYING", "DEPLOYING",
                                                              "RUNNING", "SCALING"]))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["flow", "deploy-wait", "blog"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    # the same frame is drawn once; nothing is read after RUNNING
    assert [line for line in out.splitlines() if line.startswith("SERVICE")] == [
        "SERVICE 7 (blog): DEPLOYING", "SERVICE 7 (blog): RUNNING"]
    assert out.splitlines()[-1].startswith("service 7 (blog) is RUNNING after ")


def test_deploy_wait_exits_1_on_a_failed_state(capsys, monkeypatch):
    monkeypatch.setattr(cli, "client", lambda args: Followed(["DEPLOYING", "FAILED_DEPLOYING"]))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["flow", "deploy-wait", "7", "--json"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert [json.loads(line)["state"] for line in captured.out.splitlines()] == [
        "DEPLOYING", "FAILED_DEPLOYING"]
    assert captured.err == ("cirrus: FAILED_PRECONDITION: service 7 (blog) reached "
                            "FAILED_DEPLOYING instead of RUNNING\n")
