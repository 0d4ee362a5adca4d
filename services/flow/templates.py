"""Service templates: OneFlow's JSON, checked by a JSON Schema and then by
the rules a schema cannot say (unique role names, known parents, no cycle,
min <= cardinality <= max, expressions and cron recurrences that parse).

A template is kept as given, unknown keys included, so an OneFlow template
written for OpenNebula loads unchanged. Errors name the path of the bad
field, e.g. ``roles/1/cardinality: -1 is less than the minimum of 0``.

A role's VM is a Cirrus VM template (``vm_template``: its id) and/or inline
contents in OpenNebula syntax (``vm_template_contents``), merged over it as
OpenNebula does. Custom attributes are ``"M|type|description|options|default"``
(M mandatory, O optional); networks ``"M|network|description||id:"``.
"""
import json
import re
from datetime import datetime, timezone

import jsonschema

from cirrus.errors import InvalidArgument
from cirrus.template import is_digits, parse as parse_vm_template
from services.flow import elasticity

SHUTDOWN_ACTIONS = ["terminate", "terminate-hard", "shutdown", "shutdown-hard"]
POLICY_TYPES = ["CHANGE", "CARDINALITY", "PERCENTAGE_CHANGE"]

_POLICY = {
    "type": "object",
    "required": ["type", "adjust"],
    "properties": {
        "type": {"enum": POLICY_TYPES},
        "adjust": {"type": "integer"},
        "min_adjust_step": {"type": "integer", "minimum": 1},
    },
}

ROLE_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "anyOf": [{"required": ["vm_template"]}, {"required": ["vm_template_contents"]}],
    "properties": {
        "name": {"type": "string", "pattern": r"^\w+$"},
        "cardinality": {"type": "integer", "minimum": 0},
        "vm_template": {"type": "integer", "minimum": 0},
        "vm_template_contents": {"type": "string"},
        "parents": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "shutdown_action": {"enum": SHUTDOWN_ACTIONS},
        "min_vms": {"type": "integer", "minimum": 0},
        "max_vms": {"type": "integer", "minimum": 0},
        "cooldown": {"type": "integer", "minimum": 0},
        "on_hold": {"type": "boolean"},
        "elasticity_policies": {"type": "array", "items": {**_POLICY, "required": [
            "type", "adjust", "expression"], "properties": {
            **_POLICY["properties"],
            "expression": {"type": "string", "minLength": 1},
            "period_number": {"type": "integer", "minimum": 0},
            "period": {"type": "integer", "minimum": 0},
            "cooldown": {"type": "integer", "minimum": 0}}}},
        "scheduled_policies": {"type": "array", "items": {
            **_POLICY,
            "anyOf": [{"required": ["start_time"]}, {"required": ["recurrence"]}],
            "properties": {**_POLICY["properties"],
                           "start_time": {"type": ["string", "integer"]},
                           "recurrence": {"type": "string", "minLength": 1}}}},
    },
}

SERVICE_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["name", "roles"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 128},
        "deployment": {"enum": ["none", "straight"]},
        "description": {"type": "string"},
        "shutdown_action": {"enum": SHUTDOWN_ACTIONS},
        "ready_status_gate": {"type": "boolean"},
        "automatic_deletion": {"type": "boolean"},
        "on_hold": {"type": "boolean"},
        "custom_attrs": {"type": "object", "additionalProperties": {
            "type": "string", "pattern": r"^[MO]\|"}},
        "custom_attrs_values": {"type": "object"},
        "networks": {"type": "object", "additionalProperties": {
            "type": "string", "pattern": r"^[MO]\|network\|"}},
        "networks_values": {"type": "array"},
        "roles": {"type": "array", "minItems": 1, "items": ROLE_SCHEMA},
    },
}

_VALIDATOR = jsonschema.Draft7Validator(SERVICE_SCHEMA)
MAX_ERRORS = 5


def _path(parts):
    return "/".join(str(p) for p in parts) or "(template)"


def _schema_error(error):
    """One line for a jsonschema error: the path, then what is wrong."""
    if error.validator == "anyOf" and "vm_template" in error.schema.get("properties", {}):
        return f"{_path(error.path)}: a role needs vm_template (a VM template id) " \
               "or vm_template_contents"
    if error.validator == "anyOf":
        return f"{_path(error.path)}: a scheduled policy needs start_time or recurrence"
    if error.validator == "pattern" and error.path and error.path[-1] == "name":
        return f"{_path(error.path)}: {error.instance!r} must be letters, digits and _ only"
    if error.validator == "pattern":
        return f"{_path(error.path)}: {error.instance!r} must look like " \
               f"\"M|type|description|options|default\" (M mandatory, O optional)"
    return f"{_path(error.path)}: {error.message}"


def load(body, what="service template"):
    """A template body (or ``what`` else) from a dict or JSON text;
    InvalidArgument if neither."""
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except ValueError as exc:
            raise InvalidArgument(f"{what} is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(body).__name__}")
    return body


def validate(body):
    """Check a template (dict or JSON text); returns the dict, unchanged.
    Raises InvalidArgument listing up to MAX_ERRORS problems by path."""
    body = load(body)
    errors = sorted(_VALIDATOR.iter_errors(body), key=lambda e: list(map(str, e.path)))
    problems = [_schema_error(e) for e in errors]
    if not problems:
        problems = _rule_problems(body)
    if problems:
        more = len(problems) - MAX_ERRORS
        text = "; ".join(problems[:MAX_ERRORS]) + (f"; and {more} more" if more > 0 else "")
        raise InvalidArgument(f"service template: {text}")
    return body


def validate_added_role(body, role):
    """A role (dict or JSON text) to add to a service made from ``body``,
    checked as its last role; returns the dict. Problems are named by their
    path in the role (``role: cardinality: ...``)."""
    role = load(role, "role")
    where = f"roles/{len(body['roles'])}"
    try:
        validate({**body, "roles": [*body["roles"], role]})
    except InvalidArgument as exc:
        text = str(exc).removeprefix("service template: ")
        raise InvalidArgument("role: " + text.replace(f"{where}/", "").replace(
            f"{where}: ", "")) from None
    return role


def _rule_problems(body):
    problems = []
    roles = body["roles"]
    names = [role["name"] for role in roles]
    for index, role in enumerate(roles):
        where = f"roles/{index}"
        if names.count(role["name"]) > 1 and names.index(role["name"]) != index:
            problems.append(f"{where}/name: role {role['name']!r} is defined twice")
        for parent in role.get("parents", []):
            if parent not in names:
                problems.append(f"{where}/parents: no role named {parent!r}")
            elif parent == role["name"]:
                problems.append(f"{where}/parents: a role cannot be its own parent")
        cardinality = role.get("cardinality", 1)
        low, high = role.get("min_vms"), role.get("max_vms")
        if low is not None and high is not None and low > high:
            problems.append(f"{where}/min_vms: {low} is more than max_vms {high}")
        if low is not None and cardinality < low:
            problems.append(f"{where}/cardinality: {cardinality} is less than min_vms {low}")
        if high is not None and cardinality > high:
            problems.append(f"{where}/cardinality: {cardinality} is more than max_vms {high}")
        if role.get("elasticity_policies") and (low is None or high is None):
            problems.append(f"{where}: a role with elasticity_policies needs min_vms and max_vms")
        if "vm_template_contents" in role:
            try:
                parse_vm_template(role["vm_template_contents"])
            except InvalidArgument as exc:
                problems.append(f"{where}/vm_template_contents: {exc}")
        for i, policy in enumerate(role.get("elasticity_policies", [])):
            try:
                elasticity.compile_expression(policy["expression"])
            except InvalidArgument as exc:
                problems.append(f"{where}/elasticity_policies/{i}/expression: {exc}")
        for i, policy in enumerate(role.get("scheduled_policies", [])):
            problem = elasticity.schedule_problem(policy)
            if problem:
                problems.append(f"{where}/scheduled_policies/{i}/{problem}")
    if not problems:
        cycle = find_cycle(roles)
        if cycle:
            problems.append(f"roles: parents make a cycle: {' -> '.join(cycle)}")
    for name, spec in (body.get("custom_attrs") or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            problems.append(f"custom_attrs/{name}: must be letters, digits and _ "
                            "(it becomes a context variable)")
    return problems


# ---------------------------------------------------------------- dependencies

def find_cycle(roles):
    """A list of role names going round a cycle of parents, or None."""
    parents = {role["name"]: role.get("parents", []) for role in roles}
    state = {}

    def visit(name, trail):
        state[name] = "visiting"
        for parent in parents.get(name, []):
            if state.get(parent) == "visiting":
                return trail[trail.index(parent):] + [parent] if parent in trail \
                    else [name, parent]
            if parent not in state:
                found = visit(parent, trail + [parent])
                if found:
                    return found
        state[name] = "done"
        return None

    for name in parents:
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def deploy_order(roles):
    """Role names, every parent before its children (template order otherwise)."""
    parents = {role["name"]: role.get("parents", []) for role in roles}
    order, placed = [], set()
    while len(order) < len(parents):
        progress = False
        for name, needs in parents.items():
            if name not in placed and all(p in placed for p in needs):
                order.append(name)
                placed.add(name)
                progress = True
        if not progress:
            raise InvalidArgument(f"roles: parents make a cycle: {find_cycle(roles)}")
    return order


def children(roles):
    """{role name: names of the roles that name it as a parent}."""
    out = {role["name"]: [] for role in roles}
    for role in roles:
        for parent in role.get("parents", []):
            out[parent].append(role["name"])
    return out


# ---------------------------------------------------------------- instantiate values

def _fields(spec):
    parts = (spec.split("|") + [""] * 5)[:5]
    return {"mandatory": parts[0] == "M", "type": parts[1], "description": parts[2],
            "options": parts[3].strip(), "default": parts[4]}


def custom_attr_values(body, given):
    """The custom attributes' values: ``given`` ({NAME: value}) over the
    template's ``custom_attrs_values`` and defaults, checked by type. A
    mandatory one with no value is an error naming every one missing."""
    given = {str(k): v for k, v in (given or {}).items()}
    specs = body.get("custom_attrs") or {}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise InvalidArgument(f"custom_attrs: unknown attribute(s) {', '.join(unknown)}; the "
                              f"template defines: {', '.join(sorted(specs)) or 'none'}")
    preset = body.get("custom_attrs_values") or {}
    values, missing = {}, []
    for name, spec in specs.items():
        fields = _fields(spec)
        value = given.get(name, preset.get(name))
        if value is None or value == "":
            value = fields["default"] or None
        if value is None:
            if fields["mandatory"]:
                missing.append(name)
            continue
        values[name] = _checked_value(name, fields, value)
    if missing:
        raise InvalidArgument(f"custom_attrs: mandatory attribute(s) without a value: "
                              f"{', '.join(missing)}")
    return values


def _checked_value(name, fields, value):
    text = str(value).lower() if isinstance(value, bool) else str(value)
    kind = fields["type"]
    if kind.startswith("number") or kind.startswith("range"):
        try:
            number = float(text)
        except ValueError:
            raise InvalidArgument(f"custom_attrs/{name}: {text!r} is not a number") from None
        if kind in ("number", "range") and number != int(number):
            raise InvalidArgument(f"custom_attrs/{name}: {text!r} is not a whole number")
        if kind.startswith("range") and ".." in fields["options"]:
            low, high = (float(x) for x in fields["options"].split(".."))
            if not low <= number <= high:
                raise InvalidArgument(f"custom_attrs/{name}: {text} is outside "
                                      f"{fields['options']}")
    elif kind == "boolean" and text.upper() not in ("YES", "NO", "TRUE", "FALSE"):
        raise InvalidArgument(f"custom_attrs/{name}: {text!r} is not YES or NO")
    elif kind in ("list", "list-multiple") and fields["options"]:
        options = [o.strip() for o in fields["options"].split(",")]
        chosen = text.split(",") if kind == "list-multiple" else [text]
        bad = [c for c in chosen if c not in options]
        if bad:
            raise InvalidArgument(f"custom_attrs/{name}: {', '.join(bad)} is not one of "
                                  f"{', '.join(options)}")
    return text


def network_values(body, given):
    """{network name: vnet id} from ``given`` ({name: id | {"id": id}}) over the
    template's ``networks_values``; a mandatory one missing is an error.
    OpenNebula's template_id / reserve_from are refused: Cirrus services use
    existing networks."""
    specs = body.get("networks") or {}
    merged = {}
    for item in body.get("networks_values") or []:
        if isinstance(item, dict):
            merged.update(item)
    merged.update(given or {})
    unknown = sorted(set(merged) - set(specs))
    if unknown:
        raise InvalidArgument(f"networks: unknown network(s) {', '.join(unknown)}; the "
                              f"template defines: {', '.join(sorted(specs)) or 'none'}")
    values, missing = {}, []
    for name, spec in specs.items():
        value = merged.get(name)
        if isinstance(value, dict):
            if set(value) & {"template_id", "reserve_from"}:
                raise InvalidArgument(f"networks/{name}: only an existing network id is "
                                      "supported (template_id and reserve_from are not)")
            value = value.get("id")
        if value is None or value == "":
            default = _fields(spec)["default"]
            value = default.removeprefix("id:") or None
        if value is None:
            if _fields(spec)["mandatory"]:
                missing.append(name)
            continue
        try:
            values[name] = int(value)
        except (TypeError, ValueError):
            raise InvalidArgument(f"networks/{name}: {value!r} is not a network id") from None
    if missing:
        raise InvalidArgument(f"networks: mandatory network(s) without a value: "
                              f"{', '.join(missing)}")
    return values


def vm_template_for(role, base, service_id, custom_attrs, networks):
    """The VM template a role's VMs are made from: ``base`` (the body of the
    role's Cirrus VM template, or {}) with the role's vm_template_contents
    merged over it, ``$NAME`` of networks and custom attributes substituted,
    and SERVICE_ID, ROLE_NAME and the custom attributes put in CONTEXT (and as
    attributes of the VM, where OpenNebula puts them)."""
    template = dict(base or {})
    contents = role.get("vm_template_contents")
    if contents:
        variables = {**{k: str(v) for k, v in custom_attrs.items()},
                     **{k: str(v) for k, v in networks.items()}}
        text = re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)",
                      lambda m: variables.get(m.group(1), m.group(0)), contents)
        template.update(parse_vm_template(text))
    context = template.get("CONTEXT") or {}
    if isinstance(context, list):
        merged = {}
        for part in context:
            merged.update(part)
        context = merged
    extra = {"SERVICE_ID": str(service_id), "ROLE_NAME": role["name"],
             **{k.upper(): str(v) for k, v in custom_attrs.items()}}
    template["CONTEXT"] = {**context, **extra}
    template.update(extra)
    return template


def parse_time(value):
    """A scheduled policy's start_time: epoch seconds or ISO 8601 (UTC if no zone)."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and is_digits(value)):
        return datetime.fromtimestamp(int(value), timezone.utc)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
