"""Commands are checked and dispatched to a backend; the simulated backend
stands in for a hypervisor in scale tests."""
import pytest

from cirrus import messages
from services.drivers import backend
from services.drivers.simulated import SimulatedBackend
from services.drivers.worker import command_problem, run_command


def vm(vm_id=5, **template):
    return {"id": vm_id, "name": "db", "cpu": 1, "vcpu": 1, "memory": 64,
            "template": template, "deploy_id": None}


def cmd(action, spec=None):
    spec = spec or vm()
    return messages.command(action, spec["id"], "node-1", vm=spec)


@pytest.mark.parametrize("bad, named", [
    ("deploy", "JSON object"),
    ({"action": "deploy", "vm_id": 5, "args": {"vm": vm()}}, "no id"),
    ({**cmd("deploy"), "action": "reboot"}, "unknown action 'reboot'"),
    ({**cmd("deploy"), "action": None}, "unknown action None"),
    ({**cmd("deploy"), "args": {}}, "args.vm"),
    ({**cmd("deploy"), "args": "x"}, "args.vm"),
    ({**cmd("deploy"), "args": {"vm": {**vm(), "id": "5"}}}, "args.vm.id"),
    ({**cmd("deploy"), "vm_id": 6}, "vm_id 6 does not match"),
])
def test_malformed_commands_are_named(bad, named):
    assert named in command_problem(bad)


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
    assert report["VMS"] == [{"DEPLOY_ID": "cirrus-1", "VM_ID": 1, "STATE": backend.RUNNING},
                             {"DEPLOY_ID": "cirrus-2", "VM_ID": 2, "STATE": backend.POWEROFF}]
    sim.delete(vm(2))
    assert [v["VM_ID"] for v in sim.monitor()["VMS"]] == [1]


def test_domain_names_round_trip_and_foreign_domains_are_ignored():
    assert backend.domain_name(12) == "cirrus-12"
    assert backend.vm_id_of("cirrus-12") == 12
    assert backend.vm_id_of("test") is None
    assert backend.vm_id_of("cirrus-x") is None


def test_cli_defaults_come_from_the_drivers_settings():
    from services.drivers.worker import parse_args
    args = parse_args(["--host", "n1"], {"uri": "qemu:///system", "datastore": "/ds"})
    assert (args.host, args.uri, args.datastore, args.backend) == \
        ("n1", "qemu:///system", "/ds", "libvirt")
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
