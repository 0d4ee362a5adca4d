"""What the scheduler's process tests share: a database where only the
module's own hosts and VMs can be scheduled, and an environment where only
events place VMs."""
from sqlalchemy import update

from cirrus import db
from cirrus.db.models import Host, VirtualMachine
from tests.broker import rpc_proxy
from tests.procs import Proc, start_services, wait_until


def quiet_database():
    """Hosts other tests left MONITORED have no node behind them, VMs they
    left PENDING would be placed before this module's, and VMs they flagged
    resched would move to its hosts."""
    with db.session_factory()() as s, s.begin():
        s.execute(update(Host).values(state="DISABLED"))
        s.execute(update(VirtualMachine).where(VirtualMachine.state.in_(["PENDING", "HOLD"]))
                  .values(state="DONE"))
        s.execute(update(VirtualMachine).values(resched=False))


def scheduler_env(cirrus_env, **more):
    """The fake nodes report once: host failure detection is kept out of the
    way; and no sweep, so that every placement comes from an event."""
    return {**cirrus_env, "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "600",
            "CIRRUS_SCHEDULER_SWEEP_INTERVAL": "600", **more}


def running(cirrus_env, log_dir, names=("lifecycle", "scheduler"), **more):
    """For a module fixture (``yield from``): a quiet database, then ``names``
    started with ``scheduler_env``; stopped when the module is done."""
    quiet_database()
    procs = start_services(list(names), scheduler_env(cirrus_env, **more), log_dir)
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def simulated_node(env, log_dir, amqp_uri, host):
    """A ``cirrus-node --backend simulated`` serving ``host``, which lifecycle
    creates and sees MONITORED; the caller stops the returned process."""
    node = Proc(["cirrus-node", "--host", host, "--backend", "simulated"], env,
                log_dir / "node.log").start()
    try:
        with rpc_proxy(amqp_uri, "lifecycle") as lifecycle:
            made = lifecycle.create_host(host)
            wait_until(lambda: lifecycle.get_host(made["id"])["state"] == "MONITORED",
                       what=f"{host} MONITORED")
    except BaseException:
        node.stop()
        raise
    return node
