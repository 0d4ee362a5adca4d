"""End-to-end harness: a whole cluster started by ``cirrus-launch`` as processes,
used through the ``cirrus`` CLI and gRPC, as an operator would.

Each cluster gets its own database and RabbitMQ vhost, so clusters started
one after another in a session never see each other's VMs or queues.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import BASE_AMQP, BASE_DB, rabbitmqctl
from tests.procs import BIN, Proc, free_port, wait_until


class CliError(AssertionError):
    pass


class Cluster:
    """A whole Cirrus started by ``cirrus-launch``: libvirt nodes, or with
    ``simulate=N`` one ``cirrus-node --simulate N --prefix sim`` and no others."""

    def __init__(self, tmp_path, nodes=("node-1",), uri="test:///default", scale=None,
                 node_args=None, simulate=None):
        self.id = uuid.uuid4().hex[:8]
        self.nodes = [] if simulate else list(nodes)
        self.uri, self.scale, self.simulate = uri, scale, simulate
        self.node_args = node_args
        self.tmp = tmp_path
        self.db_url = BASE_DB.rstrip("/") + f"/cirrus_e2e_{self.id}"
        self.vhost = f"cirrus-e2e-{self.id}"
        self.port = free_port()
        self.gate_port = free_port()    # clusters running at once must not share 5030
        (tmp_path / "home").mkdir(exist_ok=True)
        # outside root's private tmp dirs: qemu runs as its own user
        self.datastore = Path("/var/tmp/cirrus") / f"e2e-{self.id}"
        # stop and undeploy park VM files; VM ids restart at 1 in every cluster
        self.parking = Path("/var/tmp/cirrus") / f"e2e-{self.id}-parked"
        self.env = {**os.environ,
                    "HOME": str(tmp_path / "home"),
                    "CIRRUS_DATABASE_URL": self.db_url,
                    "CIRRUS_AMQP_URI": BASE_AMQP.rstrip("/") + "/" + self.vhost,
                    "CIRRUS_GATEWAY_PORT": str(self.port),
                    "CIRRUS_GATE_PORT": str(self.gate_port),
                    "CIRRUS_GATE_ENDPOINT": f"http://127.0.0.1:{self.gate_port}",
                    "CIRRUS_DRIVERS_DATASTORE": str(self.datastore),
                    "CIRRUS_DRIVERS_PARKING": str(self.parking),
                    "CIRRUS_DRIVERS_MONITOR_INTERVAL": "1",
                    "CIRRUS_SCHEDULER_SWEEP_INTERVAL": "2",
                    # its processes' log files, which `cirrus trace` reads by default
                    "CIRRUS_LOGGING_DIR": str(tmp_path / "logs")}
        for key in ("CIRRUS_TOKEN", "CIRRUS_USER", "CIRRUS_PASSWORD", "CIRRUS_CONFIG"):
            self.env.pop(key, None)
        self.metrics_targets = tmp_path / "metrics-targets.json"
        self.proc = None

    def start(self):
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        if self.simulate:
            args = ["cirrus-launch", "--simulate", str(self.simulate), "--prefix", "sim"]
        else:
            args = ["cirrus-launch", "--nodes", ",".join(self.nodes), "--uri", self.uri]
        if self.scale:
            args += ["--scale", self.scale]
        if self.node_args:
            args += ["--node-args", self.node_args]
        # free metrics ports: clusters running at once never clash
        args += ["--metrics-port", "0", "--metrics-targets", str(self.metrics_targets)]
        self.proc = Proc(args, self.env, self.tmp / "cluster.log").start()
        self.proc.wait_for("cirrus: cluster ready", timeout=180 if self.simulate else 120)
        return self

    def stop(self):
        if self.proc:
            self.proc.stop()
        shutil.rmtree(self.datastore, ignore_errors=True)
        shutil.rmtree(self.parking, ignore_errors=True)
        rabbitmqctl("delete_vhost", self.vhost)
        from sqlalchemy import create_engine
        admin = create_engine(BASE_DB.rstrip("/") + "/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "cirrus_e2e_{self.id}" WITH (FORCE)')
        admin.dispose()

    # ------------------------------------------------------------ the CLI

    def cli(self, *args, check=True, timeout=120):
        done = subprocess.run([str(BIN / "cirrus"), *map(str, args)], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise CliError(f"cirrus {' '.join(map(str, args))} exited {done.returncode}:\n"
                           f"{done.stdout}\n{done.stderr}")
        return done

    def json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def create_vm(self, *args):
        return int(self.cli("vm", "create", *args).stdout.strip())

    def isolate_vm_ids(self):
        """Start this cluster's VM ids at a random high number: domain names
        come from VM ids, so clusters sharing qemu:///system would otherwise
        name their first VMs alike and see each other's domains."""
        from sqlalchemy import create_engine
        engine = create_engine(self.db_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('vms', 'id'), %s)",
                                 (10**9 + int(self.id, 16) % 10**6 * 1000,))
        engine.dispose()
        return self

    # ------------------------------------------------------------ the SDK

    def client(self, timeout=30):
        """A client SDK logged in as the bootstrap admin."""
        from cirrus.client import Client
        address = f"127.0.0.1:{self.port}"
        token = Client(address, username="admin", password="cirrus").login()["token"]
        return Client(address, token=token, timeout=timeout)

    # ------------------------------------------------------------ processes

    def pids(self, instance):
        """Current pid of a supervised instance, e.g. ``lifecycle.1``."""
        found = re.findall(rf"started {re.escape(instance)} \(pid (\d+)\)", self.proc.output())
        return int(found[-1]) if found else None

    def metrics_urls(self):
        """``{instance name: /metrics URL}`` of every process, from the targets
        file cirrus-launch wrote (a gate's process N: ``gate.1/N``)."""
        return {group["labels"]["instance"]: f"http://{group['targets'][0]}/metrics"
                for group in json.loads(self.metrics_targets.read_text())}

    def kill(self, instance, sig=signal.SIGKILL):
        pid = self.pids(instance)
        os.kill(pid, sig)
        return pid

    def domains(self, host):
        """The Cirrus domains the node's driver reports, by deploy id."""
        mon = self.json("host", "show", str(self.host_id(host)))["monitoring"]
        return {vm["DEPLOY_ID"]: vm["STATE"] for vm in mon.get("VMS", [])}

    def host_id(self, name):
        return next(h["id"] for h in self.json("host", "list") if h["name"] == name)

    def wait_status(self, vm_ids, status, timeout=120):
        def reached():
            vms = {vm["id"]: vm for vm in self.json("vm", "list", "--all")}
            return all(vms[i]["status"] == status for i in vm_ids)
        wait_until(reached, timeout, interval=0.5, what=f"VMs {vm_ids} {status}")


@pytest.fixture
def make_cluster(tmp_path_factory):
    clusters = []

    def make(**kwargs):
        cluster = Cluster(tmp_path_factory.mktemp("cluster"), **kwargs).start()
        clusters.append(cluster)
        return cluster
    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One embedded-driver cluster shared by a module's tests."""
    c = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()
