"""What crosses the broker: exchanges, queues, and the shape of commands and events.

- Events are Nameko events, so Nameko ``event_handler``s receive them: VM state
  changes come from ``lifecycle`` (event types ``vm.state`` and ``host.state``, and
  ``vm.updated`` for a VM's user template; a ``vm.state`` event's routing key
  says what changed, see ``vm_state_key``, and a message may carry several
  such changes, see ``events_in``), driver results, host monitoring and hypervisor
  events from ``node`` (``command.results``, ``host.monitor``, ``vm.event``), OneFlow
  services' changes from ``flow`` (``flow.service``).
- Driver commands go to one durable queue per host, ``cirrus.node.<host>``,
  through the direct exchange ``cirrus.commands``; a message carries the
  commands one transaction sent that host (``commands_in``).
"""
import functools
import uuid

import amqp.exceptions
import kombu.exceptions
from kombu import Exchange, Queue
from nameko.standalone.events import get_event_exchange

LIFECYCLE = "lifecycle"
NODE = "node"
VM_STATE = "vm.state"
VM_UPDATED = "vm.updated"   # a VM's user template changed (READY=YES...)
HOST_STATE = "host.state"
COMMAND_RESULT = "command.result"     # one driver result (nodes before command.results)
COMMAND_RESULTS = "command.results"   # {"results": [...]}: a node's results ready together
HOST_MONITOR = "host.monitor"
VM_EVENT = "vm.event"       # a domain changed state on its own (libvirt lifecycle event)
FLOW = "flow"               # the OneFlow service (services/flow)
FLOW_SERVICE = "flow.service"   # a service's or a role's state or cardinality changed

# what a lost or refused broker connection raises through kombu and amqp
BROKER_ERRORS = (OSError, kombu.exceptions.OperationalError, amqp.exceptions.ConnectionError)

COMMANDS = Exchange("cirrus.commands", type="direct", durable=True, delivery_mode=2)

# what a driver worker accepts: virtualization actions, then transfer actions
DRIVER_ACTIONS = ("deploy", "shutdown", "cancel", "poll", "save", "restore", "reboot", "reset",
                  "migrate", "clone", "mv", "delete")


@functools.cache    # one per source: every outbox event row asks for its name
def event_exchange(source):
    """The exchange Nameko's event_handler binds to for events of ``source``."""
    return get_event_exchange(source, {})


def node_queue(host):
    return Queue(f"cirrus.node.{host}", COMMANDS, routing_key=host, durable=True,
                 auto_delete=False)


def vm_state_key(status, freed=False, resched=False, in_flow=False):
    """The routing key of a ``vm.state`` event:
    ``vm.state.<STATUS>.<freed|kept>.<resched|stays>.<flow|alone>`` (freed: the
    VM gave a host's capacity back; resched: it asks to move; flow: it is a
    OneFlow role's VM). Each consumer binds to the changes it acts on, below,
    instead of hearing every step of every VM."""
    return ".".join((VM_STATE, status, "freed" if freed else "kept",
                     "resched" if resched else "stays", "flow" if in_flow else "alone"))


# binding patterns over vm_state_key (topic: * is one word, # any number)
VM_STATE_ANY = (f"{VM_STATE}.#",)
VM_STATE_TO_PLACE = (f"{VM_STATE}.PENDING.#", f"{VM_STATE}.*.freed.#",
                     f"{VM_STATE}.RUNNING.*.resched.*")     # the scheduler's
VM_STATE_DONE = (f"{VM_STATE}.DONE.#",)
VM_STATE_IN_FLOW = (f"{VM_STATE}.*.*.*.flow",)


def vm_event_key(state, lcm_state, vm_id):
    """OpenNebula's key for a VM state change: VM/<STATE>/<LCM_STATE>/<ID>."""
    return f"VM/{state}/{lcm_state}/{vm_id}"


def command(action, vm_id, host, request_id=None, **args):
    """A driver command. ``id`` makes redelivery harmless: the worker may run
    a command twice, and lifecycle takes only the first result for an id.
    ``request_id``: the request it serves, which the node logs and echoes."""
    assert action in DRIVER_ACTIONS, action
    return {"id": str(uuid.uuid4()), "action": action, "vm_id": vm_id, "host": host,
            "request_id": request_id, "args": args}


def commands_in(body):
    """The driver commands of a message in a node's queue: lifecycle sends
    ``{"commands": [...]}``, the commands one transaction made for that host
    (a batch of placements puts a dozen VMs on a host: one persistent message
    instead of a dozen); a message without that list is one command (what
    earlier lifecycles sent)."""
    if isinstance(body, dict) and isinstance(body.get("commands"), list):
        return body["commands"]
    return [body]


def events_in(body):
    """The VM state changes of a ``vm.state`` message: lifecycle sends
    ``{"events": [...]}`` for the changes one transaction made under one
    routing key (a batch of placements: one message instead of 500), each
    with the ``request_id`` it serves; any other body is one change."""
    if isinstance(body, dict) and isinstance(body.get("events"), list):
        return body["events"]
    return [body]


class SharedDelivery:
    """A message carrying several commands or events, each handled on its
    own: acked once every one is, or put back once if one asks for that. If
    the consumer dies before, the whole message comes back and the parts
    already handled run again, harmlessly (command ids and VM ``seq`` make
    them idempotent). Stands in for the message where an ack is due."""

    def __init__(self, message, parts):
        self.message, self.unsettled, self.requeued = message, parts, False

    @property
    def channel(self):
        return self.message.channel

    def ack(self):
        self.unsettled -= 1
        if self.unsettled == 0 and not self.requeued:
            self.message.ack()

    def requeue(self):
        if not self.requeued:
            self.requeued = True
            self.message.requeue()


def result(cmd, success, info=None, error=None):
    """A driver's answer to ``cmd``: SUCCESS with info, or FAILURE with a message."""
    return {"command_id": cmd["id"], "action": cmd["action"], "vm_id": cmd["vm_id"],
            "host": cmd["host"], "request_id": cmd.get("request_id"),
            "success": bool(success), "info": info or {}, "error": error}
