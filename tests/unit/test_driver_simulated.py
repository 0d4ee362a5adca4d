"""The simulated backend: the life cycle actions in memory, idempotent as a
real hypervisor's, and domains that outlive a restart through a state file."""
import json
import os

import pytest

from services.drivers import backend
from services.drivers.simulated import SimulatedBackend, SimulatedFailure


def vm(vm_id=5, runtime=None, **template):
    return {"id": vm_id, "name": "db", "cpu": 1, "vcpu": 1, "memory": 64,
            "template": template, "deploy_id": None, "runtime": runtime}


def states(sim):
    return {v["VM_ID"]: v["STATE"] for v in sim.monitor()["VMS"]}


def test_save_then_restore_brings_the_vm_back_and_both_are_idempotent():
    sim = SimulatedBackend()
    sim.deploy(vm())
    info = sim.save(vm())
    assert info["checkpoint"] and sim.save(vm()) == info
    assert 5 not in states(sim)
    assert sim.restore(vm(runtime=info)) == sim.restore(vm(runtime=info)) == "cirrus-5"
    assert states(sim)[5] == backend.RUNNING


def test_save_and_restore_of_a_vm_that_is_nowhere_fail_naming_it():
    sim = SimulatedBackend()
    with pytest.raises(RuntimeError, match="cannot save cirrus-5: it is not on simulated:///"):
        sim.save(vm())
    sim.deploy(vm())
    sim.cancel("cirrus-5")
    with pytest.raises(RuntimeError, match="cirrus-5: it is not running"):
        sim.save(vm())
    with pytest.raises(FileNotFoundError, match="cannot restore cirrus-5"):
        sim.restore(vm())


def test_a_checkpoint_another_node_made_is_restored_here():
    source, target = SimulatedBackend(), SimulatedBackend()
    source.deploy(vm())
    info = source.migrate(vm(), "node-2", target.uri)
    assert 5 not in states(source)
    target.mv(vm(runtime=info), "in")
    assert target.restore(vm(runtime=info)) == "cirrus-5"
    assert states(target)[5] == backend.RUNNING


def test_reboot_and_reset_need_a_running_domain():
    sim = SimulatedBackend()
    for action in (sim.reboot, sim.reset):
        with pytest.raises(LookupError, match="cirrus-5: no such domain"):
            action("cirrus-5")
    sim.deploy(vm())
    sim.reboot("cirrus-5")
    sim.reset("cirrus-5")
    sim.cancel("cirrus-5")
    with pytest.raises(RuntimeError, match="cannot reboot cirrus-5: it is not running"):
        sim.reboot("cirrus-5")


def test_mv_out_and_in_are_idempotent_and_refuse_a_running_vm():
    sim = SimulatedBackend()
    sim.deploy(vm())
    with pytest.raises(RuntimeError, match="cirrus-5 is still running"):
        sim.mv(vm(), "out")
    sim.shutdown("cirrus-5")
    assert sim.mv(vm(), "out") == sim.mv(vm(), "out") == {"vm_dir": None}
    assert 5 not in states(sim)
    assert sim.mv(vm(), "in") == sim.mv(vm(), "in")
    with pytest.raises(ValueError, match="direction must be one of out, in, got 'up'"):
        sim.mv(vm(), "up")


def test_new_actions_fail_when_the_template_scripts_it():
    sim = SimulatedBackend()
    spec = vm(SIMULATE_FAIL="save, reboot, migrate, mv")
    sim.deploy(spec)
    for action in (lambda: sim.save(spec), lambda: sim.reboot("cirrus-5"),
                   lambda: sim.migrate(spec, "n2", "x"), lambda: sim.mv(spec, "in")):
        with pytest.raises(SimulatedFailure, match="simulated .* failure"):
            action()
    assert states(sim)[5] == backend.RUNNING     # a failed save leaves it running


def test_changes_of_its_own_reach_the_watcher():
    sim = SimulatedBackend()
    heard = []
    sim.watch(lambda *news: heard.append(news))
    sim.deploy(vm())
    sim.change("cirrus-5", backend.POWEROFF, "STOPPED/DESTROYED")
    assert states(sim)[5] == backend.POWEROFF
    sim.change("cirrus-5", backend.GONE, "UNDEFINED/REMOVED")
    assert 5 not in states(sim)
    assert heard == [("cirrus-5", backend.POWEROFF, "STOPPED/DESTROYED"),
                     ("cirrus-5", backend.GONE, "UNDEFINED/REMOVED")]


def test_domains_outlive_a_restart_with_a_state_file(tmp_path):
    path = str(tmp_path / "sim.json")
    first = SimulatedBackend(state_file=path)
    first.deploy(vm(1))
    first.deploy(vm(2))
    first.cancel("cirrus-2")
    first.save(vm(1))
    first.deploy(vm(3))
    again = SimulatedBackend(state_file=path)
    assert states(again) == {2: backend.POWEROFF, 3: backend.RUNNING}
    # the checkpoint survived too: restore needs nothing from the runtime
    assert again.restore(vm(1)) == "cirrus-1"
    again.delete(vm(3))
    assert states(SimulatedBackend(state_file=path)) == {1: backend.RUNNING,
                                                         2: backend.POWEROFF}
    # written by rename: no temporary file is left beside it
    assert os.listdir(tmp_path) == ["sim.json"]


def test_a_state_file_it_cannot_read_is_named(tmp_path):
    path = tmp_path / "sim.json"
    path.write_text('{"domains": ')
    with pytest.raises(ValueError, match=f"simulated state file {path}: cannot read it"):
        SimulatedBackend(state_file=str(path))
    path.write_text(json.dumps({"domains": {}}))
    with pytest.raises(ValueError, match="checkpoints"):
        SimulatedBackend(state_file=str(path))
