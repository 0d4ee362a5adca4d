"""Commands are checked and dispatched to a backend; the simulated backend
stands in for a hypervisor in scale tests; libvirt's lifecycle events map to
backend states."""
import pytest

import libvirt

from cirrus import messages
from services.drivers import backend
from services.drivers.libvirt_backend import event_state
from services.drivers.simulated import SimulatedBackend
from services.drivers.worker import ACTIONS, command_problem, run_command


def vm(vm_id=5, **template):
    return {"id": vm_id, "name": "db", "cpu": 1, "vcpu": 1, "memory": 64,
            "template": template, "deploy_id": None}


def cmd(action, spec=None, **args):
    spec = spec or vm()
    return messages.command(action, spec["id"], "node-1", vm=spec, **args)


@pytest.mark.parametrize("bad, named", [
    ("deploy", "JSON object"),
    ({"action": "deploy", "vm_id": 5, "args": {"vm": vm()}}, "no id"),
    ({**cmd("deploy"), "action": "explode"}, "unknown action 'explode'"),
    ({**cmd("deploy"), "action": None}, "unknown action None"),
    ({**cmd("deploy"), "args": {}}, "args.vm"),
    ({**cmd("deploy"), "args": "x"}, "args.vm"),
    ({**cmd("deploy"), "args": {"vm": {**vm(), "id": "5"}}}, "args.vm.id"),
    ({**cmd("deploy"), "vm_id": 6}, "vm_id 6 does not match"),
    (cmd("restore", {**vm(), "runtime": ["checkpoint"]}), "args.vm.runtime"),
    (cmd("migrate", dest_uri="qemu:///system"), "args.dest_host"),
    (cmd("migrate", dest_host="node-2"), "args.dest_uri"),
    (cmd("migrate", dest_host="node-2", dest_uri=" "), "args.dest_uri"),
    (cmd("mv"), "args.direction: mv needs one of out, in, got None"),
    (cmd("mv", direction="sideways"), "got 'sideways'"),
    (cmd("mv", direction="in", from_dir=7), "args.from_dir"),
])
def test_malformed_commands_are_named(bad, named):
    assert named in command_problem(bad)


def test_every_driver_action_has_a_handler():
    assert set(ACTIONS) == set(messages.DRIVER_ACTIONS)


@pytest.mark.parametrize("good", [
    cmd("restore", {**vm(), "runtime": None}),
    cmd("restore", {**vm(), "runtime": {"checkpoint": "/ds/5/checkpoint"}}),
    cmd("migrate", dest_host="node-2", dest_uri="qemu+ssh://n2/system"),
    cmd("mv", direction="out"),
    cmd("mv", direction="in", from_dir="/parked/5"),
    cmd("reboot"), cmd("reset"), cmd("save"),
])
def test_well_formed_new_commands_pass(good):
    assert command_problem(good) is None


@pytest.mark.parametrize("event, detail, expected", [
    ("STARTED", "BOOTED", (backend.RUNNING, "STARTED/BOOTED")),
    ("STARTED", "RESTORED", (backend.RUNNING, "STARTED/RESTORED")),
    ("RESUMED", "UNPAUSED", (backend.RUNNING, "RESUMED/UNPAUSED")),
    ("SUSPENDED", "PAUSED", (backend.PAUSED, "SUSPENDED/PAUSED")),
    ("PMSUSPENDED", "MEMORY", (backend.PAUSED, "PMSUSPENDED/MEMORY")),
    ("STOPPED", "DESTROYED", (backend.POWEROFF, "STOPPED/DESTROYED")),
    ("STOPPED", "SHUTDOWN", (backend.POWEROFF, "STOPPED/SHUTDOWN")),
    ("STOPPED", "SAVED", (backend.POWEROFF, "STOPPED/SAVED")),
    ("STOPPED", "CRASHED", (backend.CRASHED, "STOPPED/CRASHED")),
    ("STOPPED", "FAILED", (backend.CRASHED, "STOPPED/FAILED")),
    ("CRASHED", "PANICKED", (backend.CRASHED, "CRASHED/PANICKED")),
    ("UNDEFINED", "REMOVED", (backend.GONE, "UNDEFINED/REMOVED")),
    # no news: a definition changes no state, and SHUTDOWN also comes before a
    # reboot's reset (STOPPED follows a real power off)
    ("DEFINED", "ADDED", None),
    ("SHUTDOWN", "FINISHED", None),
    ("SHUTDOWN", "GUEST", None),
])
def test_libvirt_lifecycle_events_map_to_states(event, detail, expected):
    assert event_state(getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}"),
                       getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}_{detail}")) == expected


def test_an_event_libvirt_adds_later_is_ignored_and_an_unknown_detail_named():
    assert event_state(999, 0) is None
    assert event_state(libvirt.VIR_DOMAIN_EVENT_STOPPED, 99) == (backend.POWEROFF, "STOPPED/99")


def test_a_malformed_command_gets_a_failure_not_an_exception():
    result = run_command(SimulatedBackend(), {**cmd("deploy"), "action": "explode"}, 1)
    assert result["success"] is False
    assert "unknown action 'explode'" in result["error"]
    assert result["action"] == "explode"


def test_deploy_answers_with_the_deploy_id_and_is_idempotent():
    sim = SimulatedBackend()
    first = run_command(sim, cmd("deploy"), 1)
    again = run_command(sim, cmd("deploy"), 1)
    assert first["success"] and again["success"]
    assert first["info"] == again["info"] == {"deploy_id": "cirrus-5"}
    assert run_command(sim, cmd("poll"), 1)["info"]["STATE"] == backend.RUNNING


def test_stop_and_delete_of_a_missing_vm_succeed():
    sim = SimulatedBackend()
    for action in ("shutdown", "cancel", "delete"):
        assert run_command(sim, cmd(action, vm(99)), 1)["success"], action
    assert run_command(sim, cmd("poll", vm(99)), 1)["info"] == {"STATE": backend.GONE}


def test_scripted_failure_carries_its_message():
    sim = SimulatedBackend()
    spec = vm(SIMULATE_FAIL="clone, shutdown")
    assert run_command(sim, cmd("deploy", spec), 1)["success"]
    result = run_command(sim, cmd("clone", spec), 1)
    assert not result["success"] and "simulated clone failure" in result["error"]
    # shutdown only gets the deploy id; the template comes from the deploy
    result = run_command(sim, cmd("shutdown", spec), 1)
    assert not result["success"] and "simulated shutdown failure" in result["error"]
    assert run_command(sim, cmd("cancel", spec), 1)["success"]


def test_simulated_monitoring_reports_fixed_capacity_and_its_domains():
    sim = SimulatedBackend(cores=8, memory_mb=1024)
    sim.deploy(vm(1))
    sim.deploy(vm(2))
    sim.cancel("cirrus-2")
    report = sim.monitor()
    assert report["TOTALCPU"] == 800 and report["TOTALMEMORY"] == 1024 * 1024
    assert report["USEDMEMORY"] == 64 * 1024
    assert report["FREEMEMORY"] == (1024 - 64) * 1024
    assert report["HYPERVISOR"] == "simulated"
    assert report["URI"] == "simulated:///"
    assert report["VMS"] == [backend.vm_report("cirrus-1", backend.RUNNING, memory_kb=64 * 1024),
                             backend.vm_report("cirrus-2", backend.POWEROFF)]
    assert report["VMS"][0] == {"DEPLOY_ID": "cirrus-1", "VM_ID": 1, "STATE": backend.RUNNING,
                                "CPU": 0.0, "MEMORY": 64 * 1024, "NETRX": 0, "NETTX": 0,
                                "DISKRDBYTES": 0, "DISKWRBYTES": 0}
    sim.delete(vm(2))
    assert [v["VM_ID"] for v in sim.monitor()["VMS"]] == [1]


def test_domain_names_round_trip_and_foreign_domains_are_ignored():
    assert backend.domain_name(12) == "cirrus-12"
    assert backend.vm_id_of("cirrus-12") == 12
    assert backend.vm_id_of("test") is None
    assert backend.vm_id_of("cirrus-x") is None


def test_cli_defaults_come_from_the_drivers_settings():
    from services.drivers.worker import parse_args
    args = parse_args(["--host", "n1"], {"uri": "qemu:///system", "datastore": "/ds",
                                         "parking": "/parked"})
    assert (args.host, args.uri, args.datastore, args.backend, args.parking) == \
        ("n1", "qemu:///system", "/ds", "libvirt", "/parked")
    assert parse_args(["--host", "n1"], {"datastore": "/ds"}).parking is None
    assert parse_args(["--host", "n1", "--uri", "test:///default"], {"datastore": "/ds"}).uri \
        == "test:///default"


@pytest.mark.parametrize("argv, named", [(["--host", " "], "--host"),
                                         (["--host", "n1"], "--datastore"),
                                         (["--host", "n1", "--backend", "xen"], "--backend")])
def test_bad_cli_arguments_are_named(argv, named, capsys):
    from services.drivers.worker import parse_args
    with pytest.raises(SystemExit):
        parse_args(argv, {})
    assert named in capsys.readouterr().err
