"""The cirrus CLI without a gateway: argument parsing, output formats, the
token file and where credentials come from."""
import os
import stat
from datetime import datetime, timezone

import pytest

from cirrus import cli, client
from tests.procs import free_port


def parse(*argv):
    return cli.build_parser().parse_args(argv)


def usage_error(capsys, *argv):
    """Parse argv expecting a usage error; returns what was printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------- parsing

def test_vm_create_takes_the_resources_and_leaves_the_rest_to_the_template():
    args = parse("vm", "create", "--name", "web", "--cpu", "0.5", "--vcpu", "2",
                 "--memory", "512", "--hold")
    assert (args.name, args.cpu, args.vcpu, args.memory, args.hold) == ("web", 0.5, 2, 512, True)
    args = parse("vm", "create", "--file", "t.one")
    assert (args.name, args.cpu, args.vcpu, args.memory, args.file) == (None, None, None, None,
                                                                         "t.one")


@pytest.mark.parametrize("option,value", [("--vcpu", "1.5"),
                                          ("--memory", "lots"), ("--memory", str(2 ** 31))])
def test_vm_create_refuses_bad_resources_naming_the_option(capsys, option, value):
    err = usage_error(capsys, "vm", "create", option, value)
    assert f"argument {option}" in err


@pytest.mark.parametrize("argv", [
    ("host", "show", "0"), ("host", "flush", str(2 ** 31)),
    ("vm", "show", "web"), ("vm", "terminate", "0"), ("vm", "wait", "two", "--state", "RUNNING"),
    ("vm", "watch", "all"), ("vm", "poweroff", "1.5"), ("vm", "migrate", "x", "node-2"),
    ("template", "instantiate", "t1"),
])
def test_ids_must_be_positive_whole_numbers(capsys, argv):
    err = usage_error(capsys, *argv)
    assert "invalid id" in err and repr(argv[2]) in err


def test_ids_are_ints():
    assert parse("host", "show", "7").id == 7
    assert parse("vm", "terminate", "42", "--hard").id == 42
    assert parse("template", "instantiate", "3", "--name", "n", "--hold").id == 3


@pytest.mark.parametrize("action", ["show", "enable", "disable", "offline", "flush", "delete"])
def test_host_commands_take_a_name_or_an_id(action):
    assert parse("host", action, "node-1.example").id == "node-1.example"
    assert parse("host", action, "12").id == 12


def test_an_empty_host_name_is_refused(capsys):
    assert "give its name or id" in usage_error(capsys, "host", "flush", " ")


# ----------------------------------------------------------------- VM actions

@pytest.mark.parametrize("action,has_hard", [
    ("terminate", True), ("poweroff", True), ("undeploy", True), ("reboot", True),
    ("suspend", False), ("stop", False), ("resume", False), ("hold", False),
    ("release", False), ("resched", False), ("unresched", False),
])
def test_every_vm_action_takes_an_id_and_hard_where_it_applies(capsys, action, has_hard):
    args = parse("vm", action, "5")
    assert args.id == 5 and args.func.__name__ == "run"
    if has_hard:
        assert parse("vm", action, "5", "--hard").hard is True
        assert args.hard is False
    else:
        assert "unrecognized arguments: --hard" in usage_error(capsys, "vm", action, "5",
                                                               "--hard")


def test_migrate_and_deploy_take_a_host_by_name_or_id(capsys):
    args = parse("vm", "migrate", "5", "node-2", "--live")
    assert (args.id, args.host, args.live) == (5, "node-2", True)
    assert parse("vm", "migrate", "5", "2").live is False
    assert parse("vm", "deploy", "5", "2").host == 2
    assert "HOST" in usage_error(capsys, "vm", "migrate", "5")
    assert "HOST" in usage_error(capsys, "vm", "deploy", "5")
    assert "--live" in usage_error(capsys, "vm", "deploy", "5", "2", "--live")


def test_recover_takes_exactly_one_operation(capsys):
    for operation in ("success", "failure", "retry", "delete", "recreate"):
        assert parse("vm", "recover", "3", f"--{operation}").operation == operation
    err = usage_error(capsys, "vm", "recover", "3")
    assert "one of the arguments --success --failure --retry --delete --recreate is required" \
        in err
    err = usage_error(capsys, "vm", "recover", "3", "--delete", "--retry")
    assert "--retry: not allowed with argument --delete" in err


def test_an_unknown_vm_action_names_it(capsys):
    err = usage_error(capsys, "vm", "explode", "3")
    assert "invalid choice: 'explode'" in err and "poweroff" in err


def test_watch_and_top_filters():
    args = parse("vm", "watch", "--status", "running", "--user", "ann")
    assert (args.id, args.status, args.user) == (None, "running", "ann")
    args = parse("vm", "top", "--once", "--status", "ACTIVE")
    assert (args.once, args.iterations, args.status, args.delay) == (True, None, "ACTIVE", 1.0)
    assert parse("vm", "top", "--iterations", "3", "--delay", "0.2").iterations == 3


def test_top_frames_are_once_or_a_positive_count(capsys):
    assert "not allowed with argument" in usage_error(capsys, "vm", "top", "--once",
                                                      "--iterations", "2")
    assert "must be greater than 0" in usage_error(capsys, "vm", "top", "--iterations", "0")


# ----------------------------------------------------------------- hosts and accounting

def test_host_create_and_update_take_an_ha_policy(capsys):
    assert parse("host", "create", "node-9").ha is None
    assert parse("host", "create", "node-9", "--ha", "reschedule").ha == "reschedule"
    args = parse("host", "update", "node-9", "--ha", "none")
    assert (args.id, args.ha) == ("node-9", "none")
    assert "invalid choice: 'always'" in usage_error(capsys, "host", "create", "n",
                                                     "--ha", "always")
    assert "invalid 'SSD'" in usage_error(capsys, "host", "update", "3", "SSD")


def test_accounting_reads_iso_dates_and_times_as_utc():
    args = parse("accounting", "--user", "ann", "--start", "2026-01-31",
                 "--end", "2026-02-01T12:30:00Z")
    assert args.user == "ann"
    assert args.start == datetime(2026, 1, 31, tzinfo=timezone.utc)
    assert args.end == datetime(2026, 2, 1, 12, 30, tzinfo=timezone.utc)
    start = parse("accounting", "--start", "2026-01-31T10:00:00+02:00").start
    assert start == datetime(2026, 1, 31, 8, tzinfo=timezone.utc)
    assert parse("accounting").start is None


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01", "31/01/2026", ""])
def test_a_bad_accounting_time_is_named(capsys, value):
    err = usage_error(capsys, "accounting", "--end", value)
    assert f"argument --end: invalid time {value!r}" in err and "ISO" in err


def test_vm_wait_needs_a_known_state_and_reads_it_in_any_case(capsys):
    args = parse("vm", "wait", "4", "--state", "running")
    assert (args.id, args.state, args.timeout) == (4, "RUNNING", 60.0)
    assert parse("vm", "wait", "4", "--state", "DONE", "--timeout", "5").timeout == 5.0
    assert "unknown VM state 'ACTIV'" in usage_error(capsys, "vm", "wait", "4", "--state", "ACTIV")
    assert "--state" in usage_error(capsys, "vm", "wait", "4")
    assert "--timeout" in usage_error(capsys, "vm", "wait", "4", "--state", "DONE",
                                      "--timeout", "-1")


def test_vm_watch_takes_an_optional_id():
    assert parse("vm", "watch").id is None
    assert parse("vm", "watch", "9").id == 9


@pytest.mark.parametrize("argv", [
    ("host", "list"), ("host", "show", "1"), ("vm", "list"), ("vm", "list", "--all"),
    ("vm", "show", "1"), ("template", "list"), ("template", "show", "1"),
    ("vm", "watch"), ("vm", "wait", "1", "--state", "RUNNING"), ("accounting",),
    ("vm", "poweroff", "1"), ("host", "flush", "n"),
])
def test_every_read_command_has_json(argv):
    assert parse(*argv, "--json").json is True
    assert parse(*argv).json is False


def test_a_missing_command_is_a_usage_error(capsys):
    usage_error(capsys)
    usage_error(capsys, "vm")
    assert "invalid choice" in usage_error(capsys, "vm", "explode")


def test_template_create_needs_a_file(capsys):
    assert "--file" in usage_error(capsys, "template", "create")


# ----------------------------------------------------------------- errors

def test_an_unreachable_gateway_prints_the_status_and_exits_1(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--address", address, "host", "list"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("cirrus: UNAVAILABLE: ") and address in err


def test_an_unreadable_template_file_is_named(capsys, tmp_path):
    missing = tmp_path / "nope.one"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["vm", "create", "--file", str(missing)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == (
        f"cirrus: INVALID_ARGUMENT: cannot read template file '{missing}': "
        "No such file or directory")


# ----------------------------------------------------------------- formatting

VM = {"id": 42, "name": "web", "owner": "admin", "state": "ACTIVE", "lcm_state": "RUNNING",
      "status": "RUNNING", "short_status": "runn", "host": "node1", "host_id": 1,
      "cpu": 0.5, "vcpu": 1, "memory": 1536, "deploy_id": "one-42", "error": None,
      "sched_message": None, "seq": 4, "created_at": "2026-01-02T03:04:05.123Z",
      "updated_at": "2026-01-02T03:04:09Z", "template": {"NAME": "web", "MEMORY": "1536"},
      "history": [
          {"seq": 1, "action": "allocate", "from_status": "INIT", "to_status": "PENDING",
           "host": None, "message": None, "at": "2026-01-02T03:04:05Z"},
          {"seq": 2, "action": "deploy", "from_status": "PENDING", "to_status": "PROLOG",
           "host": "node1", "message": None, "at": "2026-01-02T03:04:06Z"},
      ]}


def test_format_table_aligns_columns_and_shows_none_as_a_dash():
    assert cli.format_table(["ID", "NAME"], [[1, "a"], [100, None]]).splitlines() == [
        "ID   NAME", "1    a", "100  -"]


def test_vm_table_has_the_onevm_columns():
    pending = {**VM, "id": 7, "name": "db", "status": "PENDING", "short_status": "pend",
               "host": None, "cpu": 2.0, "memory": 512}
    lines = cli.vm_table([VM, pending]).splitlines()
    assert lines[0].split() == ["ID", "NAME", "OWNER", "STAT", "HOST", "CPU", "MEM"]
    assert lines[1].split() == ["42", "web", "admin", "runn", "node1", "0.5", "1.5G"]
    assert lines[2].split() == ["7", "db", "admin", "pend", "-", "2", "512M"]


def test_megabytes_reads_like_onevm():
    assert [cli.megabytes(m) for m in (64, 1024, 1536, 4096)] == ["64M", "1G", "1.5G", "4G"]


def test_vm_view_shows_the_state_host_and_history():
    view = cli.vm_view(VM)
    assert view.startswith("VIRTUAL MACHINE 42")
    assert "LCM_STATE  RUNNING" in view and "node1 (id 1)" in view
    assert "ERROR" not in view      # unset fields are left out
    history = view.split("HISTORY\n", 1)[1].splitlines()
    assert history[0].split() == ["SEQ", "ACTION", "FROM", "TO", "HOST", "AT", "MESSAGE"]
    assert history[2].split()[:5] == ["2", "deploy", "PENDING", "PROLOG", "node1"]


def test_host_view_lists_monitoring_and_domains():
    host = {"id": 1, "name": "node1", "state": "MONITORED", "running_vms": 1,
            "cpu_usage": 50, "max_cpu": 400, "mem_usage": 512, "max_mem": 8192,
            "last_monitored_at": "2026-01-02T03:04:05Z",
            "monitoring": {"HYPERVISOR": "test", "TOTALCPU": 400.0,
                           "VMS": [{"VM_ID": 42.0, "DEPLOY_ID": "one-42", "STATE": "a"}]}}
    view = cli.host_view(host)
    assert "ALLOC_MEM    512M / 8G" in view and "HYPERVISOR  test" in view
    assert "one-42" in view.split("DOMAINS", 1)[1]
    assert cli.host_table([host]).splitlines()[1].split() == [
        "1", "node1", "MONITORED", "1", "50", "/", "400", "512M", "/", "8G"]


def test_vm_view_shows_the_stays_and_the_latest_monitoring():
    vm = {**VM, "resched": True, "target_host": "node2",
          "monitoring": {"CPU": 12.5, "MEMORY": 65536, "STATE": "RUNNING"},
          "stays": [{"host": "node1", "host_id": 1, "start": "2026-01-02T03:04:06Z",
                     "end": "2026-01-02T04:04:06Z", "reason": "migrate", "ended_by": "migrate",
                     "prolog_seconds": 1.25, "boot_seconds": 0.5, "running_seconds": 3599.0,
                     "epilog_seconds": 0.0},
                    {"host": "node2", "host_id": 2, "start": "2026-01-02T04:04:06Z",
                     "end": None, "reason": None, "ended_by": None, "prolog_seconds": 2.0,
                     "boot_seconds": 1.0, "running_seconds": 65.0, "epilog_seconds": 0.0}]}
    view = cli.vm_view(vm)
    assert "MIGRATING_TO  node2" in view and "RESCHED       yes" in view
    assert "CPU     12.5" in view.split("MONITORING\n", 1)[1]
    stays = view.split("STAYS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert stays[0].split() == ["HOST", "START", "END", "REASON", "PROLOG", "BOOT", "RUNNING",
                                "EPILOG"]
    assert stays[1].split() == ["node1", "2026-01-02", "03:04:06", "2026-01-02", "04:04:06",
                                "migrate", "1.2s", "0.5s", "59m59s", "0.0s"]
    assert stays[2].split() == ["node2", "2026-01-02", "04:04:06", "-", "-", "2.0s", "1.0s",
                                "1m05s", "0.0s"]


def test_vm_view_lists_the_disks_nics_and_context_cd():
    vm = {**VM,
          "disks": [{"id": 0, "target": "vda", "type": "file", "image": "debian",
                     "image_id": 3, "source": "/img/debian.qcow2", "clone": "overlay",
                     "size_mb": 2048, "path": "/var/lib/cirrus/42/disk.0", "readonly": False},
                    {"id": 1, "target": "vdb", "type": "swap", "image": None, "source": None,
                     "clone": None, "size_mb": 512, "path": None, "readonly": False}],
          "nics": [{"id": 0, "network": "priv", "network_id": 2, "ip": "10.0.0.5",
                    "ip6": None, "mac": "02:00:0a:00:00:05", "gateway": "10.0.0.1",
                    "model": "virtio"}],
          "context": {"path": "/var/lib/cirrus/42/context.iso", "token": True,
                      "values": {"VMID": "42", "MOTD": "it's\n$(x)"}}}
    view = cli.vm_view(vm)
    disks = view.split("DISKS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert disks[0].split() == ["ID", "TARGET", "IMAGE", "TYPE", "CLONE", "SIZE", "PATH"]
    assert disks[1].split() == ["0", "vda", "debian", "file", "overlay", "2G",
                                "/var/lib/cirrus/42/disk.0"]
    assert disks[2].split() == ["1", "vdb", "-", "swap", "-", "512M", "-"]
    nics = view.split("NICS\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert nics[0].split() == ["ID", "NETWORK", "IP", "MAC", "GATEWAY", "IP6"]
    assert nics[1].split() == ["0", "priv", "10.0.0.5", "02:00:0a:00:00:05", "10.0.0.1", "-"]
    context = view.split("\nCONTEXT\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert context[:2] == ["  CD     /var/lib/cirrus/42/context.iso", "  TOKEN  yes"]
    # a value that spans lines stays on one, quoted
    assert context[2:] == ['  VMID = "42"', '  MOTD = "it\'s\\n$(x)"']


def test_vm_view_leaves_out_devices_a_vm_does_not_hold():
    view = cli.vm_view({**VM, "disks": [], "nics": [], "context": None})
    assert "DISKS" not in view and "NICS" not in view and "\nCONTEXT\n" not in view


def test_duration_reads_as_seconds_minutes_or_hours():
    assert [cli.duration(s) for s in (0, 4.24, 184, 7380)] == ["0.0s", "4.2s", "3m04s", "2h03m"]


def test_accounting_view_lists_vms_then_users():
    report = {"start": "2026-01-01T00:00:00Z", "end": None,
              "vms": [{"id": 3, "name": "web", "owner": "ann", "owner_id": 2, "hours": 2.0,
                       "cpu_hours": 1.0, "memory_gb_hours": 0.5}],
              "users": [{"owner": "ann", "owner_id": 2, "vms": 1, "cpu_hours": 1.0,
                         "memory_gb_hours": 0.5}]}
    lines = cli.accounting_view(report).splitlines()
    assert lines[0] == "VM usage from 2026-01-01 00:00:00 to now (UTC)"
    assert lines[1].split() == ["ID", "NAME", "OWNER", "HOURS", "CPU_HOURS", "MEM_GB_HOURS"]
    assert lines[2].split() == ["3", "web", "ann", "2.00", "1.00", "0.50"]
    assert lines[4].split() == ["USER", "VMS", "CPU_HOURS", "MEM_GB_HOURS"]
    assert lines[5].split() == ["ann", "1", "1.00", "0.50"]


def change(vm_id, status, seq, state="ACTIVE", host="node1", name="web"):
    return {"id": vm_id, "name": name, "state": state, "status": status, "seq": seq,
            "short_status": status[:4].lower(), "host": host, "error": None}


def test_top_follows_changes_and_drops_done_vms():
    top = cli.VmTop()
    top.load([{**VM, "monitoring": {"CPU": 50.0, "MEMORY": 524288}}])
    assert top.apply(change(42, "SHUTDOWN_POWEROFF", 5))
    assert not top.apply(change(42, "RUNNING", 4))        # older than what is shown
    assert not top.apply(change(42, "SHUTDOWN_POWEROFF", 5))
    assert top.apply(change(9, "PENDING", 1, state="PENDING", host=None, name="db"))
    lines = top.render().splitlines()
    assert lines[0].endswith("UTC  2 VMs")
    assert lines[1].split() == ["ID", "NAME", "OWNER", "STAT", "HOST", "CPU", "MEM", "UCPU",
                                "UMEM"]
    assert lines[2].split() == ["9", "db", "-", "pend", "-", "-", "-", "-", "-"]
    assert lines[3].split() == ["42", "web", "admin", "shut", "node1", "0.5", "1.5G", "50%",
                                "512M"]
    assert top.apply(change(42, "DONE", 9, state="DONE", host=None))
    assert not top.apply(change(42, "DONE", 9, state="DONE", host=None))
    assert [line.split()[0] for line in top.render().splitlines()[2:]] == ["9"]


def test_top_narrows_to_a_status_or_state_and_a_user():
    vms = [{**VM, "id": 1}, {**VM, "id": 2, "status": "PENDING", "state": "PENDING"},
           {**VM, "id": 3, "owner": "ann", "status": "POWEROFF", "state": "POWEROFF"}]
    for status, user, shown in [("running", None, ["1"]), ("ACTIVE", None, ["1"]),
                                (None, "ann", ["3"]), (None, None, ["1", "2", "3"]),
                                ("PENDING", "ann", [])]:
        top = cli.VmTop(status, user)
        top.load(vms)
        assert [line.split()[0] for line in top.render().splitlines()[2:]] == shown


def test_change_line_names_the_vm_and_its_status():
    change = {"id": 42, "name": "web", "status": "BOOT_FAILURE", "host": "node1", "seq": 3,
              "error": "no such image", "at": "2026-01-02T03:04:05Z", "current": False}
    assert cli.change_line(change) == (
        "2026-01-02 03:04:05  VM 42 web  BOOT_FAILURE  host=node1  seq=3  error=no such image")


# ----------------------------------------------------------------- credentials

@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("CIRRUS_TOKEN", "CIRRUS_USER", "CIRRUS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_the_token_file_is_private(home):
    path = client.save_token("secret")
    assert path == home / ".config" / "cirrus" / "token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    path.chmod(0o644)
    client.save_token("newer")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert client.read_token() == "newer"


def test_credentials_come_from_env_token_then_file_then_user_then_config(home, monkeypatch):
    from cirrus import config
    admin = config.get()["auth"]
    assert client.default_credentials() == {"username": str(admin["admin_user"]),
                                            "password": str(admin["admin_password"])}
    monkeypatch.setenv("CIRRUS_USER", "ann")
    monkeypatch.setenv("CIRRUS_PASSWORD", "pw")
    assert client.default_credentials() == {"username": "ann", "password": "pw"}
    client.save_token("from-file")
    assert client.default_credentials() == {"token": "from-file"}
    monkeypatch.setenv("CIRRUS_TOKEN", "from-env")
    assert client.default_credentials() == {"token": "from-env"}


def test_authorization_metadata():
    assert client.authorization({"token": "t0k"}) == "Bearer t0k"
    assert client.authorization({"username": "ann", "password": "p:w"}) == "Basic YW5uOnA6dw=="


def test_host_ids_pass_through_without_a_call():
    with client.Client(address=f"127.0.0.1:{free_port()}", token="t") as api:
        assert (api.host_id(4), api.host_id("17")) == (4, 17)


def test_wait_vm_refuses_an_unknown_status_before_calling():
    with client.Client(address=f"127.0.0.1:{free_port()}", token="t") as api:
        with pytest.raises(client.ClientError) as exc_info:
            api.wait_vm(1, "SLEEPING", timeout=1)
    assert exc_info.value.code == "INVALID_ARGUMENT" and "'SLEEPING'" in exc_info.value.details
