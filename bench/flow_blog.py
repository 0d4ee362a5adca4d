"""OneFlow's three blog figures on Cirrus: deploy, scale and warning, on simulated hosts with no delay.

    .venv/bin/python bench/flow_blog.py [--tries 10] [--chain 20] [--vms 500] [--big-tries 1]

OpenNebula 5.12's OneFlow rewrite (events instead of polling) brought a
2-role straight service from instantiate to RUNNING in 11 s, a role's scale
from 1 to 2 VMs in 5 s, and noticed a VM powered off behind its back in 1 s.
This bench starts a cluster of its own (fresh database and RabbitMQ vhost)
(bench/cluster.py) whose hosts are simulated (0 s per action) by one
`cirrus-node --simulate` process, as in the other benches; it powers a domain
off behind the platform's back with that node's control, `cirrus-node
simulate-change` (what a guest's own power-off or an operator's virsh destroy
looks like to the node). Everything goes through the SDK and gRPC; times run
from the call until the change shows on a Watch stream. `tries` times each:
- deploy: a 2-role straight service (master, then slave), instantiate -> RUNNING;
- scale: a role from 1 to 2 VMs (cooldown 0, so excluded), until RUNNING with
  2 VMs; and back to 1;
- warning: a VM's domain powered off behind the platform's back, until the
  service shows WARNING; the domain running again, until RUNNING. Timed
  from the node's vm.event (its "at"), which this bench also consumes, so
  the control request's own trip to the node is not counted.
The deploy is timed twice: through the API (the request manager makes a
provisioning request of it, runs its approval process, then asks flow), and
through flow's own RPC. Then `big-tries` times a straight chain of `chain` roles, and a service of
`vms` VMs (one role), instantiate -> RUNNING and delete -> DONE; these are
instantiated through flow's own RPC, since the request manager holds a
service that big for an administrator's approval.

Floors measured in the same run: a bare Nameko RPC round trip (bench/floors.py);
one plain VM made by lifecycle.allocate (as flow makes each VM) -> RUNNING
on the same hosts (a straight service of k roles cannot beat k of these in
a row); the same
power-off seen as the VM's POWEROFF on a VM Watch (what flow's WARNING builds
on); and `vms` plain VMs made through lifecycle.allocate, 50 in flight as flow
does, until all RUNNING. The last line printed is one JSON object.
"""
import argparse
import json
import signal
import socket
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cluster  # noqa: E402
import floors  # noqa: E402
from vm_pipeline import percentile  # noqa: E402

OPENNEBULA_MS = {"deploy": 11000, "scale": 5000, "warning": 1000}   # 5.12, from the blog
GOAL_MS = {"deploy": 200, "scale": 100, "warning": 100}
HOSTS = 4
PREFIX = "flowbench"
SMALL_VM = "CPU = 0.05\nMEMORY = 16\n"
ALLOCATE_WINDOW = 50


class FlowBenchCluster(cluster.BenchCluster):
    """A bench cluster (bench/cluster.py) with the services, the gateway and
    one `cirrus-node --simulate HOSTS` as processes."""

    def __init__(self, port=50153):
        super().__init__(flow_default_cooldown=0, gateway_port=port)
        self.address = f"127.0.0.1:{port}"
        from services.drivers.worker import simulated_hosts
        self.hosts = simulated_hosts(HOSTS, PREFIX)

    def __enter__(self):
        super().__enter__()
        try:
            for name in ("lifecycle", "scheduler", "flow", "requests"):
                self.service(name)
            self.start("gateway", ["cirrus-gateway"], "gateway listening on")
            self.start("node", ["cirrus-node", "--simulate", str(HOSTS), "--prefix", PREFIX,
                                "--register", "--monitor-interval", "5"], "hosts registered")
        except BaseException:
            self.__exit__(*sys.exc_info())      # no process is left behind
            raise
        return self


def perf_counter_of(wall):
    """The perf_counter reading of a time.time() ``wall`` (both clocks of this machine)."""
    return time.perf_counter() - (time.time() - wall)


class NodeEvents:
    """The nodes' vm.events, as lifecycle gets them: {(VM id, state): [when the
    node made each, as perf_counter]}, from the event's own "at"."""

    def __init__(self, amqp_uri):
        from kombu import Connection, Consumer, Queue, binding
        from cirrus import messages
        self.made = {}
        self.lost = None        # what stopped the consumer, if anything did
        self.changed = threading.Condition()
        self.conn = Connection(amqp_uri)
        events = messages.event_exchange(messages.NODE)
        queue = Queue(f"bench-vm-events-{time.monotonic_ns()}", exclusive=True,
                      bindings=[binding(events, routing_key=messages.VM_EVENT)])
        self.consumer = Consumer(self.conn.channel(), queues=[queue], callbacks=[self._got],
                                 accept=["json"])
        self.consumer.consume()     # bound before any change is made
        threading.Thread(target=self._drain, name="vm-events", daemon=True).start()

    def _got(self, body, message):
        at = perf_counter_of(datetime.fromisoformat(body["at"]).timestamp())
        with self.changed:
            self.made.setdefault((body["vm_id"], body["state"]), []).append(at)
            self.changed.notify_all()
        message.ack()

    def _drain(self):
        while True:
            try:
                self.conn.drain_events(timeout=1)
            except socket.timeout:
                pass
            except Exception as exc:    # e.g. the bench's vhost deleted at the end of the run
                self.lost = exc
                return

    def count(self, vm_id, state):
        with self.changed:
            return len(self.made.get((vm_id, state), ()))

    def made_at(self, vm_id, state, count, timeout=30):
        """When the node made its ``count``-th vm.event of ``vm_id`` in ``state``."""
        with self.changed:
            if not self.changed.wait_for(
                    lambda: len(self.made.get((vm_id, state), ())) >= count, timeout):
                raise SystemExit(f"no vm.event of VM {vm_id} {state} within {timeout} s"
                                 + (f" (the consumer stopped: {self.lost})" if self.lost else ""))
            return self.made[(vm_id, state)][count - 1]


class Timeline:
    """Every flow and VM change seen on two Watch streams, with when it came."""

    def __init__(self, client):
        self.client = client
        self.changed = threading.Condition()
        self.flows = []         # (perf_counter, service dict)
        self.vms = []           # (perf_counter, VM id, status)
        threading.Thread(target=self._watch_flows, daemon=True).start()
        threading.Thread(target=self._watch_vms, daemon=True).start()
        time.sleep(0.5)         # let both streams subscribe

    def _watch_flows(self):
        for change in self.client.watch_flows():
            with self.changed:
                self.flows.append((time.perf_counter(), change["flow"]))
                self.changed.notify_all()

    def _watch_vms(self):
        for change in self.client.watch_vms():
            with self.changed:
                self.vms.append((time.perf_counter(), change["id"], change.get("status")))
                self.changed.notify_all()

    def _wait(self, found, what, timeout):
        with self.changed:
            if not self.changed.wait_for(found, timeout):
                raise SystemExit(f"{what} not seen within {timeout} s")
            return found()

    def flow(self, service_id, since, check, what, timeout=300):
        """perf_counter of the first change of the service after ``since`` that
        ``check``s; a FAILED_* state ends the bench with its message."""
        def found():
            for at, service in self.flows:
                if at >= since and service["id"] == service_id:
                    if service["state"].startswith("FAILED"):
                        raise SystemExit(f"service {service_id} {service['state']}: "
                                         f"{service.get('message')}")
                    if check(service):
                        return at
            return None
        return self._wait(found, f"service {service_id} {what}", timeout)

    def state(self, service_id, since, state, timeout=300):
        """As ``flow``, for a state. A stream that fell behind is resynced
        with the services as they are, which leaves DONE ones out: past a few
        seconds the service is read too, and a state it reached is timed by
        its updated_at."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.flow(service_id, since, lambda s: s["state"] == state, state,
                                 min(5, max(0.1, deadline - time.monotonic())))
            except SystemExit:
                if time.monotonic() > deadline:
                    raise
            service = self.client.get_flow(service_id)
            if service["state"] == state:
                return perf_counter_of(
                    datetime.fromisoformat(service["updated_at"]).timestamp())

    def vm(self, since, ids, status, timeout=300):
        """perf_counter when the last of ``ids`` showed ``status`` after ``since``."""
        ids = set(ids)

        def found():
            seen = {}
            for at, vm_id, shown in self.vms:
                if at >= since and vm_id in ids and shown == status:
                    seen.setdefault(vm_id, at)
            return max(seen.values()) if len(seen) == len(ids) else None
        return self._wait(found, f"{len(ids)} VM(s) {status}", timeout)


def role(name, parents=(), cardinality=1, **more):
    return {"name": name, "cardinality": cardinality, "parents": list(parents),
            "vm_template_contents": SMALL_VM, **more}


def nodes_of(service, role_name):
    return next(r for r in service["roles"] if r["name"] == role_name).get("nodes") or []


def windowed(method, calls):
    """``method(**kwargs)`` for each of ``calls``, ALLOCATE_WINDOW in flight."""
    out = []
    for start in range(0, len(calls), ALLOCATE_WINDOW):
        replies = [method.call_async(**kwargs) for kwargs in calls[start:start + ALLOCATE_WINDOW]]
        out.extend(reply.result() for reply in replies)
    return out


class Bench:
    def __init__(self, bench_cluster):
        from cirrus.client import Client
        admin = Client(bench_cluster.address, username="admin", password="cirrus")
        login = admin.login()
        self.user_id = login["user"]["id"]
        self.client = Client(bench_cluster.address, token=login["token"], timeout=300)
        self.cluster = bench_cluster
        while sum(h["state"] == "MONITORED" for h in self.client.list_hosts()
                  if h["name"] in bench_cluster.hosts) < len(bench_cluster.hosts):
            time.sleep(0.2)
        self.timeline = Timeline(self.client)
        self.node_events = NodeEvents(bench_cluster.amqp_uri)

    def template(self, name, roles, **more):
        body = {"name": name, "deployment": "straight", "roles": roles, **more}
        return self.client.create_flow_template(body)["id"]

    def instantiate_running(self, template_id, direct=False):
        """(service id, seconds from instantiate until RUNNING on Watch).
        ``direct``: through flow's own RPC, past the request manager, where a
        service of 4 vCPUs or more waits for an administrator's approval."""
        began = time.perf_counter()
        if direct:
            with self.rpc() as proxy:
                service_id = proxy.flow.instantiate(template_id, self.user_id)["id"]
        else:
            service_id = self.client.instantiate_flow_template(template_id)["id"]
        return service_id, self.timeline.state(service_id, began, "RUNNING") - began

    def rpc(self):
        from nameko.standalone.rpc import ClusterRpcProxy
        return ClusterRpcProxy({"AMQP_URI": self.cluster.amqp_uri, "serializer": "json"},
                               timeout=600)

    def delete_done(self, service_id):
        began = time.perf_counter()
        self.client.delete_flow(service_id)
        return self.timeline.state(service_id, began, "DONE", timeout=600) - began

    # ------------------------------------------------------------ floors

    def plain_vm(self, tries):
        """Seconds from lifecycle.allocate (the call flow makes for each VM, past
        the request manager's provisioning requests) to RUNNING on Watch, for
        one plain VM at a time."""
        out = []
        with self.rpc() as proxy:
            for i in range(tries):
                began = time.perf_counter()
                vm_id = proxy.lifecycle.allocate(
                    owner_id=self.user_id, name=f"floor-{i}", cpu=0.05, vcpu=1, memory=16,
                    template={"CPU": "0.05", "MEMORY": "16"})["id"]
                out.append(self.timeline.vm(began, [vm_id], "RUNNING") - began)
                began = time.perf_counter()
                proxy.lifecycle.vm_action(vm_id, "terminate", {"hard": True})
                self.timeline.vm(began, [vm_id], "DONE")
        return out

    def plain_burst(self, count):
        """(running, done): seconds from the first lifecycle.allocate of ``count``
        VMs until the last is RUNNING, and from the first terminate until the
        last is DONE; ALLOCATE_WINDOW calls in flight, as flow makes and ends a
        role's VMs."""
        template = {"CPU": "0.05", "MEMORY": "16"}
        with self.rpc() as proxy:
            began = time.time()
            ids = [vm["id"] for vm in windowed(proxy.lifecycle.allocate, [
                dict(owner_id=self.user_id, name=f"burst-{i}", cpu=0.05, vcpu=1, memory=16,
                     template=template) for i in range(count)])]
            running = self.history(ids, "RUNNING", began)
            began = time.time()
            windowed(proxy.lifecycle.vm_action, [
                dict(vm_id=vm_id, action="terminate", options={"hard": True}) for vm_id in ids])
            done = self.history(ids, "DONE", began)
        return running, done

    def history(self, ids, status, began, timeout=600):
        """Seconds from ``began`` (time.time()) until the last of ``ids`` was
        ``status``, by lifecycle's history rows: hundreds of VMs change at once,
        and a Watch stream that falls behind is resynced, skipping changes."""
        from sqlalchemy import func, select
        from cirrus import db
        from cirrus.db.models import VmHistory
        deadline = time.monotonic() + timeout
        query = select(func.count(func.distinct(VmHistory.vm_id)), func.max(VmHistory.at)) \
            .where(VmHistory.vm_id.in_(ids), VmHistory.to_status == status)
        with db.session_factory(self.cluster.url)() as session:
            while True:
                count, last = session.execute(query).one()
                session.rollback()
                if count == len(ids):
                    return last.timestamp() - began
                if time.monotonic() > deadline:
                    raise SystemExit(f"{len(ids) - count}/{len(ids)} VMs not {status} "
                                     f"within {timeout} s")
                time.sleep(0.2)

    # ------------------------------------------------------------ the blog's three

    def deploy(self, tries, direct=False):
        template_id = self.template("blog-deploy", [role("master"), role("slave", ["master"])])
        out = []
        for _ in range(tries):
            service_id, took = self.instantiate_running(template_id, direct)
            out.append(took)
            self.delete_done(service_id)
        return out

    def scale(self, tries):
        """(up, down): seconds from scale until RUNNING with the new number of VMs."""
        template_id = self.template("blog-scale", [role("web", min_vms=1, max_vms=2,
                                                        cooldown=0)])
        service_id, _ = self.instantiate_running(template_id)
        up, down = [], []
        for _ in range(tries):
            for cardinality, out in ((2, up), (1, down)):
                began = time.perf_counter()
                self.client.scale_flow(service_id, "web", cardinality)
                out.append(self.timeline.flow(
                    service_id, began, lambda s, n=cardinality: s["state"] == "RUNNING" and
                    len(nodes_of(s, "web")) == n, f"RUNNING with {cardinality} VMs") - began)
        self.delete_done(service_id)
        return up, down

    def warning(self, tries):
        """(warning, vm_poweroff, recovered): seconds from the node's vm.event of a
        domain powered off behind the platform's back (`cirrus-node
        simulate-change`) until the service shows WARNING, until its VM shows
        POWEROFF, and from the vm.event of the domain running again until RUNNING."""
        from services.drivers.worker import send_control
        template_id = self.template("blog-warning", [role("db"), role("web", ["db"])])
        service_id, _ = self.instantiate_running(template_id)
        vm_id = nodes_of(self.client.get_flow(service_id), "web")[0]["vm_id"]
        host = self.client.get_vm(vm_id)["host"]

        def change(state):
            """The domain changed on its node; when the node's vm.event says it did."""
            seen = self.node_events.count(vm_id, state)
            answer = send_control(self.cluster.amqp_uri, host,
                                  {"what": "change", "vm_id": vm_id, "state": state})
            if not answer["ok"]:
                raise SystemExit(f"simulate-change on {host}: {answer['error']}")
            return self.node_events.made_at(vm_id, state, seen + 1)
        warn, poweroff, recovered = [], [], []
        for _ in range(tries):
            began = change("POWEROFF")
            warn.append(self.timeline.state(service_id, began, "WARNING") - began)
            poweroff.append(self.timeline.vm(began, [vm_id], "POWEROFF") - began)
            began = change("RUNNING")
            recovered.append(self.timeline.state(service_id, began, "RUNNING") - began)
        self.delete_done(service_id)
        return warn, poweroff, recovered

    def big(self, name, roles, deployment, tries):
        """(instantiate -> RUNNING, delete -> DONE) seconds of each try."""
        template_id = self.template(name, roles, deployment=deployment)
        running, done = [], []
        for _ in range(tries):
            service_id, took = self.instantiate_running(template_id, direct=True)
            running.append(took)
            done.append(self.delete_done(service_id))
        return running, done


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=10,
                        help="tries of deploy, scale and warning (default 10)")
    parser.add_argument("--chain", type=int, default=20,
                        help="roles of the straight chain (default 20)")
    parser.add_argument("--vms", type=int, default=500, help="VMs of the big service (500)")
    parser.add_argument("--big-tries", type=int, default=1,
                        help="tries of the chain and the big service (default 1)")
    args = parser.parse_args()
    for name in ("tries", "chain", "vms", "big_tries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")

    # SIGTERM ends the run as Ctrl-C does, so the cluster goes with it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    with FlowBenchCluster() as bench_cluster:
        rpc_floor = floors.nameko_rpc_round_trip(bench_cluster.amqp_uri, 200)
        bench = Bench(bench_cluster)
        bench.plain_vm(2)           # warm-up: the first VMs find cold caches everywhere
        bench.deploy(1)
        vm_floor = bench.plain_vm(args.tries)
        deploy = bench.deploy(args.tries)
        deploy_direct = bench.deploy(args.tries, direct=True)
        up, down = bench.scale(args.tries)
        warn, poweroff, recovered = bench.warning(args.tries)
        chain_roles = [role(f"r{i:02d}", [f"r{i - 1:02d}"] if i else []) for i in range(args.chain)]
        chain, chain_done = bench.big("blog-chain", chain_roles, "straight", args.big_tries)
        many, many_done = bench.big("blog-many", [role("many", cardinality=args.vms)], "none",
                                    args.big_tries)
        burst_floor, burst_done_floor = bench.plain_burst(args.vms)

    ms = lambda s: round(s * 1000, 2)  # noqa: E731
    p50 = lambda xs: ms(statistics.median(xs))  # noqa: E731
    vm_p50 = statistics.median(vm_floor)
    figures = {
        "deploy_p50_ms": p50(deploy), "deploy_p90_ms": ms(percentile(deploy, 90)),
        "deploy_flow_rpc_p50_ms": p50(deploy_direct),
        "deploy_flow_rpc_p90_ms": ms(percentile(deploy_direct, 90)),
        "scale_up_p50_ms": p50(up), "scale_up_p90_ms": ms(percentile(up, 90)),
        "scale_down_p50_ms": p50(down),
        "warning_p50_ms": p50(warn), "warning_p90_ms": ms(percentile(warn, 90)),
        "recovered_p50_ms": p50(recovered),
        f"chain{args.chain}_running_p50_ms": p50(chain),
        f"chain{args.chain}_done_p50_ms": p50(chain_done),
        f"vms{args.vms}_running_p50_ms": p50(many),
        f"vms{args.vms}_done_p50_ms": p50(many_done),
        "floor_nameko_rpc_ms": ms(rpc_floor),
        "floor_vm_allocate_running_p50_ms": ms(vm_p50),
        "floor_vm_poweroff_seen_p50_ms": p50(poweroff),
        f"floor_{args.vms}_vms_allocate_running_ms": ms(burst_floor),
        f"floor_{args.vms}_vms_terminate_done_ms": ms(burst_done_floor),
    }
    print(f"deploy, 2-role straight, instantiate -> RUNNING ({args.tries} tries): "
          f"p50 {figures['deploy_p50_ms']} ms, p90 {figures['deploy_p90_ms']} ms "
          f"(goal < {GOAL_MS['deploy']} ms; OpenNebula 5.12: {OPENNEBULA_MS['deploy']} ms); "
          f"floor: 2 plain VMs one after the other {ms(2 * vm_p50)} ms; instantiated through "
          f"flow's RPC, past the request manager: p50 {figures['deploy_flow_rpc_p50_ms']} ms, "
          f"p90 {figures['deploy_flow_rpc_p90_ms']} ms")
    print(f"scale 1 -> 2, until RUNNING with 2 VMs (cooldown 0): p50 {figures['scale_up_p50_ms']}"
          f" ms, p90 {figures['scale_up_p90_ms']} ms (goal < {GOAL_MS['scale']} ms; OpenNebula "
          f"5.12: {OPENNEBULA_MS['scale']} ms); floor: 1 plain VM {ms(vm_p50)} ms; "
          f"2 -> 1: p50 {figures['scale_down_p50_ms']} ms")
    print(f"warning after a power-off behind its back (from the node's vm.event): p50 "
          f"{figures['warning_p50_ms']} ms, "
          f"p90 {figures['warning_p90_ms']} ms (goal < {GOAL_MS['warning']} ms; OpenNebula 5.12: "
          f"{OPENNEBULA_MS['warning']} ms); floor: the VM's POWEROFF on Watch "
          f"{figures['floor_vm_poweroff_seen_p50_ms']} ms; RUNNING again after "
          f"{figures['recovered_p50_ms']} ms")
    print(f"straight chain of {args.chain} roles: RUNNING after p50 "
          f"{figures[f'chain{args.chain}_running_p50_ms']} ms (floor: {args.chain} plain VMs "
          f"one after the other {ms(args.chain * vm_p50)} ms), DONE after "
          f"{figures[f'chain{args.chain}_done_p50_ms']} ms")
    print(f"service of {args.vms} VMs: RUNNING after p50 {figures[f'vms{args.vms}_running_p50_ms']}"
          f" ms (floor: {args.vms} plain VMs through lifecycle.allocate "
          f"{figures[f'floor_{args.vms}_vms_allocate_running_ms']} ms), DONE after "
          f"{figures[f'vms{args.vms}_done_p50_ms']} ms (floor: their terminate -> DONE "
          f"{figures[f'floor_{args.vms}_vms_terminate_done_ms']} ms)")
    print(f"floor: bare Nameko RPC round trip {figures['floor_nameko_rpc_ms']} ms; plain VM "
          f"lifecycle.allocate -> RUNNING p50 {figures['floor_vm_allocate_running_p50_ms']} ms")
    print(json.dumps({"bench": "flow_blog", "tries": args.tries, "big_tries": args.big_tries,
                      "hosts": HOSTS, "opennebula_5_12_ms": OPENNEBULA_MS, "goal_ms": GOAL_MS,
                      **figures}))


if __name__ == "__main__":
    main()
