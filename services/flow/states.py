"""OneFlow service and role states, and the moves between them, as data.

A service and each of its roles have one state word (REFERENCE.md section 3).
ROLE_TRANSITIONS and SERVICE_TRANSITIONS are the only places that say which
action moves a role or a service from where to where; the flow engine
(services/flow/engine.py) names an action and ``next_state`` answers, or
refuses with FlowTransitionError naming the current state and the states the
action needs. ``service_action`` says which move the roles' states call for.
"""
from dataclasses import dataclass
from enum import Enum


class FlowState(str, Enum):
    PENDING = "PENDING"                  # made, nothing deployed yet
    DEPLOYING = "DEPLOYING"              # VMs are being created and booted
    RUNNING = "RUNNING"                  # every VM runs (and is READY under the gate)
    UNDEPLOYING = "UNDEPLOYING"          # VMs are being shut down, children before parents
    WARNING = "WARNING"                  # a VM is POWEROFF, UNKNOWN or failed; it may recover
    DONE = "DONE"                        # every VM is gone; kept for history
    FAILED_UNDEPLOYING = "FAILED_UNDEPLOYING"  # a VM did not shut down; recover retries it
    FAILED_DEPLOYING = "FAILED_DEPLOYING"  # a VM failed to deploy; recover retries only it
    SCALING = "SCALING"                  # a role is moving to its new cardinality
    FAILED_SCALING = "FAILED_SCALING"    # a VM of a scale failed; recover retries only it
    COOLDOWN = "COOLDOWN"                # after a scale: policies wait ``cooldown`` seconds
    # OpenNebula's states for networks a service makes from templates at deploy;
    # Cirrus services use existing networks (by id), so they are never entered
    DEPLOYING_NETS = "DEPLOYING_NETS"
    UNDEPLOYING_NETS = "UNDEPLOYING_NETS"
    FAILED_DEPLOYING_NETS = "FAILED_DEPLOYING_NETS"
    FAILED_UNDEPLOYING_NETS = "FAILED_UNDEPLOYING_NETS"
    HOLD = "HOLD"                        # deployed on hold (on_hold); waits for release


ALL_STATES = [s.value for s in FlowState]

# a role or service here waits on VMs, under the step time limit
TRANSIENT = frozenset({"DEPLOYING", "SCALING", "UNDEPLOYING"})
# a service here is left alone until someone acts (recover, undeploy, release)
FAILED = frozenset({"FAILED_DEPLOYING", "FAILED_SCALING", "FAILED_UNDEPLOYING"})
# deployed and serving: VM changes there mean WARNING, policies may scale
SERVING = frozenset({"RUNNING", "WARNING", "COOLDOWN"})
# an undeploy (flow delete) may start anywhere but where it is under way or over
UNDEPLOYABLE = " ".join(s for s in ALL_STATES if s not in ("UNDEPLOYING", "DONE")
                        and not s.endswith("_NETS"))


@dataclass(frozen=True)
class Transition:
    action: str
    sources: frozenset
    target: str


def _t(action, sources, target):
    return Transition(action, frozenset(sources.split()), target)


# A role's moves. Deploy-time: PENDING -> DEPLOYING (or HOLD) -> RUNNING;
# then WARNING and back, SCALING -> COOLDOWN -> RUNNING; UNDEPLOYING -> DONE.
ROLE_TRANSITIONS = [
    _t("deploy", "PENDING", "DEPLOYING"),
    _t("hold", "PENDING", "HOLD"),
    _t("release", "HOLD", "DEPLOYING"),
    _t("deployed", "DEPLOYING", "RUNNING"),
    _t("deploy_failure", "DEPLOYING", "FAILED_DEPLOYING"),
    _t("warning", "RUNNING COOLDOWN", "WARNING"),
    _t("recovered", "WARNING", "RUNNING"),
    # a manual scale may cut a cooldown short; policies wait for it to end
    _t("scale", "RUNNING WARNING COOLDOWN", "SCALING"),
    _t("scaled", "SCALING", "COOLDOWN"),
    _t("scale_failure", "SCALING", "FAILED_SCALING"),
    _t("cooled", "COOLDOWN", "RUNNING"),
    _t("recover", "FAILED_DEPLOYING", "DEPLOYING"),
    _t("recover", "FAILED_SCALING", "SCALING"),
    _t("recover", "FAILED_UNDEPLOYING", "UNDEPLOYING"),
    _t("undeploy", UNDEPLOYABLE, "UNDEPLOYING"),
    _t("undeployed", "UNDEPLOYING", "DONE"),
    _t("undeploy_failure", "UNDEPLOYING", "FAILED_UNDEPLOYING"),
]

# A service's moves: the same actions, taken when its roles call for them.
SERVICE_TRANSITIONS = [
    _t("deploy", "PENDING", "DEPLOYING"),
    _t("hold", "PENDING DEPLOYING", "HOLD"),
    _t("release", "HOLD", "DEPLOYING"),
    _t("deployed", "DEPLOYING", "RUNNING"),
    # a role added to a deployed service deploys like the others did
    _t("add_role", "RUNNING WARNING COOLDOWN", "DEPLOYING"),
    _t("deploy_failure", "DEPLOYING HOLD", "FAILED_DEPLOYING"),
    _t("warning", "RUNNING COOLDOWN", "WARNING"),
    _t("recovered", "WARNING", "RUNNING"),
    _t("scale", "RUNNING WARNING COOLDOWN", "SCALING"),
    _t("scaled", "SCALING", "COOLDOWN"),
    _t("scale_failure", "SCALING", "FAILED_SCALING"),
    _t("cooled", "COOLDOWN", "RUNNING"),
    _t("recover", "FAILED_DEPLOYING", "DEPLOYING"),
    _t("recover", "FAILED_SCALING", "SCALING"),
    _t("recover", "FAILED_UNDEPLOYING", "UNDEPLOYING"),
    _t("undeploy", UNDEPLOYABLE, "UNDEPLOYING"),
    _t("undeployed", "UNDEPLOYING", "DONE"),
    _t("undeploy_failure", "UNDEPLOYING", "FAILED_UNDEPLOYING"),
]


def _index(rows):
    table = {}
    for tr in rows:
        for source in tr.sources:
            assert (tr.action, source) not in table, f"two transitions for {tr.action} {source}"
            assert source in ALL_STATES and tr.target in ALL_STATES, tr
            table[(tr.action, source)] = tr
    return table


_ROLE = _index(ROLE_TRANSITIONS)
_SERVICE = _index(SERVICE_TRANSITIONS)
_TABLES = {"role": _ROLE, "service": _SERVICE}


class FlowTransitionError(Exception):
    """An action the current state of a role or service does not allow."""

    def __init__(self, kind, action, current):
        self.kind, self.action, self.current = kind, action, current
        self.allowed = allowed_sources(kind, action)
        super().__init__(f"cannot {action.replace('_', ' ')} a {kind} in {current}; "
                         f"it must be in one of: {', '.join(self.allowed)}")


def allowed_sources(kind, action):
    return sorted(src for (act, src) in _TABLES[kind] if act == action)


def allows(kind, current, action):
    return (action, current) in _TABLES[kind]


def next_state(kind, current, action):
    """Where ``action`` takes a ``kind`` ("role" or "service") from ``current``."""
    try:
        return _TABLES[kind][(action, current)].target
    except KeyError:
        raise FlowTransitionError(kind, action, current) from None


# while deployed, the service shows the most pressing of its roles' states
_SERVING_ORDER = [("FAILED_SCALING", "scale_failure"), ("SCALING", "scale"),
                  ("COOLDOWN", "scaled"), ("WARNING", "warning")]


def service_action(service_state, role_states):
    """The action the roles' states call for on a service in ``service_state``
    (None: it stays). Deploying, a failed role fails the service, roles all
    on hold hold it, roles all deployed make it RUNNING; deployed, the service
    follows the most pressing role: FAILED_SCALING, SCALING, COOLDOWN,
    WARNING, else RUNNING. Undeploying, it is DONE when every role is."""
    states = set(role_states)
    if service_state in ("PENDING", "DEPLOYING", "HOLD"):
        if "FAILED_DEPLOYING" in states:
            return "deploy_failure"
        if states <= SERVING:
            return "deployed" if service_state == "DEPLOYING" else "release"
        if "HOLD" in states and "DEPLOYING" not in states:
            return "hold" if service_state != "HOLD" else None
        if service_state == "HOLD":
            return "release"
        return "deploy" if service_state == "PENDING" else None
    if service_state == "UNDEPLOYING":
        if "FAILED_UNDEPLOYING" in states:
            return "undeploy_failure"
        return "undeployed" if states <= {"DONE"} else None
    if service_state in SERVING | {"SCALING"}:
        for role_state, action in _SERVING_ORDER:
            if role_state in states:
                return action
        return {"WARNING": "recovered", "COOLDOWN": "cooled", "SCALING": "scaled"}.get(
            service_state)
    return None
