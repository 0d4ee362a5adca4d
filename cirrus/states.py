"""VM states and the transitions between them, as data.

A VM has OpenNebula's two-level state: ``state`` (VmState) and, while the VM is
ACTIVE, ``lcm_state`` (LcmState); otherwise the LCM state is LCM_INIT. The table
below names each VM *status* by one word: the LCM state while ACTIVE, the state
otherwise (PENDING, RUNNING, EPILOG_FAILURE, DONE...). ``split`` and ``status``
convert between the two forms.

TRANSITIONS is the only place that says which action moves a VM from where to
where, and which driver command entering the new status sends (and to which
host). Driver results become actions named ``<status>_success`` /
``<status>_failure`` after the status the VM was in when the command was sent
(``prolog_success``...). ``recover`` success / failure from a ``<S>_FAILURE``
status uses the same names as the driver result of ``S``.
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
    CLONING = "CLONING"              # waiting for its images to be copied (unused yet)
    CLONING_FAILURE = "CLONING_FAILURE"  # an image copy failed (unused, as CLONING)


class LcmState(str, Enum):
    LCM_INIT = "LCM_INIT"            # not ACTIVE
    PROLOG = "PROLOG"                # transferring disks and context to the host
    BOOT = "BOOT"                    # the driver is creating the domain
    RUNNING = "RUNNING"              # the domain runs
    MIGRATE = "MIGRATE"              # live migration to the target host under way
    SAVE_STOP = "SAVE_STOP"          # saving the memory before a stop
    SAVE_SUSPEND = "SAVE_SUSPEND"    # saving the memory before a suspend
    SAVE_MIGRATE = "SAVE_MIGRATE"    # saving the memory before a cold migration
    PROLOG_MIGRATE = "PROLOG_MIGRATE"  # moving the saved VM's files to the target host
    PROLOG_RESUME = "PROLOG_RESUME"  # moving a stopped VM's files back to a host
    EPILOG_STOP = "EPILOG_STOP"      # moving a saved VM's files off its host (stop)
    EPILOG = "EPILOG"                # removing the VM's files from the host
    SHUTDOWN = "SHUTDOWN"            # the driver is stopping the domain for terminate
    SHUTDOWN_POWEROFF = "SHUTDOWN_POWEROFF"  # the driver is stopping the domain for poweroff
    SHUTDOWN_UNDEPLOY = "SHUTDOWN_UNDEPLOY"  # the driver is stopping the domain for undeploy
    EPILOG_UNDEPLOY = "EPILOG_UNDEPLOY"  # moving a powered-off VM's files off its host
    PROLOG_UNDEPLOY = "PROLOG_UNDEPLOY"  # moving an undeployed VM's files back to a host
    BOOT_UNKNOWN = "BOOT_UNKNOWN"    # booting again a VM whose host stopped reporting
    BOOT_POWEROFF = "BOOT_POWEROFF"  # booting a powered-off VM (resume)
    BOOT_SUSPENDED = "BOOT_SUSPENDED"  # restoring a suspended VM's memory (resume)
    BOOT_STOPPED = "BOOT_STOPPED"    # restoring a stopped VM's memory (resume)
    BOOT_UNDEPLOY = "BOOT_UNDEPLOY"  # booting an undeployed VM (resume)
    BOOT_MIGRATE = "BOOT_MIGRATE"    # restoring the VM on the target host of a migration
    CLEANUP_RESUBMIT = "CLEANUP_RESUBMIT"  # removing the VM from its host before recreating it
    CLEANUP_DELETE = "CLEANUP_DELETE"  # removing the VM from its host before dropping it
    UNKNOWN = "UNKNOWN"              # the host stopped reporting; the domain may still run
    PROLOG_FAILURE = "PROLOG_FAILURE"  # the transfer failed
    BOOT_FAILURE = "BOOT_FAILURE"    # the driver could not create the domain
    EPILOG_FAILURE = "EPILOG_FAILURE"  # cleaning up the host failed
    BOOT_MIGRATE_FAILURE = "BOOT_MIGRATE_FAILURE"  # the restore on the target host failed
    PROLOG_MIGRATE_FAILURE = "PROLOG_MIGRATE_FAILURE"  # moving files to the target host failed
    EPILOG_STOP_FAILURE = "EPILOG_STOP_FAILURE"  # moving a stopped VM's files off its host failed
    EPILOG_UNDEPLOY_FAILURE = "EPILOG_UNDEPLOY_FAILURE"  # same, for undeploy
    BOOT_UNDEPLOY_FAILURE = "BOOT_UNDEPLOY_FAILURE"  # booting an undeployed VM failed
    BOOT_STOPPED_FAILURE = "BOOT_STOPPED_FAILURE"  # restoring a stopped VM failed
    PROLOG_RESUME_FAILURE = "PROLOG_RESUME_FAILURE"  # moving a stopped VM's files back failed
    PROLOG_UNDEPLOY_FAILURE = "PROLOG_UNDEPLOY_FAILURE"  # moving undeployed files back failed


ALL_STATUSES = [s.value for s in VmState if s is not VmState.ACTIVE] + [
    s.value for s in LcmState if s is not LcmState.LCM_INIT
]


def _short(name):
    """OpenNebula's four-letter listing name of a status."""
    special = {"INIT": "init", "PENDING": "pend", "HOLD": "hold", "STOPPED": "stop",
               "SUSPENDED": "susp", "DONE": "done", "POWEROFF": "poff",
               "UNDEPLOYED": "unde", "CLONING": "clon", "RUNNING": "runn",
               "UNKNOWN": "unkn", "MIGRATE": "migr", "PROLOG_MIGRATE": "migr"}
    if name in special:
        return special[name]
    if name.endswith("_FAILURE"):
        return "fail"
    for prefix, short in (("SAVE", "save"), ("BOOT", "boot"), ("SHUTDOWN", "shut"),
                          ("EPILOG", "epil"), ("PROLOG", "prol"), ("CLEANUP", "clea")):
        if name.startswith(prefix):
            return short
    raise ValueError(f"no short name for {name}")


SHORT_NAMES = {name: _short(name) for name in ALL_STATUSES}


# every status word and its (state, lcm_state) pair, looked up rather than
# worked out: a batch of placements asks thousands of times
_PAIRS = {**{state.value: (state, LcmState.LCM_INIT) for state in VmState
             if state is not VmState.ACTIVE},
          **{lcm.value: (VmState.ACTIVE, lcm) for lcm in LcmState
             if lcm is not LcmState.LCM_INIT}}
_WORDS = {(state.value, lcm.value): word for word, (state, lcm) in _PAIRS.items()}


def status(state, lcm_state):
    """One word for a (state, lcm_state) pair: the LCM state while ACTIVE."""
    word = _WORDS.get((state, lcm_state if state == VmState.ACTIVE else LcmState.LCM_INIT))
    if word is None:
        raise ValueError(f"unknown VM state {state!r} / {lcm_state!r}")
    return word


def split(name):
    """The (state, lcm_state) pair behind a status word."""
    try:
        return _PAIRS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown VM status {name!r}") from None


@dataclass(frozen=True)
class Transition:
    action: str
    sources: frozenset
    target: str
    command: str = None      # driver command sent on entering ``target``
    args: tuple = ()         # fixed command arguments, as (name, value) pairs
    on_target: bool = False  # the command runs on the migration target, not the VM's host
    arrives: bool = False    # a migration ends here: the VM now lives on the target host
    reserved: bool = False   # the caller reserved capacity on the host (deploy)
    fresh: bool = False      # the VM starts over: host, runtime and deploy id are cleared


def _t(action, sources, target, command=None, **flags):
    return Transition(action, frozenset(sources.split()), target, command, **flags)


def _soft_and_hard(action, sources, target, command=None, hard_command=None, **flags):
    return [_t(action, sources, target, command, **flags),
            _t(f"{action}_hard", sources, target, hard_command or command, **flags)]


MV_IN = (("direction", "in"),)
MV_OUT = (("direction", "out"),)

# where the VM may be told to go away from: every status but DONE, split by
# whether the VM may have a domain or files on a host (then a delete runs first)
WITHOUT_HOST = "INIT PENDING HOLD CLONING CLONING_FAILURE"
ACTIVE_FAILURES = " ".join(s.value for s in LcmState if s.value.endswith("_FAILURE"))
WITH_HOST = " ".join(s for s in ALL_STATUSES
                     if s not in WITHOUT_HOST.split() and s != "DONE")

_USER = [
    _t("allocate", "INIT", "PENDING"),
    _t("allocate_hold", "INIT", "HOLD"),
    _t("hold", "PENDING", "HOLD"),
    _t("release", "HOLD", "PENDING"),
    # deploy takes the path that brings back what a stop or an undeploy put away
    _t("deploy", "PENDING HOLD", "PROLOG", command="clone", reserved=True),
    _t("deploy_stopped", "PENDING HOLD", "PROLOG_RESUME", command="mv", args=MV_IN,
       reserved=True),
    _t("deploy_undeployed", "PENDING HOLD", "PROLOG_UNDEPLOY", command="mv", args=MV_IN,
       reserved=True),
    # ``<action>_hard`` is the same move, cancelling or resetting the domain
    # where the soft one asks the guest; where there is no domain it is the same
    *_soft_and_hard("terminate", WITHOUT_HOST, "DONE"),
    *_soft_and_hard("terminate", "RUNNING UNKNOWN", "SHUTDOWN", "shutdown", "cancel"),
    # a failed VM may still have a domain or files on its host, a stopped one has
    # files in the parking: delete removes both, wherever the VM last was
    *_soft_and_hard("terminate", f"SUSPENDED POWEROFF STOPPED UNDEPLOYED {ACTIVE_FAILURES}",
                    "EPILOG", "delete"),
    *_soft_and_hard("poweroff", "RUNNING UNKNOWN", "SHUTDOWN_POWEROFF", "shutdown", "cancel"),
    _t("suspend", "RUNNING", "SAVE_SUSPEND", command="save"),
    _t("stop", "RUNNING", "SAVE_STOP", command="save"),
    *_soft_and_hard("undeploy", "RUNNING UNKNOWN", "SHUTDOWN_UNDEPLOY", "shutdown", "cancel"),
    *_soft_and_hard("undeploy", "POWEROFF", "EPILOG_UNDEPLOY", "mv", args=MV_OUT),
    _t("resume", "STOPPED UNDEPLOYED", "PENDING"),
    _t("resume", "SUSPENDED", "BOOT_SUSPENDED", command="restore"),
    _t("resume", "POWEROFF", "BOOT_POWEROFF", command="deploy"),
    _t("resume", "UNKNOWN", "BOOT_UNKNOWN", command="deploy"),
    _t("migrate", "RUNNING", "SAVE_MIGRATE", command="save"),
    _t("migrate_live", "RUNNING", "MIGRATE", command="migrate"),
    # the VM stays RUNNING; its result only records an error
    *_soft_and_hard("reboot", "RUNNING", "RUNNING", "reboot", "reset"),
    _t("resched", "RUNNING", "RUNNING"),
    _t("unresched", "RUNNING", "RUNNING"),
    # recover delete / recreate: clean the host first unless there is none
    # (``_fenced``: the host is ERROR or OFFLINE, nothing can run there)
    _t("recover_delete", WITHOUT_HOST, "DONE"),
    _t("recover_delete", WITH_HOST, "CLEANUP_DELETE", command="delete"),
    _t("recover_delete_fenced", WITH_HOST, "DONE"),
    _t("recover_recreate", WITHOUT_HOST, "PENDING", fresh=True),
    _t("recover_recreate", WITH_HOST, "CLEANUP_RESUBMIT", command="delete"),
    _t("recover_recreate_fenced", WITH_HOST, "PENDING", fresh=True),
    # what the hypervisor reports without anyone asking
    _t("monitor_poweroff", "RUNNING UNKNOWN", "POWEROFF"),
    _t("monitor_suspend", "RUNNING UNKNOWN", "SUSPENDED"),
    _t("monitor_running", "POWEROFF SUSPENDED UNKNOWN", "RUNNING"),
    _t("monitor_unknown", "RUNNING", "UNKNOWN"),
]

# driver results: status -> (on success, on failure); None means <status>_FAILURE.
# The success side names the next status and the command entering it sends.
_RESULTS = {
    "PROLOG": (_t("", "", "BOOT", command="deploy"), None),
    "BOOT": (_t("", "", "RUNNING"), None),
    "PROLOG_RESUME": (_t("", "", "BOOT_STOPPED", command="restore"), None),
    "BOOT_STOPPED": (_t("", "", "RUNNING"), None),
    "PROLOG_UNDEPLOY": (_t("", "", "BOOT_UNDEPLOY", command="deploy"), None),
    "BOOT_UNDEPLOY": (_t("", "", "RUNNING"), None),
    "SHUTDOWN": (_t("", "", "EPILOG", command="delete"), "RUNNING"),
    "EPILOG": (_t("", "", "DONE"), None),
    "SHUTDOWN_POWEROFF": (_t("", "", "POWEROFF"), "RUNNING"),
    "SAVE_SUSPEND": (_t("", "", "SUSPENDED"), "RUNNING"),
    "SAVE_STOP": (_t("", "", "EPILOG_STOP", command="mv", args=MV_OUT), "RUNNING"),
    "EPILOG_STOP": (_t("", "", "STOPPED"), None),
    "SHUTDOWN_UNDEPLOY": (_t("", "", "EPILOG_UNDEPLOY", command="mv", args=MV_OUT), "RUNNING"),
    "EPILOG_UNDEPLOY": (_t("", "", "UNDEPLOYED"), None),
    "BOOT_SUSPENDED": (_t("", "", "RUNNING"), "SUSPENDED"),
    "BOOT_POWEROFF": (_t("", "", "RUNNING"), "POWEROFF"),
    "BOOT_UNKNOWN": (_t("", "", "RUNNING"), "UNKNOWN"),
    # cold migration: save on the host, files and memory move to the target, restore there
    "SAVE_MIGRATE": (_t("", "", "PROLOG_MIGRATE", command="mv", args=MV_IN, on_target=True),
                     "RUNNING"),
    "PROLOG_MIGRATE": (_t("", "", "BOOT_MIGRATE", command="restore", on_target=True), None),
    "BOOT_MIGRATE": (_t("", "", "RUNNING", arrives=True), None),
    # live migration: a failure leaves the VM running where it was
    "MIGRATE": (_t("", "", "BOOT_MIGRATE", command="restore", on_target=True), "RUNNING"),
    "RUNNING": (_t("", "", "RUNNING"), "RUNNING"),     # reboot / reset
    # the user asked the VM gone: a failed cleanup does not keep it
    "CLEANUP_DELETE": (_t("", "", "DONE"), "DONE"),
    "CLEANUP_RESUBMIT": (_t("", "", "PENDING", fresh=True), "PENDING"),
}


def _like(template, action, sources, target=None):
    """``template``'s move (command, flags) under another action and sources."""
    return Transition(action, frozenset(sources), target or template.target, template.command,
                      template.args, template.on_target, template.arrives, template.reserved,
                      template.fresh)


def _result_rows():
    rows = []
    for source, (success, failure) in _RESULTS.items():
        name = source.lower()
        rows.append(_like(success, f"{name}_success", [source]))
        fail_target = failure or f"{source}_FAILURE"
        # a CLEANUP_RESUBMIT failure still resubmits: same fresh start
        fresh = fail_target == "PENDING"
        rows.append(Transition(f"{name}_failure", frozenset([source]), fail_target, fresh=fresh))
        if failure is None:
            # recover success / failure from <S>_FAILURE: as if S's command answered
            rows.append(_like(success, f"{name}_success", [fail_target]))
            rows.append(Transition(f"{name}_failure", frozenset([fail_target]), fail_target))
    return rows


# statuses waiting for a driver answer, that ``recover`` may settle
TRANSIENT = frozenset(s for s in _RESULTS if s != "RUNNING")
# <S>_FAILURE -> S, the status whose command failed
FAILED_FROM = {s.value: s.value.removesuffix("_FAILURE") for s in LcmState
               if s.value.endswith("_FAILURE")}


def _retry_rows(rows):
    """recover retry: send again the command of the status (from <S>_FAILURE:
    back to S). Where two commands enter a status (shutdown / cancel), the hard
    one is ``retry_hard``."""
    entering = {}
    for tr in rows:
        if tr.command and tr.target in TRANSIENT:
            entering.setdefault(tr.target, {})[tr.command] = tr
    out = []
    for status_name, by_command in entering.items():
        sources = [status_name] + [f for f, s in FAILED_FROM.items() if s == status_name]
        if len(by_command) == 1:
            [tr] = by_command.values()
            out.append(_like(tr, "retry", sources, status_name))
        else:
            assert set(by_command) == {"shutdown", "cancel"}, by_command
            out.append(_like(by_command["shutdown"], "retry", sources, status_name))
            out.append(_like(by_command["cancel"], "retry_hard", sources, status_name))
    return out


_base = _USER + _result_rows()
TRANSITIONS = _base + _retry_rows(_base)

_BY_ACTION = {}
for _tr in TRANSITIONS:
    for _src in _tr.sources:
        key = (_tr.action, _src)
        assert key not in _BY_ACTION, f"two transitions for {key}"
        _BY_ACTION[key] = _tr

# statuses in which the VM holds capacity on its host
ON_HOST = frozenset(
    [s.value for s in LcmState if s is not LcmState.LCM_INIT] + ["SUSPENDED", "POWEROFF"])

# statuses in which a migration holds capacity on the target host too
MIGRATING = frozenset("SAVE_MIGRATE MIGRATE PROLOG_MIGRATE BOOT_MIGRATE "
                      "PROLOG_MIGRATE_FAILURE BOOT_MIGRATE_FAILURE".split())


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


def allows(current, action):
    """Whether ``action`` may be taken from status ``current``."""
    return (action, current) in _BY_ACTION


def next_transition(current, action):
    """The transition ``action`` takes from status ``current``, or TransitionError."""
    try:
        return _BY_ACTION[(action, current)]
    except KeyError:
        raise TransitionError(action, current) from None


def result_action(current, success):
    """The action a driver result stands for: the status it ended, and how."""
    return f"{current.lower()}_{'success' if success else 'failure'}"
