"""The scheduler at OpenNebula's ceiling: 2,500 hosts and 10,000 pending VMs.

    .venv/bin/python bench/scheduler_scale.py [--hosts 2500] [--vms 10000] [--seed 1]

Makes a fresh database and RabbitMQ vhost, writes the hosts (5 clusters,
templates with ZONE, SSD, RACK and PRIORITY, some RESERVED_CPU) and the
pending VMs (mixed sizes, a few SCHED_REQUIREMENTS and SCHED_RANK, some
USER_PRIORITY) straight into the database, declares the hosts' command
queues as their nodes would have (each has carried a message before, as on a
running cluster) and a queue hearing every VM state change (as the gRPC
gateway's Watch streams do), starts `lifecycle` and one `scheduler` as
processes, and wakes the scheduler once. The figure is the time from that
wake-up until no VM is PENDING: reading the hosts and VMs,
planning, and lifecycle's reservation of every VM (deploy_many: row locks, one
conditional UPDATE per batch for the hosts' shares, the state changes, history,
events and driver commands written to the outbox) all in the loop. The outbox
sends the events and commands after each commit, concurrently.

In the same run it measures:
- planning alone: the same Planner over the same rows, in this process;
- the floors: raw SQL reservation throughput, one conditional UPDATE per VM
  and set-based (one UPDATE per batch, as deploy_many), nothing else; a
  bare Nameko RPC round trip; and one persistent publish with a publisher
  confirm (what each of the outbox's messages cost before it batched them);
- the CPU seconds lifecycle and the scheduler used while placing, and what
  the whole machine, RabbitMQ and PostgreSQL used meanwhile (this machine's
  2 cores are shared, so wall time swings with other load).
It checks no host is over-committed, every placed VM satisfies its
requirements, every driver command reached its host's queue once and every
VM's state change was heard (and in how many messages: a host's commands of
one transaction travel together, and so do its state changes under one
routing key), and says when the outbox had sent the last of them. The last
line printed is one JSON object.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cluster  # noqa: E402
import floors  # noqa: E402


REQUIREMENTS = [None, None, None, 'SSD = "yes"', 'ZONE = "z1" | ZONE = "z2"',
                'RACK = "r1*"', 'MAX_CPU > 1600 & HYPERVISOR = "kvm"',
                '!(ZONE = "z3") & FREE_CPU > 200', "PRIORITY > 2"]
RANKS = [None, None, "FREE_CPU", "-RUNNING_VMS", "PRIORITY * 10 - RUNNING_VMS"]
SIZES = [(0.5, 512), (1.0, 1024), (1.0, 2048), (2.0, 2048), (2.0, 4096)]


def hosts_rows(n, cluster_ids, rng):
    rows = []
    for i in range(n):
        cpu = rng.choice([800, 1600, 3200])
        template = {"ZONE": f"z{i % 4}", "SSD": "yes" if i % 3 == 0 else "no",
                    "RACK": f"r{i % 20}", "PRIORITY": str(i % 5)}
        if i % 10 == 0:
            template["RESERVED_CPU"] = "100"
        rows.append({
            "name": f"bench-host-{i}", "state": "MONITORED", "ha": "none",
            "cluster_id": cluster_ids[i % len(cluster_ids)],
            "max_cpu": cpu, "max_mem": cpu * 32, "cpu_usage": 0, "mem_usage": 0,
            "running_vms": 0, "reserved_cpu": 100 if i % 10 == 0 else 0, "reserved_mem": 0,
            "template": template,
            "monitoring": {"HYPERVISOR": "kvm", "TOTALCPU": cpu, "USEDCPU": (i * 7) % cpu,
                           "FREECPU": cpu - (i * 7) % cpu, "TOTALMEMORY": cpu * 32 * 1024,
                           "URI": f"qemu+tcp://bench-host-{i}/system"}})
    return rows


def vm_rows(n, owner_id, rng):
    rows = []
    for i in range(n):
        cpu, memory = rng.choice(SIZES)
        template = {"CPU": str(cpu), "MEMORY": str(memory)}
        requirement, rank = rng.choice(REQUIREMENTS), rng.choice(RANKS)
        if requirement:
            template["SCHED_REQUIREMENTS"] = requirement
        if rank:
            template["SCHED_RANK"] = rank
        if i % 20 == 0:
            template["USER_PRIORITY"] = "10"
        rows.append({"name": f"bench-vm-{i}", "owner_id": owner_id, "state": "PENDING",
                     "lcm_state": "LCM_INIT", "seq": 1, "cpu": cpu, "vcpu": 1,
                     "memory": memory, "template": template})
    return rows


def populate(url, n_hosts, n_vms, seed):
    from sqlalchemy import insert, select
    from cirrus import db
    from cirrus.db.models import Cluster, Host, User, VirtualMachine
    rng = random.Random(seed)
    with db.session_factory(url)() as s, s.begin():
        owner = s.scalar(select(User.id).where(User.name == "admin"))
        clusters = s.scalars(insert(Cluster).returning(Cluster.id), [
            {"name": f"bench-cluster-{i}", "template": {"TIER": f"t{i}"}}
            for i in range(5)]).all()
        s.execute(insert(Host), hosts_rows(n_hosts, clusters, rng))
        s.execute(insert(VirtualMachine), vm_rows(n_vms, owner, rng))


def declare_node_queues(amqp_uri, n_hosts):
    """The hosts' command queues, as on a cluster that has been running: each
    declared by its node and having carried a message before. (The first
    message into a new queue costs RabbitMQ about 2 ms of CPU, setting up
    its files: a one-off that 2,500 hosts would otherwise all pay in the
    middle of the run.)"""
    from kombu import Connection, Producer
    from cirrus import messages
    with Connection(amqp_uri) as connection:
        channel = connection.channel()
        producer = Producer(channel, exchange=messages.COMMANDS)
        queues = [messages.node_queue(f"bench-host-{i}")(channel) for i in range(n_hosts)]
        for queue in queues:
            queue.declare()
            producer.publish({}, routing_key=queue.routing_key, delivery_mode=2)
        for queue in queues:
            while queue.get(no_ack=True) is None:
                time.sleep(0.01)


WATCH_QUEUE = "bench-vm-state-watch"


def watch_vm_states(amqp_uri):
    """A queue hearing every VM state change, as the gRPC gateway's Watch
    streams do (its hub binds ``vm.state.#``)."""
    from kombu import Connection, Queue
    from cirrus import messages
    with Connection(amqp_uri) as connection:
        Queue(WATCH_QUEUE, messages.event_exchange(messages.LIFECYCLE),
              routing_key=messages.VM_STATE_ANY[0], durable=False,
              auto_delete=False)(connection.channel()).declare()


def vm_states_heard(amqp_uri):
    """The VM state changes the watch queue got (taken off it), the messages
    they came in (one per transaction and routing key) and how many VMs
    changed: each placed VM once."""
    from kombu import Connection, Queue
    from cirrus import messages
    changes, sent, vms = 0, 0, set()
    with Connection(amqp_uri) as connection:
        queue = Queue(WATCH_QUEUE)(connection.channel())
        while (message := queue.get(no_ack=True)) is not None:
            events = messages.events_in(message.payload)
            changes, sent = changes + len(events), sent + 1
            vms.update(event["id"] for event in events)
    return changes, sent, len(vms)


def plan_in_process(url):
    """Planning alone: the scheduler's reading and planning of one pass, no reservation."""
    import gc
    from cirrus import db, instance
    from services.scheduler import service
    from services.scheduler.placement import Planner
    gc.set_threshold(*instance.GC_THRESHOLDS)     # as in the scheduler's process
    with db.session_factory(url)() as session:
        start = time.perf_counter()
        vms, _ = service.waiting_vms(session)
        hosts = service.monitored_hosts(session)
        read = time.perf_counter() - start
    start = time.perf_counter()
    planner = Planner(hosts, "packing")
    steps = list(planner.plan(vms))
    planned = time.perf_counter() - start
    return read, planned, sum(1 for _, host, _ in steps if host is not None)


def check(url):
    """Over-committed hosts, and placed VMs whose host does not meet their requirements."""
    from sqlalchemy import select
    from cirrus import db
    from cirrus.db.models import Host, VirtualMachine
    from cirrus.expressions import compile_requirements
    from services.scheduler import service
    with db.session_factory(url)() as s:
        over = s.scalar(select(Host.id).where(
            (Host.cpu_usage > Host.max_cpu - Host.reserved_cpu)
            | (Host.mem_usage > Host.max_mem - Host.reserved_mem)).limit(1))
        hosts = {h.id: h for h in service.monitored_hosts(s)}
        wrong = 0
        for vm_id, template, host_id in s.execute(select(
                VirtualMachine.id, VirtualMachine.template, VirtualMachine.host_id)
                .where(VirtualMachine.host_id.is_not(None))):
            requirement = compile_requirements(template.get("SCHED_REQUIREMENTS"), template)
            wrong += not requirement.evaluate(hosts[host_id].attributes)
    return over, wrong


def outbox_drained(url, timeout=300):
    """Seconds until the outbox is empty: every event and driver command of
    the placements handed to RabbitMQ and confirmed."""
    from sqlalchemy import func, select
    from cirrus import db
    from cirrus.db.models import Outbox
    factory, start = db.session_factory(url), time.perf_counter()
    while time.perf_counter() - start < timeout:
        with factory() as s:
            if not s.scalar(select(func.count()).select_from(Outbox)):
                return time.perf_counter() - start
        time.sleep(0.1)
    raise SystemExit(f"the outbox still had rows {timeout} s after placement")


def commands_queued(amqp_uri, n_hosts):
    """The driver commands waiting in the hosts' queues (taken off them), the
    messages they came in (one per host and transaction) and how many VMs got
    more than one: one each, unless some were lost or sent twice."""
    from collections import Counter
    from kombu import Connection
    from cirrus import messages
    vms, sent = Counter(), 0
    with Connection(amqp_uri) as connection:
        channel = connection.channel()
        for i in range(n_hosts):
            queue = messages.node_queue(f"bench-host-{i}")(channel)
            while (message := queue.get(no_ack=True)) is not None:
                vms.update(cmd["vm_id"] for cmd in messages.commands_in(message.payload))
                sent += 1
    return sum(vms.values()), sent, sum(1 for count in vms.values() if count > 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2500)
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1000,
                        help="placements per deploy_many call (scheduler.batch)")
    parser.add_argument("--lifecycles", type=int, default=1,
                        help="lifecycle processes sharing the work (default 1)")
    args = parser.parse_args()

    with cluster.BenchCluster(scheduler_sweep_interval=3600, scheduler_batch=args.batch,
                              lifecycle_host_timeout=36000) as bench:
        url, amqp_uri = bench.url, bench.amqp_uri
        start = time.perf_counter()
        populate(url, args.hosts, args.vms, args.seed)
        declare_node_queues(amqp_uri, args.hosts)
        watch_vm_states(amqp_uri)
        print(f"wrote {args.hosts} hosts (and their queues) and {args.vms} pending VMs in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        read, planned, plannable = plan_in_process(url)
        sql_floor = floors.reservation_floor(url, args.vms)
        set_floor = floors.set_reservation_floor(url, args.vms, args.batch)
        rpc_floor = floors.nameko_rpc_round_trip(amqp_uri, 200)
        publish_floor = floors.confirmed_publish_floor(amqp_uri)
        for i in range(args.lifecycles):
            bench.service(f"lifecycle-{i}", "lifecycle")
        bench.service("scheduler")
        cpu_before, machine_before = bench.cpu_seconds(), cluster.machine_cpu()
        placement, placed = wake_and_wait(url, amqp_uri, args.vms)
        cpu = {name: used - cpu_before[name] for name, used in bench.cpu_seconds().items()}
        machine = cluster.machine_cpu(since=machine_before)
        over, wrong = check(url)
        drained = placement + outbox_drained(url)
        commands, command_messages, repeated = commands_queued(amqp_uri, args.hosts)
        changes, change_messages, changed_vms = vm_states_heard(amqp_uri)

    ms = lambda s: round(s * 1000, 1)  # noqa: E731
    print(f"scheduler + {args.lifecycles} lifecycle, batches of {args.batch}: {placed} of "
          f"{args.vms} VMs placed on {args.hosts} hosts in "
          f"{placement:.2f} s ({placed / placement:.0f} VMs/s); goal < 2 s")
    print(f"  planning alone: read {ms(read)} ms, plan {ms(planned)} ms "
          f"({plannable} VMs plannable)")
    print(f"  floor: raw SQL reservation {args.vms / sql_floor:.0f} UPDATEs/s "
          f"({sql_floor:.2f} s for {args.vms}); bare Nameko RPC round trip {ms(rpc_floor)} ms")
    print(f"  floor: set-based SQL reservation (one UPDATE per {args.batch} VMs, as deploy_many) "
          f"{args.vms / set_floor:.0f} VMs/s ({set_floor:.2f} s for {args.vms})")
    print(f"  CPU used while placing: " + ", ".join(f"{name} {used:.2f} s"
                                                      for name, used in cpu.items()))
    print(f"  the machine while placing: {machine['busy_share']:.0%} of {machine['cores']} "
          f"cores busy; RabbitMQ {machine['rabbitmq_s']:.2f} s, "
          f"PostgreSQL {machine['postgresql_s']:.2f} s")
    sent = change_messages + command_messages
    print(f"  floor: one confirmed persistent publish {ms(publish_floor)} ms; the outbox sent "
          f"{sent} messages for {placed} VMs, so {sent * publish_floor:.1f} s one by one")
    print(f"  checks: over-committed hosts {0 if over is None else 'host ' + str(over)}, "
          f"placed VMs breaking their requirements {wrong}, driver commands sent "
          f"{commands} for {placed} VMs in {command_messages} messages ({repeated} VMs with "
          f"more than one); state changes heard {changes} for {changed_vms} VMs in "
          f"{change_messages} messages")
    print(f"  every event and driver command of the placements out of the outbox and "
          f"confirmed by RabbitMQ {drained:.2f} s after the wake-up")
    print(json.dumps({
        "bench": "scheduler_scale", "hosts": args.hosts, "vms": args.vms, "placed": placed,
        "lifecycles": args.lifecycles, "batch": args.batch,
        "placement_s": round(placement, 3), "placement_vms_per_s": round(placed / placement, 1),
        "goal_s": 2.0, "plan_only_ms": ms(planned), "read_only_ms": ms(read),
        "floor_sql_reservations_per_s": round(args.vms / sql_floor, 1),
        "floor_sql_reservation_s": round(sql_floor, 3),
        "floor_set_reservation_s": round(set_floor, 3), "floor_nameko_rpc_ms": ms(rpc_floor),
        "cpu_s": {name: round(used, 2) for name, used in cpu.items()}, "machine": machine,
        "floor_confirmed_publish_ms": round(publish_floor * 1000, 3),
        "over_committed_hosts": 0 if over is None else 1, "requirement_violations": wrong,
        "driver_commands_sent": commands, "command_messages": command_messages,
        "vms_sent_twice": repeated, "state_changes": changes,
        "state_change_messages": change_messages, "vms_changed": changed_vms,
        "all_commands_out_s": round(drained, 3)}))


def wake_and_wait(url, amqp_uri, n):
    """Wake the scheduler with a host.state event; seconds until no VM is PENDING."""
    from nameko.standalone.events import event_dispatcher
    from sqlalchemy import func, select
    from cirrus import db, messages
    from cirrus.db.models import VirtualMachine
    dispatch = event_dispatcher({"AMQP_URI": amqp_uri, "serializer": "json"})
    factory = db.session_factory(url)
    start = time.perf_counter()
    dispatch(messages.LIFECYCLE, messages.HOST_STATE, {"id": 0, "name": "bench",
                                                       "state": "MONITORED"})
    waiting = select(VirtualMachine.id).where(VirtualMachine.state == "PENDING")
    last, last_change, counted = None, time.perf_counter(), 0.0
    while True:
        # whether any VM still waits, often (it stops at the first one found);
        # how many, once a second, to see that placement still moves
        with factory() as s:
            if not s.scalar(select(waiting.exists())):
                return time.perf_counter() - start, n
            if time.perf_counter() - counted >= 1.0:
                pending = s.scalar(select(func.count()).select_from(waiting.subquery()))
                counted = time.perf_counter()
                if pending != last:
                    last, last_change = pending, counted
                elif counted - last_change > 30:
                    return last_change - start, n - pending     # the rest fits nowhere
        time.sleep(0.02)

if __name__ == "__main__":
    main()
