"""``cirrus-launch``: a whole Cirrus cluster on this machine, under one small supervisor.

    cirrus-launch [--scale scheduler=2,lifecycle=2] [--nodes node-1,node-2]
                  [--uri test:///default] [--node-args "--backend simulated"] [--no-migrate]
                  [--simulate N [--prefix sim]]

It migrates the database, starts the Nameko services, the gRPC gateway, the
OneGate HTTP server (``cirrus-gate``) and one driver worker per node, waits for the gateway, makes sure each node's host
exists and waits until it is MONITORED, prints ``cirrus: cluster ready`` and then supervises: a child that dies
is restarted with backoff, and Ctrl-C or SIGTERM stops every child (SIGTERM,
then SIGKILL after 10 s).

Every line a child writes is prefixed with its instance name
(``lifecycle.1 | ...``); the supervisor's own lines start with ``cirrus:``,
e.g. ``cirrus: started lifecycle.1 (pid 4242)``. Each child serves Prometheus
metrics on a port of its own (``--metrics-port``), all listed in a file_sd
targets file that deploy/prometheus.yml reads. Stdlib only, on purpose:
the supervisor must not depend on what it supervises.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCALABLE = ("requests", "scheduler", "lifecycle", "flow")
SERVICES = SCALABLE + ("gateway", "gate")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
COLOURS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
READY_LINE = "cluster ready"


class LaunchError(ValueError):
    """Bad input to the launcher, or a cluster that could not be brought up."""


def parse_scale(text):
    """``"scheduler=3,lifecycle=2"`` -> ``{"scheduler": 3, "lifecycle": 2}``.

    Only the services are scalable; the gateway listens on one fixed port, so
    it runs exactly once. A count of 0 leaves a service out.
    """
    counts = {}
    for part in text.split(","):
        entry = part.strip()
        name, sep, count = (s.strip() for s in entry.partition("="))
        where = f"--scale {entry!r}"
        if not entry:
            raise LaunchError(f"--scale {text!r}: empty entry (expected NAME=COUNT,...)")
        if not sep or not name:
            raise LaunchError(f"{where}: expected NAME=COUNT")
        if name not in SERVICES:
            raise LaunchError(f"{where}: unknown service {name!r} (one of {', '.join(SERVICES)})")
        if name in counts:
            raise LaunchError(f"{where}: {name} is given twice")
        if not re.fullmatch(r"[0-9]+", count):
            raise LaunchError(f"{where}: count {count!r} is not a whole number >= 0")
        if name == "gateway" and int(count) != 1:
            raise LaunchError(f"{where}: the gateway listens on one fixed port, so its count must be 1")
        if name == "gate" and int(count) > 1:
            raise LaunchError(f"{where}: the gate listens on one fixed port (gate.processes "
                              "sets its processes), so its count must be 0 or 1")
        counts[name] = int(count)
    return counts


def parse_nodes(text):
    """``"node-1,node-2"`` -> ``["node-1", "node-2"]``; names become host names."""
    nodes = []
    for part in text.split(","):
        name = part.strip()
        if not NODE_NAME.fullmatch(name):
            raise LaunchError(f"--nodes {text!r}: bad node name {name!r} "
                              "(letters, digits, '.', '_' and '-', not starting with a sign)")
        if name in nodes:
            raise LaunchError(f"--nodes {text!r}: {name} is given twice")
        nodes.append(name)
    return nodes


class Console:
    """Writes whole lines from many threads, each prefixed with who wrote it."""

    def __init__(self, stream=None, colour=None):
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty() if colour is None else colour
        self.width = len("cirrus")
        self._colours = {}
        # reentrant: the signal handler notes in the main thread, maybe mid-write
        self._lock = threading.RLock()

    def make_room(self, names):
        self.width = max([self.width, *map(len, names)])

    def prefix(self, name):
        label = f"{name:<{self.width}} |"
        if not self.colour:
            return label + " "
        code = self._colours.setdefault(name, COLOURS[len(self._colours) % len(COLOURS)])
        return f"\x1b[{code}m{label}\x1b[0m "

    def write(self, line):
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # our reader went away (closed pipe or file): keep supervising

    def line(self, name, text):
        self.write(self.prefix(name) + text)

    def note(self, text):
        self.write(f"cirrus: {text}")


@dataclass
class ProcessSpec:
    """A program to keep running: ``count`` instances named ``name.1``, ``name.2``..."""
    name: str
    argv: list
    count: int = 1


def instance_names(spec):
    return [f"{spec.name}.{i}" for i in range(1, spec.count + 1)]


class _Instance:
    def __init__(self, name, argv):
        self.name = name
        self.argv = argv
        self.proc = None
        self.started_at = 0.0
        self.quick_deaths = 0       # consecutive deaths soon after a start: drives the backoff
        self.restart_at = None
        self.restarts = 0
        self.reader = None


def describe_exit(code):
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Starts processes in their own process groups, prefixes their output,
    restarts the ones that die, and stops them all on request."""

    def __init__(self, specs, console=None, env=None, stop_timeout=10.0,
                 backoff=0.5, max_backoff=30.0, stable_after=10.0, instance_env=None):
        self.console = console or Console()
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.instance_env = instance_env or {}      # {name: more variables of that instance}
        self.stop_timeout = stop_timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self._instances = {}
        for spec in specs:
            for name in instance_names(spec):
                if name in self._instances:
                    raise LaunchError(f"two processes are named {name}")
                self._instances[name] = _Instance(name, list(spec.argv))
        self.console.make_room(self._instances)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher = None
        self._stopped_cleanly = None

    # -- public ---------------------------------------------------------------

    def start(self):
        """Start every instance; if one cannot start, stop the others and raise."""
        with self._lock:
            for inst in self._instances.values():
                try:
                    self._spawn(inst)
                except OSError as exc:
                    error = LaunchError(f"cannot start {inst.name} ({' '.join(inst.argv)}): {exc}")
                    break
            else:
                error = None
        if error:
            self.stop()
            raise error
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._watcher.start()
        return self

    def stop(self, timeout=None):
        """Stop every child: SIGTERM, then SIGKILL for those still alive after
        ``timeout`` seconds. True if all stopped on SIGTERM in time."""
        timeout = self.stop_timeout if timeout is None else timeout
        with self._lock:
            if self._stopped_cleanly is not None:
                return self._stopped_cleanly
            self._stopping.set()
        if self._watcher and self._watcher is not threading.current_thread():
            self._watcher.join()
        with self._lock:
            running = [inst for inst in self._instances.values()
                       if inst.proc is not None and inst.proc.poll() is None]
            for inst in running:
                _signal_group(inst.proc, signal.SIGTERM)
        if running:
            self.console.note(f"stopping {len(running)} processes")
        began = time.monotonic()
        deadline = began + timeout
        stubborn = []
        for inst in running:
            try:
                inst.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stubborn.append(inst)
        for inst in stubborn:
            self.console.note(f"{inst.name} (pid {inst.proc.pid}) did not stop within "
                              f"{timeout:g} s: sending SIGKILL")
            _signal_group(inst.proc, signal.SIGKILL)
            inst.proc.wait()
        for inst in self._instances.values():
            if inst.reader is not None:
                inst.reader.join(timeout=2)  # so the last lines are written before we return
        if running:
            self.console.note(f"{len(running)} processes ended in {time.monotonic() - began:.1f} s")
        self._stopped_cleanly = not stubborn
        return self._stopped_cleanly

    def kill_one(self, name, sig=signal.SIGKILL):
        """Send ``sig`` to one instance's process group, as a crash would; the
        supervisor then restarts it. Returns the pid that was signalled."""
        with self._lock:
            inst = self._instances.get(name)
            if inst is None:
                raise LaunchError(f"no process named {name!r} (known: {', '.join(self._instances)})")
            if inst.proc is None or inst.proc.poll() is not None:
                raise LaunchError(f"{name} is not running right now")
            _signal_group(inst.proc, sig)
            return inst.proc.pid

    def instances(self):
        """``{"lifecycle.1": pid or None}``: None while an instance waits to restart."""
        with self._lock:
            return {name: inst.proc.pid if inst.proc is not None and inst.proc.poll() is None
                    else None
                    for name, inst in self._instances.items()}

    def restarts(self, name):
        with self._lock:
            return self._instances[name].restarts

    # -- inside ---------------------------------------------------------------

    def _spawn(self, inst):
        """Start one instance (lock held)."""
        inst.proc = subprocess.Popen(
            inst.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(self.env, CIRRUS_INSTANCE=inst.name,  # who it is: cirrus.instance
                     **self.instance_env.get(inst.name, {})),
            start_new_session=True)  # own group: Ctrl-C reaches only us
        inst.started_at = time.monotonic()
        inst.restart_at = None
        inst.reader = threading.Thread(target=self._pump, args=(inst.name, inst.proc.stdout),
                                       daemon=True)
        inst.reader.start()
        self.console.note(f"started {inst.name} (pid {inst.proc.pid})")

    def _pump(self, name, pipe):
        with pipe:
            for raw in iter(pipe.readline, b""):
                self.console.line(name, raw.decode(errors="replace").rstrip("\r\n"))

    def _watch(self):
        while not self._stopping.wait(0.1):
            with self._lock:
                if self._stopping.is_set():
                    return
                now = time.monotonic()
                for inst in self._instances.values():
                    if inst.proc is not None:
                        code = inst.proc.poll()
                        if code is not None:
                            self._schedule_restart(inst, code, now)
                    elif inst.restart_at is not None and now >= inst.restart_at:
                        self._restart(inst)

    def _schedule_restart(self, inst, code, now):
        ran = now - inst.started_at
        inst.quick_deaths = 1 if ran >= self.stable_after else inst.quick_deaths + 1
        delay = min(self.max_backoff, self.backoff * 2 ** (inst.quick_deaths - 1))
        self.console.note(f"{inst.name} (pid {inst.proc.pid}) {describe_exit(code)} after "
                          f"{ran:.1f} s; restarting in {delay:.1f} s")
        inst.proc = None
        inst.restart_at = now + delay

    def _restart(self, inst):
        inst.restarts += 1
        try:
            self._spawn(inst)
        except OSError as exc:
            inst.proc = None
            inst.quick_deaths += 1
            delay = min(self.max_backoff, self.backoff * 2 ** (inst.quick_deaths - 1))
            inst.restart_at = time.monotonic() + delay
            self.console.note(f"cannot restart {inst.name}: {exc}; trying again in {delay:.1f} s")


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# -- the cluster ---------------------------------------------------------------

def program(name):
    """A console script of this install: next to our own Python first, so a
    venv's programs are used even when the venv is not on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or name


def node_arguments(text, node):
    """Extra ``cirrus-node`` arguments from ``--node-args``, with ``{node}``
    standing for each node's name (e.g. a state file per node)."""
    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise LaunchError(f"--node-args {text!r}: {exc}") from None
    return [word.replace("{node}", node) for word in words]


def cluster_specs(scale=None, nodes=("node-1",), uri="test:///default", node_args="",
                  simulate=None):
    """The processes of one cluster: the services (scaled), the gateway, one worker per node,
    and with ``simulate`` (count, prefix) one ``cirrus-node --simulate`` serving that many
    simulated hosts, which it registers itself; it gets ``node_args`` too ({node}: the prefix)."""
    scale = {name: 1 for name in SERVICES} | dict(scale or {})
    specs = [ProcessSpec(name, [program("cirrus-service"), name], scale[name]) for name in SCALABLE]
    specs.append(ProcessSpec("gateway", [program("cirrus-gateway")], scale["gateway"]))
    specs.append(ProcessSpec("gate", [program("cirrus-gate")], scale["gate"]))
    specs += [ProcessSpec(node, [program("cirrus-node"), "--host", node, "--uri", uri,
                                 *node_arguments(node_args, node)])
              for node in nodes]
    if simulate:
        count, prefix = simulate
        specs.append(ProcessSpec("simulator", [program("cirrus-node"), "--simulate", str(count),
                                               "--prefix", prefix, "--register",
                                               *node_arguments(node_args, prefix)]))
    return specs


def wait_for_monitored(is_ours, count, stop_requested, timeout, env=None):
    """Wait until ``count`` hosts whose names ``is_ours`` are MONITORED (a
    node's report makes its host so), so that "cluster ready" means VMs can
    be deployed on them."""
    deadline = time.monotonic() + timeout
    found = 0
    while not stop_requested.is_set():
        code, out, _err = run_once([program("cirrus"), "host", "list", "--json"],
                                   stop_requested, timeout=30, env=env)
        if code == 0:
            found = sum(1 for shown in json.loads(out)
                        if is_ours(shown["name"]) and shown["state"] == "MONITORED")
            if found >= count:
                return True
        if time.monotonic() > deadline:
            raise LaunchError(f"{found} of the {count} hosts were MONITORED after {timeout:g} s")
        stop_requested.wait(1.0)
    return False


def run_once(argv, stop_requested=None, timeout=120.0, env=None):
    """Run a short command in its own process group; returns (code, stdout, stderr).
    Gives up (code None) when ``stop_requested`` is set or on timeout."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace",
                            env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            return proc.returncode, out, err
        except subprocess.TimeoutExpired:
            if (stop_requested and stop_requested.is_set()) or time.monotonic() > deadline:
                _signal_group(proc, signal.SIGKILL)
                out, err = proc.communicate()
                return None, out, err


def local_host(address):
    """Where a client on this machine reaches a server listening on ``address``."""
    address = str(address)
    return "127.0.0.1" if address in ("0.0.0.0", "", "::", "[::]") else address


def gateway_target(cfg):
    """Where a client on this machine reaches the gateway from the configuration."""
    return local_host(cfg["gateway"]["address"]), int(cfg["gateway"]["port"])


# -- metrics ---------------------------------------------------------------------

def spec_service(spec):
    """The service a spec's processes are (driver workers, simulator too: node)."""
    return spec.name if spec.name in SERVICES else "node"


def free_ports(count, host="127.0.0.1", tries=50):
    """The first of ``count`` consecutive ports free right now, for processes
    about to listen on them (a gate's processes use port, port + 1...)."""
    for _ in range(tries):
        socks = [socket.socket()]
        try:
            socks[0].bind((host, 0))
            port = socks[0].getsockname()[1]
            for offset in range(1, count):
                socks.append(socket.socket())
                socks[-1].bind((host, port + offset))
            return port
        except (OSError, OverflowError):
            continue
        finally:
            for sock in socks:
                sock.close()
    raise LaunchError(f"found no {count} consecutive free ports on {host} for metrics")


def metrics_ports(specs, base, gate_processes=1, host="127.0.0.1"):
    """``{instance name: metrics port}``: the Nth process in start order gets
    ``base + N`` (N from 1: one process of each service gets the ports of
    ``metrics.ports``); a gate takes one port per process (``gate.processes``).
    ``base`` 0: free ports, picked now so the targets file can name them."""
    ports, taken = {}, 0
    for spec in specs:
        width = gate_processes if spec.name == "gate" else 1
        for name in instance_names(spec):
            if base:
                ports[name] = base + taken + 1
                if ports[name] + width - 1 > 65535:
                    raise LaunchError(f"--metrics-port {base}: {name} would get port "
                                      f"{ports[name] + width - 1}, beyond 65535")
            else:
                ports[name] = free_ports(width, host)
            taken += width
    return ports


def metrics_targets(specs, ports, gate_processes=1, host="127.0.0.1"):
    """Prometheus file_sd groups, one per process: its endpoint, labelled
    with its instance name (a gate's process N: ``gate.1/N``) and service."""
    groups = []
    for spec in specs:
        for name in instance_names(spec):
            processes = gate_processes if spec.name == "gate" else 1
            for index in range(processes):
                groups.append({"targets": [f"{host}:{ports[name] + index}"],
                               "labels": {"instance": f"{name}/{index}" if index else name,
                                          "cirrus_service": spec_service(spec)}})
    return groups


def write_targets(path, groups):
    """Write a targets file whole (Prometheus never reads half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(groups, indent=1) + "\n")
    os.replace(partial, path)


def wait_for_port(host, port, timeout, stop_requested=None):
    """True once something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop_requested and stop_requested.is_set():
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def migrate(console, stop_requested, env=None):
    code, out, err = run_once([program("cirrus"), "db", "upgrade"], stop_requested, env=env)
    for text in (out + err).splitlines():
        console.line("migrate", text)
    if code is None and stop_requested.is_set():
        return False
    if code != 0:
        raise LaunchError(f"`cirrus db upgrade` failed (exit {code}); see the lines above")
    return True


def ensure_hosts(nodes, console, stop_requested, timeout=60.0, env=None):
    """``cirrus host create`` for each node, tolerating hosts that exist. Retries,
    because the gateway may accept connections before the services listen."""
    for node in nodes:
        deadline = time.monotonic() + timeout
        while True:
            code, out, err = run_once([program("cirrus"), "host", "create", node],
                                      stop_requested, timeout=30, env=env)
            if code == 0:
                console.note(f"host {node} created (id {out.strip()})")
                break
            if "ALREADY_EXISTS" in err:
                console.note(f"host {node} already exists")
                break
            if stop_requested.is_set():
                return False
            last = (err or out).strip().splitlines()[-1:] or [f"exit {code}"]
            if time.monotonic() > deadline:
                raise LaunchError(f"`cirrus host create {node}` kept failing for {timeout:g} s: "
                                  f"{last[0]}")
            stop_requested.wait(1.0)
    return True


def banner(nodes, host, port):
    cli = program("cirrus")
    if shutil.which("cirrus") == cli:
        cli = "cirrus"
    elif not os.path.relpath(cli).startswith(".."):
        cli = os.path.relpath(cli)
    return "\n".join([
        f"Cirrus is up: gateway {host}:{port}, hosts {', '.join(nodes)}. Try the CLI:",
        f"  {cli} host list",
        f"  {cli} vm create --name test --cpu 0.1 --memory 64     # prints the VM id",
        f"  {cli} vm list",
        f"  {cli} vm wait ID --state RUNNING --timeout 60",
        f"  {cli} vm show ID --json",
        f"  {cli} vm terminate ID",
        "Ctrl-C stops the cluster.",
    ])


def serve_metrics(specs, cfg, base=None, targets_file=None):
    """The metrics port of each instance (``--metrics-port``, else
    metrics.base_port), written to the targets file; returns them."""
    settings = cfg.get("metrics") or {}
    base = int(settings.get("base_port", 9400)) if base is None else base
    gate_processes = max(1, int((cfg.get("gate") or {}).get("processes", 1)))
    host = local_host(settings.get("address") or "127.0.0.1")
    ports = metrics_ports(specs, base, gate_processes, host)
    targets_file = targets_file or settings.get("targets_file")
    if targets_file:
        write_targets(targets_file, metrics_targets(specs, ports, gate_processes, host))
    return ports


def logging_env(cfg, log_dir=None, log_format="text"):
    """Have every child write its log file in ``log_dir`` (default:
    logging.dir, else cirrus.logs.DEFAULT_DIR) and its console lines in
    ``log_format``, through the environment they inherit; returns the directory."""
    from cirrus import logs
    log_dir = os.path.abspath(log_dir or logs.log_dir(cfg))
    os.environ.update(CIRRUS_LOGGING_DIR=log_dir, CIRRUS_LOGGING_FORMAT=log_format)
    return log_dir


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cirrus-launch", description="Run a local Cirrus cluster under one supervisor.")
    parser.add_argument("--scale", action="append", default=[], metavar="NAME=N,...",
                        help="instances per service, e.g. scheduler=2,lifecycle=2 "
                             f"(services: {', '.join(SERVICES)}; default 1 each)")
    parser.add_argument("--nodes", metavar="NAME,...",
                        help="driver workers to run, one per hypervisor node (default node-1, "
                             "none with --simulate)")
    parser.add_argument("--simulate", type=int, metavar="N",
                        help="also run one cirrus-node --simulate N: N simulated hosts "
                             "PREFIX-0001.., registered in lifecycle (docs/nodes.md)")
    parser.add_argument("--prefix", default="sim", help="the simulated hosts' prefix (sim)")
    parser.add_argument("--uri", help="libvirt URI of the nodes (default: drivers.uri of the "
                                      "configuration, test:///default)")
    parser.add_argument("--node-args", default="", metavar="ARGS",
                        help="more cirrus-node arguments for every node, {node} standing for "
                             "its name, e.g. \"--backend simulated --sim-state "
                             "/var/tmp/sim-{node}.json\"")
    parser.add_argument("--no-migrate", action="store_true",
                        help="do not run `cirrus db upgrade` first")
    parser.add_argument("--metrics-port", type=int, metavar="BASE",
                        help="the Nth process serves its metrics on BASE+N (default "
                             "metrics.base_port, 9400; 0: free ports)")
    parser.add_argument("--metrics-targets", metavar="PATH",
                        help="where to write the processes' metrics endpoints for Prometheus "
                             "(file_sd; default metrics.targets_file)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="every process also writes its JSON log lines to "
                             "DIR/<instance>.jsonl, which `cirrus trace` reads (default "
                             "logging.dir, else /var/tmp/cirrus/logs)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="how the processes' lines look here (default text; the files "
                             "are JSON either way)")
    parser.add_argument("--ready-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long the gateway and host creation may take (default 60)")
    parser.add_argument("--hosts-only", action="store_true",
                        help="start nothing: wait for the gateway, ensure the --nodes hosts "
                             "exist, and exit (the docker-compose `hosts` job)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scale = {}
        for text in args.scale:
            for name, count in parse_scale(text).items():
                scale[name] = count
        if args.simulate is not None and args.simulate < 1:
            raise LaunchError(f"--simulate: must be 1 or more hosts, got {args.simulate}")
        if args.nodes is not None:
            nodes = parse_nodes(args.nodes)
        else:
            nodes = [] if args.simulate else ["node-1"]
        node_arguments(args.node_args, "")
        if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
            raise LaunchError(f"--metrics-port {args.metrics_port}: not a port number (0-65535)")
    except LaunchError as exc:
        parser.error(str(exc))

    from cirrus import config
    try:
        cfg = config.load()
    except config.ConfigError as exc:
        parser.error(str(exc))
    uri = args.uri or cfg.get("drivers", {}).get("uri") or "test:///default"
    host, port = gateway_target(cfg)
    log_dir = logging_env(cfg, args.log_dir, args.log_format)

    console = Console()
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        if not stop_requested.is_set():
            console.note(f"{signal.Signals(signum).name} received: stopping")
        stop_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if args.hosts_only:
        try:
            if not wait_for_port(host, port, args.ready_timeout, stop_requested) \
                    and not stop_requested.is_set():
                raise LaunchError(f"the gateway at {host}:{port} did not accept connections "
                                  f"within {args.ready_timeout:g} s")
            ensure_hosts(nodes, console, stop_requested, args.ready_timeout)
        except LaunchError as exc:
            console.note(f"error: {exc}")
            return 1
        return 0

    simulate = (args.simulate, args.prefix) if args.simulate else None
    specs = cluster_specs(scale, nodes, uri, args.node_args, simulate)
    try:
        ports = serve_metrics(specs, cfg, args.metrics_port, args.metrics_targets)
    except (LaunchError, OSError, TypeError, ValueError) as exc:
        console.note(f"error: metrics: {exc}")
        return 1
    supervisor = Supervisor(specs, console, instance_env={
        name: {"CIRRUS_METRICS_PORT": str(port)} for name, port in ports.items()})
    console.make_room(["migrate"])
    console.note(f"logs in {log_dir}/<instance>.jsonl (`cirrus trace REQUEST_ID` reads them)")
    code = 0
    try:
        if not args.no_migrate:
            migrate(console, stop_requested)
        if not stop_requested.is_set():
            supervisor.start()
            if not wait_for_port(host, port, args.ready_timeout, stop_requested) \
                    and not stop_requested.is_set():
                raise LaunchError(f"the gateway at {host}:{port} did not accept connections "
                                  f"within {args.ready_timeout:g} s")
        if simulate:
            count, prefix = simulate
            timeout = max(args.ready_timeout, 120)

            def ours(name):
                return name.startswith(prefix + "-")
        else:
            count, ours, timeout = len(nodes), set(nodes).__contains__, args.ready_timeout
        if not stop_requested.is_set() and ensure_hosts(nodes, console, stop_requested,
                                                        args.ready_timeout) \
                and wait_for_monitored(ours, count, stop_requested, timeout):
            console.write(banner(nodes, host, port))
            console.note(READY_LINE)
        while not stop_requested.wait(0.5):
            pass
    except LaunchError as exc:
        console.note(f"error: {exc}")
        code = 1
    clean = supervisor.stop()
    console.note("stopped" if clean else "stopped (some processes needed SIGKILL)")
    return code


if __name__ == "__main__":
    sys.exit(main())
