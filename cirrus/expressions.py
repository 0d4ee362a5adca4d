"""OpenNebula's scheduler expressions: SCHED_REQUIREMENTS and SCHED_RANK.

    compile_requirements(text, vm_template) -> Requirement, .evaluate(host) -> bool
    compile_rank(text, vm_template)         -> Rank,        .evaluate(host) -> float

The language is OpenNebula's (src/parsers/expr_bool.y, expr_arith.y and
expr_parser.l in OpenNebula/one; the "Requirement/Rank Expression Syntax"
sections of its VM template reference). docs/scheduler.md describes it for
users; the points where Cirrus differs on purpose are listed there too.

A text is parsed once, with lark (LALR), when the VM is created: a syntax error
or an unknown ``$VARIABLE`` raises ExpressionError (INVALID_ARGUMENT) then,
never at scheduling time. The tree is turned into the source of one Python
lambda, compiled by Python itself, so evaluating it for 2,500 hosts costs a
few plain comparisons per host and never re-parses anything.

A host is a dict of upper-case attribute names to values: int, float, str, or
a list for list attributes. Names in expressions are matched upper-cased.
"""
import fnmatch
import functools
import re

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput, UnexpectedToken

from cirrus.errors import InvalidArgument

# ------------------------------------------------------------------ grammars

# Tokens as OpenNebula's lexer reads them: names start with a letter, numbers
# have no exponent, quoted strings have no escapes. A $VARIABLE comes from the
# VM's template (OpenNebula substitutes it when the VM is created).
_TERMINALS = r"""
NAME: /[A-Za-z][A-Za-z0-9_]*/
STRING: /"[^"]*"/
VARIABLE: /\$[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?/
_LPAR: "("
_RPAR: ")"
%ignore /\s+/
"""

# '!', '&' and '|' have ONE precedence level and group from the left, as in
# OpenNebula (`%left '!' '&' '|'`): `A | B & C` is `(A | B) & C`.
_REQUIREMENTS_GRAMMAR = r"""
?start: expr
?expr: expr _AND unary -> both
     | expr _OR unary -> either
     | unary
?unary: _NOT unary -> negation
      | _LPAR expr _RPAR
      | comparison
comparison: NAME MATCH value
          | NAME ORDER number
?value: number | STRING | NAME
?number: NUMBER | VARIABLE
MATCH: "=" | "!=" | "@>"
ORDER: ">" | "<"
NUMBER: /-?[0-9]+(\.[0-9]+)?/
_AND: "&"
_OR: "|"
_NOT: "!"
""" + _TERMINALS

_RANK_GRAMMAR = r"""
?start: sum
?sum: sum ADDITIVE product -> binary
    | product
?product: product MULTIPLICATIVE unary -> binary
        | unary
?unary: ADDITIVE unary -> negative
      | atom
?atom: NUMBER | NAME | VARIABLE | _LPAR sum _RPAR
ADDITIVE: "+" | "-"
MULTIPLICATIVE: "*" | "/"
NUMBER: /[0-9]+(\.[0-9]+)?/
""" + _TERMINALS

_PARSERS = {"requirements": Lark(_REQUIREMENTS_GRAMMAR, parser="lalr"),
            "rank": Lark(_RANK_GRAMMAR, parser="lalr")}

# What each terminal is called in "expected ..." (in this order).
_EXPECTED_WORDS = {
    "requirements": [("NAME", "an attribute name"), ("_NOT", "'!'"), ("_LPAR", "'('"),
                     ("MATCH", "a comparison (=, !=, >, <, @>)"), ("ORDER", None),
                     ("NUMBER", "a number"), ("VARIABLE", None),
                     ("_AND", "'&'"), ("_OR", "'|'"), ("_RPAR", "')'"),
                     ("$END", "the end of the expression")],
    "rank": [("NUMBER", "a number"), ("NAME", "an attribute name"), ("VARIABLE", "a $VARIABLE"),
             ("_LPAR", "'('"), ("ADDITIVE", None), ("MULTIPLICATIVE", "an operator (+, -, *, /)"),
             ("_RPAR", "')'"), ("$END", "the end of the expression")],
}


class ExpressionError(InvalidArgument):
    """A SCHED_REQUIREMENTS or SCHED_RANK that cannot be compiled. ``what`` is
    the expression's name, ``line``/``column`` (1-based) where the problem is,
    ``expected`` what would have been valid there (None when not a syntax error)."""

    def __init__(self, message, what, line=None, column=None, expected=None):
        self.what, self.line, self.column, self.expected = what, line, column, expected
        super().__init__(f"{what}: {message}")


# --------------------------------------------------------------------- API

class _Compiled:
    __slots__ = ("text", "evaluate", "attributes", "source", "trends")

    def __init__(self, text, compiled):
        self.text = text
        # evaluate is the generated lambda itself: no method call in between.
        self.evaluate, self.attributes, self.source, self.trends = compiled

    def __repr__(self):
        return f"{type(self).__name__}({self.text!r})"


class Requirement(_Compiled):
    """A compiled SCHED_REQUIREMENTS. ``evaluate(host)`` is True when the host
    dict satisfies it; ``attributes`` are the host attributes it reads;
    ``source`` is the generated Python, for debugging."""

    __slots__ = ()


class Rank(_Compiled):
    """A compiled SCHED_RANK. ``evaluate(host)`` is its float value for the
    host dict (higher is better); ``attributes`` and ``source`` as in
    Requirement. ``trends`` says, for each attribute it reads, how the rank
    moves when that attribute's number grows: FALLS, RISES or None when the
    expression does not say (``2 * A``: RISES; ``PRIORITY * A``: None)."""

    __slots__ = ()


RISES, FALLS = 1, -1


def compile_requirements(text, vm_template=None, what="SCHED_REQUIREMENTS"):
    """Compile a requirement expression; ``$VAR`` comes from ``vm_template``
    (a parsed template dict). Empty text matches every host. Raises ExpressionError."""
    return Requirement(text, _compile("requirements", _checked_text(text, what), vm_template, what))


def compile_rank(text, vm_template=None, what="SCHED_RANK"):
    """Compile a rank expression; ``$VAR`` comes from ``vm_template``. Empty
    text ranks every host 0. Raises ExpressionError."""
    return Rank(text, _compile("rank", _checked_text(text, what), vm_template, what))


def host_attributes(attributes):
    """A copy of ``attributes`` with upper-case keys, as evaluate() reads them."""
    return {str(key).upper(): value for key, value in attributes.items()}


# ----------------------------------------------------------------- compiling

def _checked_text(text, what):
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ExpressionError(f"must be a single text value, not {type(text).__name__}", what)
    return text


def _compile(kind, text, vm_template, what):
    if "$" not in text:  # no substitution: the same text always compiles the same
        return _compile_cached(kind, text, what)
    return _compile_uncached(kind, text, vm_template, what)


@functools.lru_cache(maxsize=4096)
def _compile_cached(kind, text, what):
    return _compile_uncached(kind, text, None, what)


def _compile_uncached(kind, text, vm_template, what):
    if not text.strip():
        return ((lambda host: True) if kind == "requirements" else (lambda host: 0.0)), frozenset(), "", {}
    try:
        tree = _PARSERS[kind].parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(kind, text, exc, what) from None
    builder = _Builder(text, vm_template, what)
    try:
        trends = {}
        if kind == "requirements":
            body = builder.requirement(tree)
        else:
            body = f"(_r if (_r := float({builder.rank(tree)})) == _r else 0.0)"  # NaN (inf-inf) ranks 0
            trends = builder.trends(tree)[1]
        source = f"lambda h: {body}"
        function = eval(compile(source, f"<{what}>", "eval"), builder.namespace)  # our own generated code
    except (SyntaxError, RecursionError, MemoryError):  # Python's limits on nesting
        raise ExpressionError("is nested too deeply to compile: simplify it", what) from None
    return function, frozenset(builder.attributes), source, trends


class _Builder:
    """Turns a parse tree into Python source. Every value is either a Python
    literal written with repr() or a helper in ``namespace``; no text of the
    expression is ever pasted into the source as code."""

    def __init__(self, text, vm_template, what):
        self.text, self.vm_template, self.what = text, vm_template, what
        self.attributes = set()
        self.namespace = dict(_HELPERS)
        self.temporaries = 0

    def constant(self, value):
        name = f"_k{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def attribute(self, token):
        name = token.value.upper()
        self.attributes.add(name)
        return f"h.get({name!r})"

    # -- requirements

    def requirement(self, node):
        if node.data in ("both", "either"):
            # A & B & C becomes one Python "and", not nested ones, which would
            # soon hit Python's limit of 200 nested parentheses.
            joiner = " and " if node.data == "both" else " or "
            operands = _chain(node, lambda child: child.data == node.data)
            return "(" + joiner.join(self.requirement(operand) for _, operand in operands) + ")"
        if node.data == "negation":
            return f"(not {self.requirement(node.children[0])})"
        name, operator, operand = node.children
        value = self.operand(operand)
        lookup = self.attribute(name)
        if operator.type == "ORDER":
            if not isinstance(value, (int, float)):
                self.fail(operand, f"{operator.value} needs a number, and {operand.value} {{where}} is {value!r}",
                          expected="a number")
            helper = "_greater" if operator.value == ">" else "_less"
            return f"((_v {operator.value} {value!r}) if type(_v := {lookup}) is int else {helper}(_v, {value!r}))"
        if operator.value == "@>":
            if isinstance(value, str):
                return f"_contains_text({lookup}, {self.constant(_pattern(value))})"
            return f"_contains_number({lookup}, {value!r})"
        if isinstance(value, str):
            pattern = self.constant(_pattern(value))
            if operator.value == "!=":
                return f"_differs_text({lookup}, {pattern})"
            if _is_wildcard(value):  # inline the common case, a text host value
                match = self.constant(re.compile(fnmatch.translate(value)).match)
                return f"(({match}(_v) is not None) if type(_v := {lookup}) is str else _matches_text(_v, {pattern}))"
            return f"((_v == {value!r}) if type(_v := {lookup}) is str else _matches_text(_v, {pattern}))"
        if operator.value == "=":
            return f"((_v == {value!r}) if type(_v := {lookup}) is int else _equals_number(_v, {value!r}))"
        return f"((_v != {value!r}) if type(_v := {lookup}) is int else _differs_number(_v, {value!r}))"

    def operand(self, token):
        """The Python value of a comparison's right side: a number or a text."""
        if token.type == "NUMBER":
            return _number_literal(token.value)
        if token.type == "NAME":  # a bare word is a string, as in OpenNebula
            return token.value
        if token.type == "STRING":
            return self.substitute_in_string(token)
        text = self.variable(token.value, token.line, token.column)
        number = _number_text(text)
        return text if number is None else number

    def substitute_in_string(self, token):
        """A quoted string's value, with each $VARIABLE in it replaced (OpenNebula
        substitutes in the whole template text, so "$NAME*" works)."""
        inner = token.value[1:-1]
        if "$" not in inner:
            return inner
        return _VARIABLE_IN_TEXT.sub(
            lambda match: self.variable(match.group(), token.line, token.column + 1 + match.start()), inner)

    def variable(self, reference, line, column):
        """The text a $NAME, $NAME[ATTR] or $NAME[ATTR, KEY=VALUE] stands for."""
        match = _VARIABLE.fullmatch(reference)
        name, selector = match.group(1).upper(), match.group(2)
        template = self.vm_template or {}
        if name not in template:
            self.fail_at(line, column, f"unknown variable {reference} {{where}}: the VM template has no {name}")
        value = template[name]
        if selector is None:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
                self.fail_at(line, column, f"{reference} {{where}} is a vector, not a single value: "
                                           f"name one of its attributes, as in ${name}[ATTRIBUTE]")
            self.fail_at(line, column, f"{reference} {{where}} is not a single value: {name} is given "
                                       f"more than once in the VM template")
        parts = _SELECTOR.fullmatch(selector)
        if parts is None:
            self.fail_at(line, column, f"cannot read {reference} {{where}}: write ${name}[ATTRIBUTE] "
                                       f"or ${name}[ATTRIBUTE, KEY=VALUE]")
        attribute, key, wanted = parts.group(1).upper(), parts.group(2), parts.group(3)
        vectors = [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, dict)]
        if key is not None:
            wanted = wanted[1:-1] if wanted.startswith('"') else wanted
            vectors = [vector for vector in vectors if vector.get(key.upper()) == wanted]
        for vector in vectors:
            if attribute in vector:
                return str(vector[attribute])
        self.fail_at(line, column, f"unknown variable {reference} {{where}}: no {name} vector in the VM template "
                                   f"{'has' if key is None else f'with {key.upper()}={wanted} has'} {attribute}")

    # -- rank

    def rank(self, node):
        if isinstance(node, Token):
            if node.type == "NUMBER":  # a float: float() of a huge int would overflow
                return repr(float(node.value))
            if node.type == "NAME":
                return f"(_v if type(_v := {self.attribute(node)}) is int else _rank_value(_v))"
            text = self.variable(node.value, node.line, node.column)
            number = _number_text(text)
            if number is None:
                self.fail(node, f"{node.value} is {text!r}, not a number {{where}}", expected="a number")
            return repr(float(number))
        if node.data == "negative":
            sign, operand = node.children
            return f"({sign.value}{self.rank(operand)})"
        left, operator, right = node.children
        if operator.value != "/":  # a chain of + and -, or of *, is one flat Python expression
            operands = _chain(node, lambda child: child.data == "binary" and (
                child.children[1].type == "ADDITIVE" if operator.type == "ADDITIVE"
                else child.children[1].value == "*"))
            return "(" + " ".join(f"{sign} {self.rank(operand)}" for sign, operand in operands)[1:] + ")"
        self.temporaries += 1
        divisor = f"_d{self.temporaries}"  # one name per division: they can nest
        return f"(({self.rank(left)} / {divisor}) if ({divisor} := {self.rank(right)}) else 0.0)"

    def trends(self, node):
        """(the rank's value if it is a constant, else None; {attribute: RISES,
        FALLS or None}) of a rank tree: how it moves as each attribute grows.
        A host value that is not a number ranks 0, so for a numeric attribute
        the rank follows the number."""
        if isinstance(node, Token):
            if node.type == "NAME":
                return None, {node.value.upper(): RISES}
            if node.type == "NUMBER":
                return float(node.value), {}
            return float(_number_text(self.variable(node.value, node.line, node.column))), {}
        if node.data == "negative":
            sign, operand = node.children
            value, trends = self.trends(operand)
            if sign.value == "+":
                return value, trends
            return (None if value is None else -value), _scaled(trends, -1)
        (left, left_trends), operator, (right, right_trends) = (
            self.trends(node.children[0]), node.children[1].value, self.trends(node.children[2]))
        if left is not None and right is not None:
            return _constant(left, operator, right), {}
        if operator in "+-":
            trends = dict(left_trends)
            for name, trend in _scaled(right_trends, 1 if operator == "+" else -1).items():
                # two terms moving apart with one attribute: the sum may go either way
                trends[name] = trend if trends.get(name, trend) == trend else None
            return None, trends
        if operator == "*" and left is not None:
            return None, _scaled(right_trends, left)
        if right is not None:   # A * 2, A / 2 (A / 0 ranks 0)
            return None, _scaled(left_trends, right)
        return None, dict.fromkeys({**left_trends, **right_trends})    # A * B, 2 / A

    # -- errors

    def fail(self, token, message, expected=None):
        self.fail_at(token.line, token.column, message, expected)

    def fail_at(self, line, column, message, expected=None):
        """Raise ExpressionError; ``{where}`` in the message becomes 'at column N'."""
        message = message.replace("{where}", _where(self.text, line, column))
        raise ExpressionError(message, self.what, line, column, expected)


def _constant(left, operator, right):
    """``left operator right`` as the generated rank computes it (x / 0 is 0)."""
    if operator == "/":
        return left / right if right else 0.0
    return left + right if operator == "+" else left - right if operator == "-" else left * right


def _scaled(trends, factor):
    """``trends`` of an expression multiplied by ``factor``."""
    if factor == 0:
        return {}
    return {name: None if trend is None else trend * (1 if factor > 0 else -1)
            for name, trend in trends.items()}


def _chain(node, same):
    """[(operator, operand), ...] of a left-nested chain of binary nodes for
    which ``same(node)`` holds (the first operator is ''), in text order."""
    operands = []
    while True:
        left, right = node.children[0], node.children[-1]
        operator = node.children[1].value if len(node.children) == 3 else ""
        operands.append((operator, right))
        if not (isinstance(left, Tree) and same(left)):
            operands.append(("", left))
            return operands[::-1]
        node = left


_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)(?:\[([^\]]*)\])?")
_VARIABLE_IN_TEXT = _VARIABLE
_SELECTOR = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*'
                       r'(?:,\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*("[^"]*"|[^\s,"]+)\s*)?')
_NUMBER_TEXT = re.compile(r"\s*-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*", re.ASCII)


def _number_literal(text):
    return float(text) if "." in text else int(text)


@functools.lru_cache(maxsize=4096)     # hosts' texts repeat: "3", "yes", "kvm"
def _number_text(text):
    """The number a text stands for, or None when it does not look like one
    (no 'nan', 'inf' or '1_000', which float() would take)."""
    if not _NUMBER_TEXT.fullmatch(text):
        return None
    text = text.strip()
    if text.lstrip("-").isdigit() and len(text) < 300:  # int() refuses huge texts; float() gives inf
        return int(text)
    return float(text)


def _where(text, line, column):
    return f"at line {line}, column {column}" if "\n" in text.strip() else f"at column {column}"


def _syntax_error(kind, text, exc, what):
    """'unexpected X at column N; expected Y' for a lark error."""
    line, column, offset = exc.line, exc.column, exc.pos_in_stream
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        found, offset = "end of the expression", len(text)
        line, column = _end_position(text)
    elif isinstance(exc, UnexpectedToken):
        found = repr(exc.token.value)
    else:  # UnexpectedCharacters: no token starts here
        char = text[offset]
        if char == '"' and '"' not in text[offset + 1:]:
            return ExpressionError(f"unterminated string: the '\"' {_where(text, line, column)} is never "
                                   f"closed", what, line, column, "'\"'")
        if char == '"':  # a quoted string where none can be (in a rank)
            found = "quoted string"
        elif char.isalnum():
            found = repr(_word_at(text, offset))
        else:
            found = f"character {char!r}"
    wanted = _describe_expected(kind, _accepted_after(kind, text[:offset]))
    hint = ""
    if found == "'='" and text[:offset].rstrip()[-1:] in ("<", ">"):
        hint = " (there is no >= or <=: write (X > 4 | X = 5))"
    return ExpressionError(f"unexpected {found} {_where(text, line, column)}; expected {wanted}{hint}",
                           what, line, column, wanted)


def _accepted_after(kind, prefix):
    """The terminals the parser accepts after ``prefix``, which parses without
    error up to its end. (The sets on lark's exceptions are either too wide,
    since LALR states share lexers, or too narrow, taken after reductions.)"""
    interactive = _PARSERS[kind].parse_interactive(prefix)
    interactive.exhaust_lexer()
    return interactive.accepts()


def _word_at(text, offset):
    match = re.compile(r"[^\s()&|!=<>@]+").match(text, offset)
    return match.group() if match else text[offset]


def _end_position(text):
    stripped = text.rstrip()
    lines = stripped.split("\n")
    return len(lines), len(lines[-1]) + 1


def _describe_expected(kind, expected):
    expected = set(expected)
    if kind == "requirements" and "STRING" in expected:
        return "a value (a number, a \"quoted string\", a word or a $VARIABLE)"
    words = [word for terminal, word in _EXPECTED_WORDS[kind] if terminal in expected and word]
    if kind == "rank" and "ADDITIVE" in expected and "MULTIPLICATIVE" not in expected:
        words.append("'-'")
    if kind == "requirements" and "ORDER" in expected and "MATCH" not in expected:
        words.append("a comparison (>, <)")
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# --------------------------------------------------------- evaluation helpers
#
# Called from the generated lambdas, with the host's value (None when the
# host has no such attribute). The generated code handles a plain int itself.

_LISTS = (list, tuple, set, frozenset)


def _as_number(value):
    cls = type(value)
    if cls is int or cls is float:
        return value
    if cls is str:
        return _number_text(value)
    return None


def _items(value):
    """A list attribute's items: a list, or a comma-separated text."""
    if type(value) in _LISTS:
        return value
    if type(value) is str:
        return [item.strip() for item in value.split(",")]
    return () if value is None else (value,)


def _greater(value, limit):
    if type(value) in _LISTS:
        return any(_greater(item, limit) for item in value)
    number = _as_number(value)
    return number is not None and number > limit


def _less(value, limit):
    if type(value) in _LISTS:
        return any(_less(item, limit) for item in value)
    number = _as_number(value)
    return number is not None and number < limit


def _equals_number(value, wanted):
    if type(value) in _LISTS:  # CURRENT_VMS = 5: one of them is 5
        return any(_equals_number(item, wanted) for item in value)
    number = _as_number(value)
    return number is not None and number == wanted


def _differs_number(value, unwanted):
    """!= : known, a number, and not equal; for a list, none of its items is
    equal (CURRENT_VMS != 5: VM 5 is not there)."""
    if type(value) in _LISTS:
        return not _equals_number(value, unwanted)
    number = _as_number(value)
    return number is not None and number != unwanted


def _differs_text(value, pattern):
    """!= on a text: known and not matching; for a list, no item matches."""
    if value is None:
        return False
    return not _matches_text(value, pattern)


def _matches_text(value, pattern):
    if type(value) is str:
        return pattern(value)
    if type(value) in _LISTS:
        return any(_matches_text(item, pattern) for item in value)
    if value is None or type(value) is bool:
        return False
    return pattern(str(value))


def _contains_number(value, wanted):
    return any(_as_number(item) == wanted for item in _items(value))


def _contains_text(value, pattern):
    return any(pattern(str(item)) for item in _items(value))


def _rank_value(value):
    """A host value in a rank: its number, or 0 when unknown or not a number."""
    number = _as_number(value)
    return 0 if number is None else number


def _is_wildcard(text):
    return any(char in text for char in "*?[")


def _pattern(text):
    """A test for a shell wildcard pattern (fnmatch, case-sensitive as in
    OpenNebula); a plain string is compared with ==, which is faster."""
    if not _is_wildcard(text):
        return text.__eq__
    return functools.partial(_full_match, re.compile(fnmatch.translate(text)).match)


def _full_match(match, value):
    return match(value) is not None


_HELPERS = {helper.__name__: helper for helper in (
    _greater, _less, _equals_number, _differs_number, _matches_text, _differs_text, _contains_number,
    _contains_text, _rank_value)}
_HELPERS["__builtins__"] = {"type": type, "int": int, "str": str, "float": float}  # all the lambdas use
