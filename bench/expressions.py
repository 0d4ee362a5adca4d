"""How fast compiled SCHED_REQUIREMENTS and SCHED_RANK run, beside the floor.

    .venv/bin/python bench/expressions.py [--hosts 2500] [--rounds 20]

Evaluates a typical requirement and a typical rank over N host dicts shaped
like the scheduler's (ints for the built-in attributes, strings from host
templates), and the same test written by hand as a Python lambda: that lambda
is the floor, what no compiled expression can beat. Also times compiling (a
parse with lark) with and without the cache. The last line printed is one
JSON object with the figures.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cirrus.expressions import _compile_cached, compile_rank, compile_requirements  # noqa: E402

REQUIREMENT = 'CLUSTER_ID = 100 & HYPERVISOR = "kvm" & FREE_MEM > 2048 & !(NAME = "old-*")'
RANK = "FREE_CPU * 100 - RUNNING_VMS"


def requirement_floor(host):
    return (host.get("CLUSTER_ID") == 100 and host.get("HYPERVISOR") == "kvm"
            and host.get("FREE_MEM", 0) > 2048 and not host.get("NAME", "").startswith("old-"))


def rank_floor(host):
    return float(host.get("FREE_CPU", 0) * 100 - host.get("RUNNING_VMS", 0))


def make_hosts(n, seed=4):
    rng = random.Random(seed)
    return [{"ID": i, "NAME": f"{rng.choice(['node', 'old'])}-{i}", "CLUSTER_ID": rng.choice([0, 100, 101]),
             "HYPERVISOR": rng.choice(["kvm", "kvm", "lxc"]), "FREE_MEM": rng.randrange(0, 65536),
             "FREE_CPU": rng.randrange(0, 3200), "RUNNING_VMS": rng.randrange(0, 40),
             "RACK": f"r{i % 40}"} for i in range(n)]


def per_second(function, hosts, rounds):
    """Evaluations per second of ``function`` over all hosts, best of ``rounds``."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for host in hosts:
            function(host)
        best = min(best, time.perf_counter() - start)
    return len(hosts) / best


def compile_time(n):
    """Seconds per compile: distinct texts (a real parse each), then one text again (cached)."""
    start = time.perf_counter()
    for i in range(n):
        compile_requirements(f"{REQUIREMENT} & ID != {i}")
    uncached = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        compile_requirements(REQUIREMENT)
    cached = (time.perf_counter() - start) / n
    return uncached, cached


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    hosts = make_hosts(args.hosts)
    requirement, rank = compile_requirements(REQUIREMENT), compile_rank(RANK)
    assert [requirement.evaluate(h) for h in hosts] == [requirement_floor(h) for h in hosts]
    assert [rank.evaluate(h) for h in hosts] == [rank_floor(h) for h in hosts]

    figures = {
        "hosts": args.hosts,
        "requirement": REQUIREMENT,
        "requirement_evals_per_s": round(per_second(requirement.evaluate, hosts, args.rounds)),
        "requirement_floor_evals_per_s": round(per_second(requirement_floor, hosts, args.rounds)),
        "rank": RANK,
        "rank_evals_per_s": round(per_second(rank.evaluate, hosts, args.rounds)),
        "rank_floor_evals_per_s": round(per_second(rank_floor, hosts, args.rounds)),
    }
    _compile_cached.cache_clear()
    uncached, cached = compile_time(500)
    figures["compile_us"] = round(uncached * 1e6, 1)
    figures["compile_cached_us"] = round(cached * 1e6, 2)
    # 10,000 VMs x 2,500 hosts, one requirement and one rank each, on one core.
    pairs = 10_000 * 2_500
    figures["requirement_s_for_10000_vms_x_2500_hosts"] = round(pairs / figures["requirement_evals_per_s"], 1)
    for key, value in figures.items():
        print(f"{key:45} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
