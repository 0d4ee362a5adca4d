"""Scaling out: the pipeline's throughput with 1, 2 and 3 instances of both
the scheduler and lifecycle, and where the ceiling is.

    .venv/bin/python bench/scale_out.py [--vms 1000] [--hosts 250] [--clients 16] [--max 3]

Each step is one ``pipeline_scale.measure`` run on a fresh cluster (database,
vhost, N lifecycles, N schedulers, one ``cirrus-node --simulate HOSTS``):
create to RUNNING for ``--vms`` VMs, with the floors measured in the same run
(a bare Nameko RPC round trip, raw SQL reservations). Beside the rate it
prints how busy the machine was (all cores) and what Cirrus's processes,
RabbitMQ and PostgreSQL each used: a run that keeps every core busy is
CPU-bound, and more instances on the same cores can only share that CPU; a
run that leaves cores idle waits on the broker's or the database's round
trips and locks. The last line printed is one JSON object.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_scale  # noqa: E402

CPU_BOUND = 0.9     # busy share of all cores above which a run is called CPU-bound


def ceiling(run):
    """Where one run's ceiling is, in words, from what the machine did."""
    machine = run["machine"]
    cirrus_s = sum(run["cpu_s"].values())
    busy = machine["busy_s"] or 1.0
    shares = {"Cirrus's processes": cirrus_s / busy,
              "RabbitMQ": machine["rabbitmq_s"] / busy,
              "PostgreSQL": machine["postgresql_s"] / busy}
    # the bench's own clients and whatever else ran on the machine
    shares["other programs"] = max(0.0, 1 - sum(shares.values()))
    parts = ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
    if machine["busy_share"] >= CPU_BOUND:
        return "cpu", f"CPU: {machine['busy_share']:.0%} of {machine['cores']} cores busy ({parts} of it)"
    return "waiting", (f"not CPU: {machine['busy_share']:.0%} of {machine['cores']} cores busy "
                       f"({parts}); idle time is spent waiting on broker and database round trips")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=250)
    parser.add_argument("--clients", type=int, default=16, help="threads creating VMs")
    parser.add_argument("--max", type=int, default=3, help="instances of each, 1 to MAX")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    runs = []
    for n in range(1, args.max + 1):
        run = pipeline_scale.measure(args.vms, args.hosts, args.clients, lifecycles=n,
                                     schedulers=n, timeout=args.timeout)
        if run["total_s"] is None:
            raise SystemExit(f"{n} of each: only {run['running']} of {args.vms} VMs RUNNING "
                             f"after {args.timeout} s")
        run["ceiling"], run["ceiling_text"] = ceiling(run)
        runs.append(run)
        print(f"{n} scheduler + {n} lifecycle: {run['vms_per_s']:.0f} VMs/s "
              f"({run['sustained_vms_per_s']:.0f} sustained), create to RUNNING median "
              f"{run['latency_median_s']:.2f} s; floors: RPC {run['floor_nameko_rpc_ms']} ms, "
              f"SQL {run['floor_sql_reservations_per_s']:.0f} reservations/s one by one; "
              f"checks: over-committed {run['over_committed_hosts']}, "
              f"wrong histories {run['wrong_histories']}", flush=True)
        print(f"  ceiling: {run['ceiling_text']}", flush=True)
        print("  CPU per VM: " + ", ".join(f"{name} {used / args.vms * 1000:.1f} ms"
                                           for name, used in run["cpu_s"].items()), flush=True)

    base = runs[0]["vms_per_s"]
    print("speed-up against 1 of each: " + ", ".join(
        f"{run['lifecycles']}: {run['vms_per_s'] / base:.2f}x" for run in runs))
    print(json.dumps({"bench": "scale_out", "vms": args.vms, "hosts": args.hosts,
                      "clients": args.clients, "goal_vms_per_s": 200,
                      "runs": [{key: run[key] for key in (
                          "lifecycles", "schedulers", "vms_per_s", "sustained_vms_per_s",
                          "latency_median_s", "speedup", "ceiling", "machine", "cpu_s",
                          "floor_nameko_rpc_ms", "floor_sql_reservations_per_s",
                          "floor_set_reservation_vms_per_s", "over_committed_hosts",
                          "wrong_histories", "load_average_1min") if key in run}
                               | {"speedup": round(run["vms_per_s"] / base, 2)}
                               for run in runs]}))


if __name__ == "__main__":
    main()
