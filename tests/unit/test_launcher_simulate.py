"""cirrus-launch --simulate: one simulator process instead of one worker per node."""
import pytest

from cirrus import launcher
from cirrus.launcher import cluster_specs


def test_simulate_adds_one_registering_simulator_beside_the_nodes():
    specs = {s.name: s for s in cluster_specs(None, [], "test:///default", "", (30, "lab"))}
    assert specs["simulator"].argv[1:] == ["--simulate", "30", "--prefix", "lab", "--register"]
    assert specs["simulator"].count == 1
    assert not any(s.argv[1:2] == ["--host"] for s in specs.values())
    with_node = {s.name: s for s in cluster_specs(None, ["n1"], "test:///default",
                                                  "--sim-delay 0.5", (2, "s"))}
    # --node-args reach the simulator too (its knobs: --monitor-interval, --sim-delay...)
    assert with_node["simulator"].argv[-2:] == with_node["n1"].argv[-2:] == ["--sim-delay", "0.5"]


def test_a_simulated_cluster_of_no_hosts_is_refused(capsys):
    with pytest.raises(SystemExit):
        launcher.main(["--simulate", "0"])
    assert "--simulate: must be 1 or more hosts, got 0" in capsys.readouterr().err
