"""Commands are checked and dispatched to a backend; the simulated backend
stands in for a hypervisor in scale tests; libvirt's lifecycle events map to
backend states."""
import pytest

import libvirt

from cirrus import messages
from services.drivers import backend, simulated
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


def test_simulated_monitoring_reports_fixed_capacity_and_plausible_usage():
    now = [1000.0]
    sim = SimulatedBackend(cores=8, memory_mb=1024, datastore_mb=10000, clock=lambda: now[0])
    sim.deploy(vm(1))
    sim.deploy(vm(2))
    sim.cancel("cirrus-2")
    report = sim.monitor()
    assert report["TOTALCPU"] == 800 and report["TOTALMEMORY"] == 1024 * 1024
    # the hypervisor's own 512 MB and the running VM's 64 MB
    assert report["USEDMEMORY"] == (512 + 64) * 1024
    assert report["FREEMEMORY"] == (1024 - 512 - 64) * 1024
    # the running VM (1 CPU) uses its share of the moment; the stopped one nothing
    load = simulated.guest_load(1, 1000.0)
    assert report["USEDCPU"] == round(100 * load) and report["FREECPU"] == 800 - round(100 * load)
    assert (report["HYPERVISOR"], report["URI"]) == ("simulated", "simulated:///")
    running, stopped = report["VMS"]
    assert (running["VM_ID"], running["STATE"], running["CPU"], running["MEMORY"]) == \
        (1, backend.RUNNING, round(100 * load, 1), 64 * 1024)
    assert stopped == backend.vm_report("cirrus-2", backend.POWEROFF)
    # each VM's disks take space, running or not (the test VMs have none: nothing used)
    assert (report["DS_LOCATION_TOTAL_MB"], report["DS_LOCATION_FREE_MB"]) == (10000, 10000)

    now[0] += 30
    later = sim.monitor()
    for key in ("NETRX", "NETTX"):
        assert later[key] > report[key]                             # the host's counters
    for key in ("NETRX", "NETTX", "DISKRDBYTES", "DISKWRBYTES"):
        assert later["VMS"][0][key] > running[key] >= 0             # the guest's
    assert later["VMS"][0]["CPU"] != running["CPU"]                 # load moves with time
    sim.delete(vm(2))
    assert [v["VM_ID"] for v in sim.monitor()["VMS"]] == [1]


def test_simulated_disks_take_datastore_space():
    sim = SimulatedBackend(datastore_mb=10000)
    spec = vm(3)
    spec["disks"] = [{"id": 0, "type": "file", "source": "/img/a.qcow2", "format": "qcow2",
                      "clone": "overlay", "size_mb": None, "target": "vda"},
                     {"id": 1, "type": "swap", "size_mb": 512, "target": "vdb"},
                     {"id": 2, "type": "file", "source": "/img/p.qcow2", "format": "qcow2",
                      "clone": "ln", "target": "vdc"}]
    sim.deploy(spec)
    report = sim.monitor()
    # an overlay of unknown size counts DEFAULT_DISK_MB, an ln image lives elsewhere
    assert report["DS_LOCATION_USED_MB"] == simulated.DEFAULT_DISK_MB + 512
    assert report["DS_LOCATION_FREE_MB"] == 10000 - simulated.DEFAULT_DISK_MB - 512
    sim.delete(spec)
    assert sim.monitor()["DS_LOCATION_USED_MB"] == 0


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
