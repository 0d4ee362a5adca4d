"""Create-to-RUNNING latency and throughput of the whole pipeline, on the embedded driver.

    .venv/bin/python bench/vm_pipeline.py [--n 200] [--concurrency 4]

Starts a cluster of its own (fresh database and RabbitMQ vhost) with one node
on libvirt's test:///default, creates N VMs through gRPC from `concurrency`
client threads, and times each from the Create call to the RUNNING event seen
on a Watch stream. In the same run it measures the floors: a raw libvirt
defineXML + create on the same driver, and a bare Nameko RPC round trip.
The last line printed is one JSON object with the figures and their floors.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402

BIN = Path(sys.executable).parent
BASE_DB = os.environ.get("CIRRUS_BENCH_DATABASE", "postgresql+psycopg2://postgres@127.0.0.1:5432/")
BASE_AMQP = os.environ.get("CIRRUS_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class BenchCluster:
    def __init__(self, port=50151):
        run = uuid.uuid4().hex[:8]
        self.db_name, self.vhost = f"cirrus_bench_{run}", f"cirrus-bench-{run}"
        self.amqp_uri = BASE_AMQP.rstrip("/") + "/" + self.vhost
        self.address = f"127.0.0.1:{port}"
        self.env = {**os.environ, "CIRRUS_DATABASE_URL": BASE_DB.rstrip("/") + "/" + self.db_name,
                    "CIRRUS_AMQP_URI": self.amqp_uri, "CIRRUS_GATEWAY_PORT": str(port),
                    "CIRRUS_DRIVERS_MONITOR_INTERVAL": "1",
                    "CIRRUS_DRIVERS_DATASTORE": f"/var/tmp/cirrus/bench-{run}"}

    def __enter__(self):
        for args in (["add_vhost", self.vhost],
                     ["set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True)
        self.log = open(f"/tmp/{self.vhost}.log", "w")
        self.proc = subprocess.Popen([str(BIN / "cirrus-launch"), "--nodes", "bench-1"],
                                     env=self.env, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        for line in self.proc.stdout:
            self.log.write(line)
            if "cirrus: cluster ready" in line:
                break
        else:
            raise SystemExit(f"the cluster did not start; see {self.log.name}")
        threading.Thread(target=lambda: self.log.writelines(self.proc.stdout), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.vhost], capture_output=True)
        subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--force",
                        self.db_name], capture_output=True)


def run_pipeline(cluster, n, concurrency):
    from cirrus.client import Client
    admin = Client(cluster.address, username="admin", password="cirrus")
    token = admin.login()["token"]
    client = Client(cluster.address, token=token)
    host = client.list_hosts()[0]["id"]
    while client.get_host(host)["state"] != "MONITORED":
        time.sleep(0.2)

    running_at, done = {}, threading.Event()

    def watch():
        for change in client.watch_vms():
            if change.get("status") == "RUNNING" and change["id"] not in running_at:
                running_at[change["id"]] = time.perf_counter()
                if len(running_at) >= n:
                    done.set()
                    return
    threading.Thread(target=watch, daemon=True).start()
    time.sleep(0.5)     # let the Watch stream subscribe

    started = {}

    def create(i):
        t0 = time.perf_counter()
        vm = client.create_vm(name=f"bench-{i}", cpu=0.05, vcpu=1, memory=8)
        started[vm["id"]] = t0
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(create, range(n)))
    if not done.wait(300):
        raise SystemExit(f"only {len(running_at)}/{n} VMs reached RUNNING in 300 s")
    latencies = [running_at[i] - started[i] for i in started]
    wall = max(running_at.values()) - min(started.values())
    return latencies, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="VMs to create (default 200)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="client threads creating VMs at once (default 4)")
    args = parser.parse_args()

    libvirt_floor = floors.libvirt_define_create(max(args.n, 50))
    with BenchCluster() as cluster:
        rpc_floor = floors.nameko_rpc_round_trip(cluster.amqp_uri, 200)
        latencies, wall = run_pipeline(cluster, args.n, args.concurrency)
    p50, p95 = statistics.median(latencies), percentile(latencies, 95)
    ms = lambda s: round(s * 1000, 2)  # noqa: E731
    print(f"VMs created: {args.n} from {args.concurrency} client threads")
    print(f"create -> RUNNING  p50 {ms(p50)} ms   p95 {ms(p95)} ms   "
          f"throughput {args.n / wall:.1f} VMs/s")
    print(f"floor: libvirt define+create {ms(libvirt_floor)} ms; "
          f"bare Nameko RPC round trip {ms(rpc_floor)} ms")
    print(f"p50 overhead above the libvirt floor: {ms(p50 - libvirt_floor)} ms "
          f"(= {(p50 - libvirt_floor) / rpc_floor:.1f} bare RPC round trips)")
    print(json.dumps({
        "bench": "vm_pipeline", "n": args.n, "concurrency": args.concurrency,
        "p50_ms": ms(p50), "p95_ms": ms(p95), "throughput_vms_per_s": round(args.n / wall, 2),
        "floor_libvirt_define_create_ms": ms(libvirt_floor),
        "floor_nameko_rpc_ms": ms(rpc_floor),
        "p50_overhead_above_floor_ms": ms(p50 - libvirt_floor),
        "p50_in_rpc_round_trips": round((p50 - libvirt_floor) / rpc_floor, 2)}))


if __name__ == "__main__":
    main()
