"""deploy/systemd: every unit parsed, its ExecStart checked against the console
scripts of pyproject.toml and their own argument parsers, and the whole set
checked by ``systemd-analyze verify`` where the machine has it."""
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from cirrus import config, launcher, metrics
from cirrus.cli import build_parser, cmd_db_upgrade
from services.drivers import worker
from tests.procs import BIN

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
VENV_BIN = "/opt/cirrus/.venv/bin/"
CONFIG = config.load(REPO / "deploy" / "cirrus.yaml")
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]

# each program of a cluster (launcher.SERVICES and the driver worker) and its unit
NAMEKO = {name: f"cirrus-{name}@.service" for name in launcher.SCALABLE}
PROGRAMS = {**NAMEKO, "gateway": "cirrus-gateway.service", "gate": "cirrus-gate.service",
            "node": "cirrus-node@.service"}
FRONT_END = [unit for name, unit in PROGRAMS.items() if name != "node"]
HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
             "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
             "ProtectControlGroups", "ProtectClock", "ProtectHostname",
             "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime",
             "RestrictSUIDSGID", "LockPersonality")


def parse_unit(path):
    """``{section: [(key, value), ...]}``: systemd's INI dialect, where a key may
    repeat (Environment=) and a line ending in a backslash continues."""
    sections, section, pending = {}, None, ""
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{number}: bad section header {line!r}"
            section = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        section.append((key.strip(), value.strip()))
    return sections


def units():
    return {path.name: parse_unit(path) for path in sorted(UNITS.iterdir())}


def values(unit, section, key):
    return [value for k, value in unit.get(section, []) if k == key]


def value(unit, section, key):
    found = values(unit, section, key)
    assert len(found) == 1, f"{key}= in [{section}]: expected one, found {found}"
    return found[0]


def environment(unit):
    env = {}
    for line in values(unit, "Service", "Environment"):
        for assignment in shlex.split(line):
            name, _, text = assignment.partition("=")
            env[name] = text
    return env


def expand(text, instance="1", host="fe1"):
    """The specifiers our units use, as systemd expands them."""
    return text.replace("%i", instance).replace("%H", host)


def exec_start(unit):
    argv = shlex.split(value(unit, "Service", "ExecStart"))
    assert argv[0].startswith(VENV_BIN), f"{argv[0]} is not a program of {VENV_BIN}"
    script = argv[0][len(VENV_BIN):]
    assert script in SCRIPTS, f"{script} is not a console script of pyproject.toml"
    return script, argv[1:]


def test_every_program_has_a_unit_and_no_unit_is_a_stray():
    assert set(units()) == {*PROGRAMS.values(), "cirrus.target", "cirrus-db-upgrade.service"}
    for name in NAMEKO:
        assert NAMEKO[name].endswith("@.service"), "scalable services are templates"


def test_every_exec_start_runs_a_console_script_of_the_venv():
    for name, unit in units().items():
        if name.endswith(".service"):
            exec_start(unit)


def test_nameko_units_run_their_own_service_which_cirrus_service_accepts():
    for name, unit_name in NAMEKO.items():
        script, args = exec_start(units()[unit_name])
        assert (script, args) == ("cirrus-service", [name])
        # the real parser (in a child: cirrus.runner monkey patches on import)
        done = subprocess.run([BIN / script, *args, "--help"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    refused = subprocess.run([BIN / "cirrus-service", "nosuch", "--help"], capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "invalid choice" in refused.stderr


def test_node_unit_serves_its_instance_as_the_host_with_the_worker_parser():
    script, args = exec_start(units()["cirrus-node@.service"])
    assert script == "cirrus-node"
    parsed = worker.parse_args([expand(arg, instance="kvm-01") for arg in args],
                               CONFIG["drivers"], CONFIG["lifecycle"]["host_timeout"])
    assert parsed.host == "kvm-01" and parsed.simulate is None


def test_gateway_and_gate_take_everything_from_the_configuration():
    # cirrus-gateway ignores arguments, so one here would be silently lost
    assert exec_start(units()["cirrus-gateway.service"]) == ("cirrus-gateway", [])
    assert exec_start(units()["cirrus-gate.service"]) == ("cirrus-gate", [])


def test_db_upgrade_is_a_oneshot_the_front_end_waits_for_without_pulling_it_in():
    upgrade = units()["cirrus-db-upgrade.service"]
    assert value(upgrade, "Service", "Type") == "oneshot"
    script, args = exec_start(upgrade)
    assert script == "cirrus" and build_parser().parse_args(args).func is cmd_db_upgrade
    for name in FRONT_END:
        unit = units()[name]
        assert "cirrus-db-upgrade.service" in value(unit, "Unit", "After").split(), name
        for pulls in ("Requires", "Wants", "BindsTo", "Requisite"):
            assert not any("cirrus-db-upgrade" in v for v in values(unit, "Unit", pulls)), name


def test_every_unit_reads_etc_cirrus_and_names_its_instance_uniquely():
    for unit_name, unit in units().items():
        if unit_name.endswith(".service"):
            assert environment(unit)["CIRRUS_CONFIG"] == "/etc/cirrus/cirrus.yaml", unit_name
    # the name keys `cirrus status`: one per instance and machine for a scaled
    # service, per machine for the gateway and the gate, per host for a node
    scaled = [("1", "fe1"), ("2", "fe1"), ("1", "fe2")]
    placed = {"gateway": [("", "fe1"), ("", "fe2")], "gate": [("", "fe1"), ("", "fe2")],
              "node": [("kvm-01", "kvm-01"), ("kvm-02", "kvm-02")]}
    names = [expand(environment(units()[unit_name])["CIRRUS_INSTANCE"], instance, host)
             for program, unit_name in PROGRAMS.items()
             for instance, host in placed.get(program, scaled)]
    assert len(set(names)) == len(names), names


def test_scaled_instances_and_the_others_never_share_a_metrics_port():
    """CIRRUS_METRICS_PORT overrides metrics.port of the configuration: each
    scaled instance 1-9 gets its own port, apart from every other process's."""
    path = REPO / "deploy" / "cirrus.yaml"
    scaled = {}
    for name, unit_name in NAMEKO.items():
        template = environment(units()[unit_name])["CIRRUS_METRICS_PORT"]
        assert "%i" in template, unit_name
        for instance in "123456789":
            cfg = config.load(path, {"CIRRUS_METRICS_PORT": expand(template, instance)})
            scaled[f"{name}.{instance}"] = metrics.choose_port(name, cfg=cfg)
    for name in ("gateway", "gate", "node"):
        assert "CIRRUS_METRICS_PORT" not in environment(units()[PROGRAMS[name]])
    others = [metrics.choose_port("gateway", cfg=CONFIG), metrics.choose_port("node", cfg=CONFIG),
              *(metrics.choose_port("gate", index, cfg=CONFIG) for index in range(10))]
    assert 0 not in scaled.values() and len(set(scaled.values())) == len(scaled), scaled
    assert len(set(others)) == len(others), others     # a gate of 10 processes beside a node
    others = set(others)
    assert others.isdisjoint(scaled.values()), (others, scaled)


def test_services_run_as_cirrus_restart_on_failure_and_belong_to_cirrus_target():
    for name in PROGRAMS.values():
        unit = units()[name]
        assert value(unit, "Service", "User") == "cirrus", name
        assert value(unit, "Service", "Restart") == "on-failure", name
        assert value(unit, "Service", "KillMode") == "mixed", name
        assert value(unit, "Unit", "PartOf") == "cirrus.target", name
        assert value(unit, "Install", "WantedBy") == "cirrus.target", name
    assert value(units()["cirrus.target"], "Install", "WantedBy") == "multi-user.target"


def test_front_end_units_share_one_hardening():
    def hardening(name):
        return [(k, v) for k, v in units()[name]["Service"] if k in HARDENING]
    expected = hardening(FRONT_END[0])
    assert len(expected) == len(HARDENING)
    for name in [*FRONT_END, "cirrus-db-upgrade.service"]:
        assert hardening(name) == expected, name


def test_node_unit_leaves_libvirt_and_kvm_reachable():
    unit = units()["cirrus-node@.service"]
    assert {"libvirt", "kvm"} <= set(value(unit, "Service", "SupplementaryGroups").split())
    assert "libvirtd.service" in value(unit, "Unit", "After").split()
    # libvirtd and qemu, outside the unit, must see the datastore it writes
    assert not values(unit, "Service", "PrivateTmp")
    assert not values(unit, "Service", "PrivateDevices")
    assert value(unit, "Service", "ProtectSystem") != "strict"
    # running commands get the worker's grace before systemd kills it
    assert int(value(unit, "Service", "TimeoutStopSec")) > worker.STOP_GRACE


def test_systemd_analyze_verifies_every_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # the units name /opt/cirrus's programs; this checkout's venv stands in for it
    for path in UNITS.iterdir():
        (tmp_path / path.name).write_text(path.read_text().replace(VENV_BIN, f"{BIN}/"))
    done = subprocess.run([analyze, "verify", *sorted(tmp_path.iterdir())],
                          capture_output=True, text=True, timeout=120)
    # a bad value is only a warning: any output at all fails the test
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr
