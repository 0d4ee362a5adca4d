"""A throwaway cluster for benches: a fresh database and RabbitMQ vhost, the
services as processes with their logs, the CPU each used, and nothing left
behind."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
BASE_DB = os.environ.get("CIRRUS_BENCH_DATABASE", "postgresql+psycopg2://postgres@127.0.0.1:5432/")
BASE_AMQP = os.environ.get("CIRRUS_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# the parts of the machine a pipeline leans on besides Cirrus's own processes
PROGRAMS = {"rabbitmq": "beam.smp", "postgresql": "postgres"}


class BenchCluster:
    """``with BenchCluster(**settings) as cluster``: ``cluster.url``,
    ``cluster.amqp_uri`` and ``cluster.env`` (also applied to this process,
    with the settings as CIRRUS_* variables); ``start`` runs a process."""

    def __init__(self, **settings):
        run = uuid.uuid4().hex[:8]
        self.db_name, self.vhost = f"cirrus_bench_{run}", f"cirrus-bench-{run}"
        self.url = BASE_DB.rstrip("/") + "/" + self.db_name
        self.amqp_uri = BASE_AMQP.rstrip("/") + "/" + self.vhost
        self.env = {**os.environ, "CIRRUS_DATABASE_URL": self.url,
                    "CIRRUS_AMQP_URI": self.amqp_uri,
                    **{f"CIRRUS_{key.upper()}": str(value) for key, value in settings.items()}}
        self.logs = Path(f"/tmp/{self.vhost}")
        self.procs = {}

    def __enter__(self):
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CIRRUS_")})
        for cmd in (["add_vhost", self.vhost],
                    ["set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", "-q", *cmd], check=True, capture_output=True)
        self.logs.mkdir()
        from cirrus import db
        db.upgrade(self.url)
        return self

    def start(self, name, argv, ready, timeout=60):
        """Start ``argv`` (a program of the venv and its arguments) as ``name``
        and wait until its log says ``ready``."""
        log = self.logs / f"{name}.log"
        self.procs[name] = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]], env=self.env, stdout=open(log, "w"),
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready not in log.read_text():
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise SystemExit(f"{name} did not start; see {log}")
            time.sleep(0.1)

    def service(self, name, service=None):
        self.start(name, ["cirrus-service", service or name], f"{service or name} started")

    def cpu_seconds(self):
        """{name: CPU seconds (user + system) each process has used so far}."""
        return {name: used for name, used in
                ((name, process_cpu(proc.pid)) for name, proc in self.procs.items())
                if used is not None}

    def __exit__(self, *exc):
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.vhost], capture_output=True)
        from cirrus import db
        db.engine.cache_clear()
        subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force", self.db_name],
                       capture_output=True)
        return False


def process_cpu(pid):
    """CPU seconds (user + system) process ``pid`` has used, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu(since=None):
    """The machine's CPU: seconds busy and available (all cores) and what
    RabbitMQ and PostgreSQL used (every process of theirs). With ``since``
    (an earlier reading) the figures are over the time between, with shares
    of what was available, so a run can say whether CPU was its ceiling."""
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = jiffies[3] + jiffies[4]                  # idle + iowait
    now = {"total_s": sum(jiffies) / CLOCK_TICKS, "busy_s": (sum(jiffies) - idle) / CLOCK_TICKS}
    for name in PROGRAMS:
        now[f"{name}_s"] = 0.0
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            program = stat.read_text().strip()
        except OSError:
            continue
        for name, comm in PROGRAMS.items():
            if program == comm:
                now[f"{name}_s"] += process_cpu(stat.parent.name) or 0.0
    if since is None:
        return now
    spent = {key: round(value - since[key], 2) for key, value in now.items()}
    total = spent.pop("total_s") or 1.0
    return {**spent, "busy_share": round(spent["busy_s"] / total, 3),
            **{f"{name}_share": round(spent[f"{name}_s"] / total, 3) for name in PROGRAMS},
            "cores": os.cpu_count()}
