"""Elasticity: the expressions of elasticity policies, what a policy's
adjustment makes of a cardinality, and when scheduled policies fire.

Expressions are OneFlow's (``CPU > 80``, ``A > 1 & B < 2``, ``|``, ``!``,
parentheses; comparisons ``> < >= <= = == !=``; ``&&`` and ``||`` too) over
a role's running VMs. A bare attribute is its **average** over the VMs that
have it, as in OpenNebula. Cirrus adds what OpenNebula users asked for
(OpenNebula issue 1701): ``AVG(ATTR)``, ``MIN(ATTR)``, ``MAX(ATTR)``, and
``ANY(cond)`` / ``ALL(cond)``, where ``cond`` is evaluated on each VM alone.
An attribute no VM has makes its comparison unknown, and an expression that
ends unknown is false.

Each VM's attributes are its user template, then its monitoring, then its
template (the first that has the name wins).
"""
import re
from dataclasses import dataclass

from croniter import croniter

from cirrus.errors import InvalidArgument

_TOKEN = re.compile(r"""\s*(?:(?P<number>-?\d+(?:\.\d+)?)|(?P<string>"[^"]*")
                     |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
                     |(?P<op>&&|\|\||>=|<=|==|!=|[&|!<>=()]))""", re.X)
AGGREGATES = ("AVG", "MIN", "MAX")
QUANTIFIERS = ("ANY", "ALL")
COMPARISONS = (">", "<", ">=", "<=", "=", "==", "!=")


class ExpressionError(InvalidArgument):
    pass


def _tokens(text):
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            start = len(text) - len(text[pos:].lstrip())
            raise ExpressionError(f"unexpected {text[start:start + 10]!r} at column {start + 1}")
        kind = match.lastgroup
        out.append((kind, match.group(kind), match.start(kind) + 1))
        pos = match.end()
    return out


class _Parser:
    def __init__(self, text):
        self.text, self.tokens, self.at = text, _tokens(text), 0

    def peek(self, offset=0):
        index = self.at + offset
        return self.tokens[index] if index < len(self.tokens) else (None, None, len(self.text) + 1)

    def take(self, value=None, kind=None):
        token = self.peek()
        if (value is not None and token[1] != value) or (kind is not None and token[0] != kind):
            wanted = repr(value) if value else (kind or "something")
            found = repr(token[1]) if token[1] is not None else "the end"
            raise ExpressionError(f"expected {wanted} at column {token[2]}, found {found}")
        self.at += 1
        return token

    def parse(self):
        if not self.tokens:
            raise ExpressionError("the expression is empty")
        node = self.either()
        if self.peek()[0] is not None:
            raise ExpressionError(f"unexpected {self.peek()[1]!r} at column {self.peek()[2]}")
        return node

    def either(self):
        node = self.both()
        while self.peek()[1] in ("|", "||"):
            self.take()
            node = ("or", node, self.both())
        return node

    def both(self):
        node = self.unary()
        while self.peek()[1] in ("&", "&&"):
            self.take()
            node = ("and", node, self.unary())
        return node

    def unary(self):
        kind, value, _ = self.peek()
        if value == "!":
            self.take()
            return ("not", self.unary())
        if value == "(":
            self.take()
            node = self.either()
            self.take(")")
            return node
        if kind == "name" and value.upper() in QUANTIFIERS and self.peek(1)[1] == "(":
            self.take()
            self.take("(")
            node = self.either()
            self.take(")")
            return (value.upper().lower(), node)
        left = self.operand()
        op = self.peek()
        if op[1] not in COMPARISONS:
            raise ExpressionError(f"expected a comparison (> < >= <= = !=) at column {op[2]}")
        self.take()
        return ("cmp", op[1], left, self.operand())

    def operand(self):
        kind, value, column = self.peek()
        if kind == "number":
            self.take()
            return ("value", float(value))
        if kind == "string":
            self.take()
            return ("value", value[1:-1])
        if kind == "name":
            self.take()
            if value.upper() in AGGREGATES and self.peek()[1] == "(":
                self.take("(")
                name = self.take(kind="name")[1]
                self.take(")")
                return ("agg", value.upper(), name.upper())
            return ("attr", value.upper())
        found = repr(value) if value is not None else "the end"
        raise ExpressionError(f"expected a number, a \"string\" or an attribute at column "
                              f"{column}, found {found}")


@dataclass(frozen=True)
class Expression:
    text: str
    tree: tuple

    def evaluate(self, vms):
        """True or False over ``vms`` (a list of attribute dicts, upper-case keys)."""
        return _eval(self.tree, vms, None) is True


def compile_expression(text):
    if not isinstance(text, str):
        raise ExpressionError("an expression must be text")
    return Expression(text, _Parser(text).parse())


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _aggregate(how, name, vms):
    numbers = [n for n in (_number(vm.get(name)) for vm in vms) if n is not None]
    if not numbers:
        return None
    if how == "MIN":
        return min(numbers)
    if how == "MAX":
        return max(numbers)
    return sum(numbers) / len(numbers)


def _operand(node, vms, vm):
    if node[0] == "value":
        return node[1]
    if node[0] == "agg":
        return _aggregate(node[1], node[2], vms)
    if vm is not None:      # inside ANY/ALL: the VM's own value
        value = vm.get(node[1])
        number = _number(value)
        return number if number is not None else value
    return _aggregate("AVG", node[1], vms)


def _compare(op, left, right):
    if left is None or right is None:
        return None
    a, b = _number(left), _number(right)
    if a is not None and b is not None:
        left, right = a, b
    elif op in (">", "<", ">=", "<="):
        return False
    else:
        left, right = str(left), str(right)
    return {">": left > right, "<": left < right, ">=": left >= right, "<=": left <= right,
            "=": left == right, "==": left == right, "!=": left != right}[op]


def _eval(node, vms, vm):
    """Three-valued: True, False or None (unknown: an attribute is missing)."""
    kind = node[0]
    if kind == "cmp":
        return _compare(node[1], _operand(node[2], vms, vm), _operand(node[3], vms, vm))
    if kind == "not":
        value = _eval(node[1], vms, vm)
        return None if value is None else not value
    if kind == "and":
        a, b = _eval(node[1], vms, vm), _eval(node[2], vms, vm)
        return False if False in (a, b) else (None if None in (a, b) else True)
    if kind == "or":
        a, b = _eval(node[1], vms, vm), _eval(node[2], vms, vm)
        return True if True in (a, b) else (None if None in (a, b) else False)
    each = [_eval(node[1], vms, one) for one in vms]
    known = [v for v in each if v is not None]
    if not known:
        return None
    return any(known) if kind == "any" else all(known)


def vm_attributes(user_template, monitoring, template):
    """A VM's attributes for expressions: user template over monitoring over template."""
    out = {}
    for source in (template, monitoring, user_template):
        for key, value in (source or {}).items():
            if not isinstance(value, (dict, list)):
                out[str(key).upper()] = value
    return out


# ---------------------------------------------------------------- adjustments

def adjusted_cardinality(policy, cardinality, min_vms, max_vms):
    """What ``policy`` (type, adjust, min_adjust_step) makes of ``cardinality``,
    kept within [min_vms, max_vms] (None: no bound)."""
    kind, adjust = policy["type"], int(policy["adjust"])
    if kind == "CARDINALITY":
        new = adjust
    elif kind == "CHANGE":
        new = cardinality + adjust
    else:
        change = int(cardinality * adjust / 100)     # toward zero, as OpenNebula
        step = policy.get("min_adjust_step")
        if step and abs(change) < step:
            change = step if adjust > 0 else -step
        new = cardinality + change
    if min_vms is not None:
        new = max(new, min_vms)
    if max_vms is not None:
        new = min(new, max_vms)
    return max(new, 0)


def schedule_problem(policy):
    """What is wrong with a scheduled policy's recurrence or start_time, as
    "<field>: <reason>", or None."""
    if "recurrence" in policy and not croniter.is_valid(policy["recurrence"]):
        return f"recurrence: {policy['recurrence']!r} is not a cron expression " \
               "(minute hour day-of-month month day-of-week)"
    if "start_time" in policy:
        from services.flow.templates import parse_time
        try:
            parse_time(policy["start_time"])
        except (TypeError, ValueError, OverflowError):
            return f"start_time: {policy['start_time']!r} is not a time (ISO 8601 or " \
                   "seconds since the epoch)"
    return None


def next_recurrence(recurrence, after):
    """The first time after ``after`` (an aware datetime) the cron expression names."""
    return croniter(recurrence, after).get_next(type(after))
