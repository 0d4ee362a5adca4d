"""Create-to-RUNNING latency and throughput of the whole pipeline, on the embedded driver.

    .venv/bin/python bench/vm_pipeline.py [--n 200] [--concurrency 4] [--latency-n 50]

Starts a cluster of its own (fresh database and RabbitMQ vhost) with one node
on libvirt's test:///default, and times each VM from the Create call to the
RUNNING event seen on a Watch stream, in two phases:
- latency: `latency-n` VMs one at a time, each created once the previous one runs;
- burst: N VMs created from `concurrency` client threads at once, for the
  throughput, and the latency a VM sees while the others queue.
In the same run it measures the floors: a raw libvirt defineXML + create on the
same driver, and a bare Nameko RPC round trip. The last line printed is one
JSON object with the figures and their floors.
"""
import argparse
import json
import statistics
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floors  # noqa: E402
from cluster import BenchCluster  # noqa: E402

GATEWAY_PORT = 50151


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Pipeline:
    """A logged-in client and a Watch stream that notes when each VM runs."""

    def __init__(self):
        from cirrus.client import Client
        address = f"127.0.0.1:{GATEWAY_PORT}"
        admin = Client(address, username="admin", password="cirrus")
        self.client = Client(address, token=admin.login()["token"])
        host = self.client.list_hosts()[0]["id"]
        while self.client.get_host(host)["state"] != "MONITORED":
            time.sleep(0.2)
        self.running_at, self.changed = {}, threading.Condition()
        threading.Thread(target=self._watch, daemon=True).start()
        time.sleep(0.5)     # let the Watch stream subscribe

    def _watch(self):
        for change in self.client.watch_vms():
            if change.get("status") == "RUNNING":
                with self.changed:
                    self.running_at.setdefault(change["id"], time.perf_counter())
                    self.changed.notify_all()

    def create(self, name):
        """Create a VM; returns (its id, when the call started)."""
        started = time.perf_counter()
        return self.client.create_vm(name=name, cpu=0.05, vcpu=1, memory=8)["id"], started

    def wait_running(self, ids, timeout=300):
        with self.changed:
            if not self.changed.wait_for(lambda: all(i in self.running_at for i in ids), timeout):
                missing = len([i for i in ids if i not in self.running_at])
                raise SystemExit(f"{missing}/{len(ids)} VMs did not reach RUNNING in {timeout} s")

    def latency(self, n):
        """Seconds from Create to RUNNING for n VMs made one at a time."""
        out = []
        for i in range(n):
            vm_id, started = self.create(f"lat-{i}")
            self.wait_running([vm_id])
            out.append(self.running_at[vm_id] - started)
        return out

    def burst(self, n, concurrency):
        """Latencies and wall time of n VMs created from ``concurrency`` threads."""
        with ThreadPoolExecutor(concurrency) as pool:
            made = list(pool.map(self.create, [f"burst-{i}" for i in range(n)]))
        self.wait_running([vm_id for vm_id, _ in made])
        latencies = [self.running_at[vm_id] - started for vm_id, started in made]
        wall = max(self.running_at[vm_id] for vm_id, _ in made) - min(s for _, s in made)
        return latencies, wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="VMs to create (default 200)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="client threads creating VMs at once in the burst (default 4)")
    parser.add_argument("--latency-n", type=int, default=50,
                        help="VMs created one at a time for the latency phase (default 50)")
    args = parser.parse_args()

    libvirt_floor = floors.libvirt_define_create(max(args.n, 50))
    datastore = Path("/var/tmp/cirrus") / f"bench-{uuid.uuid4().hex[:8]}"
    try:
        with BenchCluster(gateway_port=GATEWAY_PORT, drivers_monitor_interval=1,
                          drivers_datastore=datastore) as cluster:
            # the guests' gate is not in the path being timed
            cluster.start("cluster", ["cirrus-launch", "--nodes", "bench-1", "--no-migrate",
                                      "--scale", "gate=0"], "cirrus: cluster ready")
            rpc_floor = floors.nameko_rpc_round_trip(cluster.amqp_uri, 200)
            pipeline = Pipeline()
            alone = pipeline.latency(args.latency_n)
            burst, wall = pipeline.burst(args.n, args.concurrency)
    finally:
        shutil.rmtree(datastore, ignore_errors=True)
    ms = lambda s: round(s * 1000, 2)  # noqa: E731
    p50, p95 = statistics.median(alone), percentile(alone, 95)
    overhead = p50 - libvirt_floor
    print(f"one at a time ({args.latency_n} VMs): create -> RUNNING p50 {ms(p50)} ms, "
          f"p95 {ms(p95)} ms")
    print(f"burst ({args.n} VMs from {args.concurrency} threads): throughput "
          f"{args.n / wall:.1f} VMs/s, create -> RUNNING p50 {ms(statistics.median(burst))} ms, "
          f"p95 {ms(percentile(burst, 95))} ms")
    print(f"floor: libvirt define+create {ms(libvirt_floor)} ms; "
          f"bare Nameko RPC round trip {ms(rpc_floor)} ms")
    print(f"p50 overhead above the libvirt floor: {ms(overhead)} ms "
          f"(= {overhead / rpc_floor:.1f} bare RPC round trips)")
    print(json.dumps({
        "bench": "vm_pipeline", "latency_n": args.latency_n, "n": args.n,
        "concurrency": args.concurrency,
        "p50_ms": ms(p50), "p95_ms": ms(p95),
        "p50_overhead_above_floor_ms": ms(overhead),
        "p50_in_rpc_round_trips": round(overhead / rpc_floor, 2),
        "burst_throughput_vms_per_s": round(args.n / wall, 2),
        "burst_p50_ms": ms(statistics.median(burst)),
        "burst_p95_ms": ms(percentile(burst, 95)),
        "floor_libvirt_define_create_ms": ms(libvirt_floor),
        "floor_nameko_rpc_ms": ms(rpc_floor)}))


if __name__ == "__main__":
    main()
