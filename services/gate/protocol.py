"""OneGate's wire formats, as plain functions: what guests send (``KEY =
VALUE`` lines, names to erase, the JSON of a scale or an action) and what
they get back (OpenNebula's VM and service documents). Nothing here touches
the network or the database, so every rule is unit-tested on its own.

A body that cannot be read raises ``BadRequest`` naming the line or the
field that is wrong.
"""
import ast
import json
import re

from cirrus import template
from services.flow.states import ALL_STATES as FLOW_STATES


class GateError(Exception):
    """An answer other than 2xx: the HTTP status and a message for the guest."""
    status = 500

    def __init__(self, message, headers=None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(GateError):
    status = 400


class Unauthorized(GateError):
    status = 401


class Forbidden(GateError):
    status = 403


class NotFound(GateError):
    status = 404


class Conflict(GateError):
    status = 409


class TooLarge(GateError):
    status = 413


class TooManyRequests(GateError):
    status = 429


class Unavailable(GateError):
    status = 503


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# OpenNebula's numbers for VM states and LCM states (its VirtualMachine.h):
# guests and the onegate client read STATE and LCM_STATE as these.
VM_STATE_NUMBERS = {"INIT": 0, "PENDING": 1, "HOLD": 2, "ACTIVE": 3, "STOPPED": 4,
                    "SUSPENDED": 5, "DONE": 6, "POWEROFF": 8, "UNDEPLOYED": 9, "CLONING": 10,
                    "CLONING_FAILURE": 11}
LCM_STATE_NUMBERS = {
    "LCM_INIT": 0, "PROLOG": 1, "BOOT": 2, "RUNNING": 3, "MIGRATE": 4, "SAVE_STOP": 5,
    "SAVE_SUSPEND": 6, "SAVE_MIGRATE": 7, "PROLOG_MIGRATE": 8, "PROLOG_RESUME": 9,
    "EPILOG_STOP": 10, "EPILOG": 11, "SHUTDOWN": 12, "CLEANUP_RESUBMIT": 15, "UNKNOWN": 16,
    "SHUTDOWN_POWEROFF": 18, "BOOT_UNKNOWN": 19, "BOOT_POWEROFF": 20, "BOOT_SUSPENDED": 21,
    "BOOT_STOPPED": 22, "CLEANUP_DELETE": 23, "SHUTDOWN_UNDEPLOY": 29, "EPILOG_UNDEPLOY": 30,
    "PROLOG_UNDEPLOY": 31, "BOOT_UNDEPLOY": 32, "BOOT_MIGRATE": 35, "BOOT_FAILURE": 36,
    "BOOT_MIGRATE_FAILURE": 37, "PROLOG_MIGRATE_FAILURE": 38, "PROLOG_FAILURE": 39,
    "EPILOG_FAILURE": 40, "EPILOG_STOP_FAILURE": 41, "EPILOG_UNDEPLOY_FAILURE": 42,
    "BOOT_UNDEPLOY_FAILURE": 47, "BOOT_STOPPED_FAILURE": 48, "PROLOG_RESUME_FAILURE": 49,
    "PROLOG_UNDEPLOY_FAILURE": 50}
# OneFlow's numbers: a service's are its states in order; a role has no
# *_NETS states, so its HOLD is 11
SERVICE_STATE_NUMBERS = {name: number for number, name in enumerate(FLOW_STATES)}
ROLE_STATE_NUMBERS = {name: number for number, name in enumerate(
    s for s in FLOW_STATES if not s.endswith("_NETS"))}

# what a guest may ask of a VM; "-hard" forms are the action with hard=True
VM_ACTIONS = ("resume", "stop", "suspend", "terminate", "reboot", "poweroff", "resched",
              "unresched", "hold", "release", "undeploy")
HARD_ACTIONS = ("terminate", "reboot", "poweroff", "undeploy")


# ---------------------------------------------------------------- bodies in

def text_of(body):
    """The body as text; BadRequest if it is not UTF-8."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body: not UTF-8 text (byte {exc.start} is {body[exc.start]:#04x})") \
            from None


def parse_attributes(body):
    """``KEY = VALUE`` lines, read by Cirrus's template parser (OpenNebula's
    syntax: bare or double-quoted values, ``#`` comments) -> {KEY: value},
    keys upper-cased. Only single text values: a guest sets attributes, not
    vectors."""
    try:
        attrs = template.parse(text_of(body), max_bytes=len(body) + 1)
    except template.TemplateError as exc:
        raise BadRequest(f"body: {exc}") from None
    if not attrs:
        raise BadRequest("body: no KEY = VALUE line to set")
    for key, value in attrs.items():
        if not NAME.match(key):
            raise BadRequest(f"body: {key[:60]!r} is not an attribute name (letters, digits "
                             "and _, not starting with a digit)")
        if isinstance(value, dict):
            raise BadRequest(f"body {key}: vector values ([...]) cannot be set through OneGate")
        if isinstance(value, list):
            raise BadRequest(f"body {key}: given more than once")
        if "\x00" in value:
            raise BadRequest(f"body {key}: the value holds a NUL character")
    return attrs


def parse_names(body):
    """The attribute names to erase (``?type=2``): one or more, separated by
    white space or new lines -> [KEY...], upper-cased."""
    names = text_of(body).split()
    if not names:
        raise BadRequest("body: name the attribute to erase (PUT /vm?type=2 with body KEY)")
    for name in names:
        if not NAME.match(name):
            raise BadRequest(f"body: {name[:60]!r} is not an attribute name (letters, digits "
                             "and _, not starting with a digit)")
    return [name.upper() for name in names]


def update_type(raw):
    """``?type=``: absent or 1 merges the attributes in, 2 erases them."""
    if raw in (None, "", "1"):
        return "merge"
    if raw == "2":
        return "erase"
    raise BadRequest(f"type: must be 1 (merge the attributes) or 2 (erase them), got {raw[:20]!r}")


def parse_json_object(body):
    """A JSON object, or the Ruby-ish single-quoted form of OpenNebula's own
    examples ({'cardinality' : 10}), read as a Python literal (never run)."""
    text = text_of(body).strip()
    if not text:
        raise BadRequest("body: empty; expected a JSON object")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise BadRequest("body: not a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(value).__name__}")
    return value


def parse_cardinality(body):
    """``{"cardinality": N}`` -> N (a whole number >= 0)."""
    value = parse_json_object(body)
    if "cardinality" not in value:
        raise BadRequest("body: cardinality is missing (expected {\"cardinality\": N})")
    unknown = sorted(set(value) - {"cardinality"})
    if unknown:
        raise BadRequest(f"body: unknown field(s) {', '.join(map(str, unknown))[:100]}; "
                         "only cardinality can be given")
    cardinality = value["cardinality"]
    if isinstance(cardinality, str) and template.is_digits(cardinality):
        cardinality = int(cardinality)
    if not isinstance(cardinality, int) or isinstance(cardinality, bool) or cardinality < 0:
        raise BadRequest(f"cardinality: must be a whole number >= 0, got {cardinality!r:.40}")
    return cardinality


def parse_action(body):
    """``{"action": {"perform": NAME}}`` -> (action, options) for lifecycle:
    ``terminate-hard`` is terminate with hard=True."""
    value = parse_json_object(body)
    action = value.get("action")
    if not isinstance(action, dict) or "perform" not in action:
        raise BadRequest("body: expected {\"action\": {\"perform\": NAME}}")
    perform = action["perform"]
    if not isinstance(perform, str):
        raise BadRequest(f"action perform: must be a name, got {perform!r:.40}")
    name, hard = perform.lower(), False
    if name.endswith("-hard") and name[:-5] in HARD_ACTIONS:
        name, hard = name[:-5], True
    if name not in VM_ACTIONS:
        raise BadRequest(f"action perform: unknown action {perform[:40]!r}; one of "
                         f"{', '.join(VM_ACTIONS)} (and -hard forms of "
                         f"{', '.join(HARD_ACTIONS)})")
    return perform.lower(), name, {"hard": True} if hard else {}


def parse_vm_id(raw, where):
    if not template.is_digits(raw) or len(raw) > 12:
        raise BadRequest(f"{where}: {raw[:20]!r} is not a VM id")
    return int(raw)


# ---------------------------------------------------------------- documents out

def vm_document(vm):
    """OpenNebula's ``{"VM": ...}`` of one VM row (a mapping with id, name,
    state, lcm_state, template, nics): what GET /vm and GET /vms/:id answer.
    SERVICE_ID and ROLE_NAME appear in USER_TEMPLATE, where OneFlow puts them."""
    template = vm["template"] or {}
    user = dict(template.get("USER_TEMPLATE") or {})
    for key in ("SERVICE_ID", "ROLE_NAME"):
        if template.get(key) is not None:
            user.setdefault(key, str(template[key]))
    nics = [{"NIC_ID": str(nic.get("id")), "IP": nic.get("ip") or "", "IP6": nic.get("ip6") or "",
             "MAC": nic.get("mac") or "", "NETWORK": nic.get("network") or "",
             "NETWORK_ID": str(nic.get("network_id", ""))} for nic in vm["nics"] or ()]
    return {"VM": {"NAME": vm["name"], "ID": str(vm["id"]),
                   "STATE": str(VM_STATE_NUMBERS.get(vm["state"], -1)),
                   "LCM_STATE": str(LCM_STATE_NUMBERS.get(vm["lcm_state"], -1)),
                   "USER_TEMPLATE": user, "TEMPLATE": {"NIC": nics}}}


def service_document(service, roles, nodes, vms=None):
    """OneFlow's ``{"SERVICE": ...}``: each role's nodes with their VM, in
    short form ({"VM": {ID, NAME}}) or, given ``vms`` (?extended), as
    GET /vm shows them."""
    out_roles = []
    for role in roles:
        out_nodes = []
        for node in nodes.get(role["id"], ()):
            if vms is not None and node["vm_id"] in vms:
                info = vm_document(vms[node["vm_id"]])
            else:
                info = {"VM": {"ID": str(node["vm_id"]), "NAME": node["name"]}}
            out_nodes.append({"deploy_id": node["vm_id"], "running": node["status"] == "RUNNING",
                              "vm_info": info})
        out_roles.append({"name": role["name"], "cardinality": role["cardinality"],
                          "state": ROLE_STATE_NUMBERS.get(role["state"], -1),
                          "nodes": out_nodes})
    return {"SERVICE": {"name": service["name"], "id": str(service["id"]),
                        "state": SERVICE_STATE_NUMBERS.get(service["state"], -1),
                        "roles": out_roles}}


def links(base):
    """GET /: where the rest is."""
    return {"vm_info": f"{base}/vm", "service_info": f"{base}/service"}
