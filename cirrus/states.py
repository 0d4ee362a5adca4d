"""VM states and the transitions between them, as data.

A VM has OpenNebula's two-level state: ``state`` (VmState) and, while the VM is
ACTIVE, ``lcm_state`` (LcmState); otherwise the LCM state is LCM_INIT. The table
below names each VM *status* by one word: the LCM state while ACTIVE, the state
otherwise (PENDING, RUNNING, EPILOG_FAILURE, DONE...). ``split`` and ``status``
convert between the two forms.

TRANSITIONS is the only place that says which action moves a VM from where to
where, and which driver command entering the new status sends. Driver results
become actions named ``<status>_success`` / ``<status>_failure`` after the
status the VM was in when the command was sent (``prolog_success``...).
"""
from dataclasses import dataclass
from enum import Enum


class VmState(str, Enum):
    INIT = "INIT"                    # being written; never seen outside a transaction
    PENDING = "PENDING"              # waiting for the scheduler to pick a host
    HOLD = "HOLD"                    # created on hold; the scheduler ignores it until released
    ACTIVE = "ACTIVE"                # on a host; lcm_state says what is happening there
    STOPPED = "STOPPED"              # saved and its disks moved back to the datastore
    SUSPENDED = "SUSPENDED"          # paused with its memory saved, on its host
    DONE = "DONE"                    # terminated; kept for history and accounting
    POWEROFF = "POWEROFF"            # powered off, its disks still on the host
    UNDEPLOYED = "UNDEPLOYED"        # powered off and its disks moved back to the datastore
    CLONING = "CLONING"              # waiting for its images to be copied
    CLONING_FAILURE = "CLONING_FAILURE"  # an image copy failed


class LcmState(str, Enum):
    LCM_INIT = "LCM_INIT"            # not ACTIVE
    PROLOG = "PROLOG"                # transferring disks and context to the host
    BOOT = "BOOT"                    # the driver is creating the domain
    RUNNING = "RUNNING"              # the domain runs
    SHUTDOWN = "SHUTDOWN"            # the driver is stopping the domain for terminate
    EPILOG = "EPILOG"                # removing the VM's files from the host
    UNKNOWN = "UNKNOWN"              # the host stopped reporting; the domain may still run
    PROLOG_FAILURE = "PROLOG_FAILURE"  # the transfer failed
    BOOT_FAILURE = "BOOT_FAILURE"    # the driver could not create the domain
    EPILOG_FAILURE = "EPILOG_FAILURE"  # cleaning up the host failed


SHORT_NAMES = {
    "INIT": "init", "PENDING": "pend", "HOLD": "hold", "STOPPED": "stop",
    "SUSPENDED": "susp", "DONE": "done", "POWEROFF": "poff", "UNDEPLOYED": "unde",
    "CLONING": "clon", "CLONING_FAILURE": "fail",
    "PROLOG": "prol", "BOOT": "boot", "RUNNING": "runn", "SHUTDOWN": "shut",
    "EPILOG": "epil", "UNKNOWN": "unkn",
    "PROLOG_FAILURE": "fail", "BOOT_FAILURE": "fail", "EPILOG_FAILURE": "fail",
}


def status(state, lcm_state):
    """One word for a (state, lcm_state) pair: the LCM state while ACTIVE."""
    state = VmState(state)
    return LcmState(lcm_state).value if state is VmState.ACTIVE else state.value


def split(name):
    """The (state, lcm_state) pair behind a status word."""
    if name in VmState.__members__ and name != "ACTIVE":
        return VmState(name), LcmState.LCM_INIT
    if name in LcmState.__members__ and name != "LCM_INIT":
        return VmState.ACTIVE, LcmState(name)
    raise ValueError(f"unknown VM status {name!r}")


ALL_STATUSES = [s.value for s in VmState if s is not VmState.ACTIVE] + [
    s.value for s in LcmState if s is not LcmState.LCM_INIT
]


@dataclass(frozen=True)
class Transition:
    action: str
    sources: frozenset
    target: str
    command: str = None      # driver command sent on entering ``target``


def _t(action, sources, target, command=None):
    return Transition(action, frozenset(sources.split()), target, command)


TRANSITIONS = [
    _t("allocate", "INIT", "PENDING"),
    _t("allocate_hold", "INIT", "HOLD"),
    _t("deploy", "PENDING HOLD", "PROLOG", command="clone"),
    _t("prolog_success", "PROLOG", "BOOT", command="deploy"),
    _t("prolog_failure", "PROLOG", "PROLOG_FAILURE"),
    _t("boot_success", "BOOT", "RUNNING"),
    _t("boot_failure", "BOOT", "BOOT_FAILURE"),
    _t("terminate", "INIT PENDING HOLD", "DONE"),
    _t("terminate", "RUNNING UNKNOWN", "SHUTDOWN", command="shutdown"),
    _t("terminate_hard", "INIT PENDING HOLD", "DONE"),
    _t("terminate_hard", "RUNNING UNKNOWN", "SHUTDOWN", command="cancel"),
    # a failed VM may still have a domain or files on its host: the delete
    # command removes both, so terminate cleans up whatever the failure left
    _t("terminate", "PROLOG_FAILURE BOOT_FAILURE EPILOG_FAILURE", "EPILOG", command="delete"),
    _t("terminate_hard", "PROLOG_FAILURE BOOT_FAILURE EPILOG_FAILURE", "EPILOG", command="delete"),
    _t("shutdown_success", "SHUTDOWN", "EPILOG", command="delete"),
    _t("shutdown_failure", "SHUTDOWN", "RUNNING"),
    _t("epilog_success", "EPILOG", "DONE"),
    _t("epilog_failure", "EPILOG", "EPILOG_FAILURE"),
]

_BY_ACTION = {}
for _tr in TRANSITIONS:
    for _src in _tr.sources:
        key = (_tr.action, _src)
        assert key not in _BY_ACTION, f"two transitions for {key}"
        _BY_ACTION[key] = _tr

# statuses in which the VM holds capacity on its host
ON_HOST = frozenset(
    "PROLOG BOOT RUNNING SHUTDOWN EPILOG UNKNOWN "
    "PROLOG_FAILURE BOOT_FAILURE EPILOG_FAILURE".split()
)


class TransitionError(Exception):
    """An action the VM's current status does not allow."""

    def __init__(self, action, current):
        self.action = action
        self.current = current
        self.allowed = allowed_sources(action)
        super().__init__(
            f"cannot {action.replace('_', ' ')} a VM in {current}; "
            f"it must be in one of: {', '.join(self.allowed)}"
        )


def allowed_sources(action):
    return sorted(src for (act, src) in _BY_ACTION if act == action)


def next_transition(current, action):
    """The transition ``action`` takes from status ``current``, or TransitionError."""
    try:
        return _BY_ACTION[(action, current)]
    except KeyError:
        raise TransitionError(action, current) from None


def result_action(current, success):
    """The action a driver result stands for: the status it ended, and how."""
    return f"{current.lower()}_{'success' if success else 'failure'}"
