"""VM templates: OpenNebula's template syntax, YAML or JSON, read into one shape.

The shape is a dict of upper-case keys. Each value is
  - a string (OpenNebula values are strings: ``CPU = 1`` gives ``"1"``),
  - a vector: a dict of upper-case keys to strings (``DISK = [ IMAGE = "x" ]``),
  - or a list of those. The keys in MULTI are always lists, even when given
    once; any other key given more than once becomes a list too; a key given
    once is a single value.

Which syntax a text is in (the first significant line is the first one that is
neither blank nor a ``#`` comment):
  - JSON when that line starts with ``{`` (or ``[``, which is then refused as
    not a mapping). A YAML flow mapping ``{a: 1}`` is therefore read as JSON.
  - YAML when that line is ``---``, a ``- item``, or ``key: value``.
  - OpenNebula otherwise. Its lines are ``KEY = VALUE``, and ``=`` is never
    part of a key, so no OpenNebula line looks like ``key:``.

OpenNebula syntax, as read here:
  - ``KEY = VALUE``: VALUE is a bare word (anything but blanks and ``=#,[]"``)
    or a "double quoted" string, which may span lines; inside it ``\\"`` is a
    quote and ``\\\\`` a backslash, any other backslash is kept as it is.
    ``KEY =`` with nothing after it is an empty value.
  - ``KEY = [ A = "b", C = 1 ]``: a vector, with commas between pairs and
    newlines allowed anywhere inside the brackets. Vectors do not nest.
  - ``#`` starts a comment up to the end of the line (outside strings).
  - Keys are letters, digits and ``_``, case-insensitive, stored upper case.
  - Where this is stricter than OpenNebula, for clearer errors: each attribute
    ends its line (OpenNebula would take ``CPU=1 MEMORY=2`` on one line, and
    reads ``NAME = my vm`` as a confusing error), and a key repeated inside one
    vector is refused (OpenNebula silently keeps the first).

In YAML and JSON, a scalar becomes the text it was written as (YAML is read
without implicit typing, so ``CPU: 0.50`` gives ``"0.50"`` and ``NETWORK: YES``
gives ``"YES"``; JSON numbers keep their text, true/false give "true"/"false",
and null gives ""). A mapping is a vector, a list holds repeated values, and an
empty list is the same as leaving the key out.
"""
import json
import math
import re
from dataclasses import dataclass

import yaml

from cirrus.errors import InvalidArgument

# Keys that are lists even when a template gives them once.
MULTI = frozenset({"DISK", "NIC", "NIC_ALIAS", "PCI", "SCHED_ACTION", "SNAPSHOT"})

_BAD_KEY_CHAR = re.compile(r"[^A-Za-z0-9_]")
_BARE_WORD = re.compile(r'[^\s=#,\[\]"]+')
_PUNCTUATION = {"=": "EQUALS", ",": "COMMA", "[": "OPEN", "]": "CLOSE"}
_YAML_FIRST_LINE = re.compile(r"""---|-(\s|$)|("[^"]*"|'[^']*'|[^\s=#"'\[\]{},:]+)\s*:(\s|$)""")


class TemplateError(InvalidArgument):
    """A template that cannot be read. ``line`` and ``column`` (1-based) point
    at the problem when it has a place in the text; str() starts with them."""

    def __init__(self, message, line=None, column=None):
        self.message, self.line, self.column = message, line, column
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(where + message)


def parse(text, max_bytes=65536):
    """Read a template in OpenNebula syntax, YAML or JSON (see the module
    docstring) into its normalised dict; raises TemplateError."""
    if not isinstance(text, str):
        raise TemplateError(f"a template must be text, got {type(text).__name__}")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise TemplateError(f"template is {size} bytes, over the limit of {max_bytes} bytes")
    text = text.removeprefix("\ufeff")
    syntax = _syntax_of(text)
    if syntax == "json":
        pairs = _pairs_of_data(_load_json(text))
    elif syntax == "yaml":
        pairs = _pairs_of_data(_load_yaml(text))
    else:
        pairs = _Parser(text).template()
    return _group(pairs)


def dumps(template):
    """Render a template dict in OpenNebula syntax; parse(dumps(t)) == t for
    any normalised t. Other dicts are normalised first, as YAML/JSON would be."""
    lines = []
    for key, value in _pairs_of_data(template):
        if isinstance(value, dict):
            pairs = ", ".join(f"{name}={_quote(item)}" for name, item in value.items())
            lines.append(f"{key}=[ {pairs} ]" if pairs else f"{key}=[ ]")
        else:
            lines.append(f"{key}={_quote(value)}")
    return "".join(line + "\n" for line in lines)


def vm_resources(template):
    """NAME, CPU, VCPU and MEMORY (MB) of a parsed template, checked:
    ``dict(name=str|None, cpu=float, vcpu=int, memory=int)``.

    MEMORY is required. CPU defaults to 1 when missing: OpenNebula requires
    it, Cirrus is lenient. VCPU defaults to 1. Raises InvalidArgument naming
    the attribute that is wrong.
    """
    name = _single_value(template, "NAME")
    cpu_text = _single_value(template, "CPU")
    vcpu_text = _single_value(template, "VCPU")
    memory_text = _single_value(template, "MEMORY")

    if memory_text is None:
        raise InvalidArgument("MEMORY is required (in MB)")
    memory = _positive_int(memory_text)
    if memory is None:
        raise InvalidArgument(f"MEMORY must be a whole number of MB greater than 0, got {memory_text!r}")

    cpu = 1.0
    if cpu_text is not None:
        try:
            cpu = float(cpu_text)
        except ValueError:
            cpu = math.nan
        if not (math.isfinite(cpu) and cpu > 0):
            raise InvalidArgument(f"CPU must be a number greater than 0, got {cpu_text!r}")

    vcpu = 1
    if vcpu_text is not None:
        vcpu = _positive_int(vcpu_text)
        if vcpu is None:
            raise InvalidArgument(f"VCPU must be a whole number greater than 0, got {vcpu_text!r}")

    return dict(name=name, cpu=cpu, vcpu=vcpu, memory=memory)


# ------------------------------------------------------------ shared helpers

def _syntax_of(text):
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line[0] in "{[":
            return "json"
        return "yaml" if _YAML_FIRST_LINE.match(line) else "opennebula"
    return "opennebula"  # blank, or only comments: an empty template


def _group(pairs):
    """(key, value) pairs in template order -> the normalised dict."""
    values_by_key = {}
    for key, value in pairs:
        values_by_key.setdefault(key, []).append(value)
    return {key: values if key in MULTI or len(values) > 1 else values[0]
            for key, values in values_by_key.items()}


def _key_problem(key):
    """Why ``key`` is not a valid key, or None when it is."""
    if not isinstance(key, str) or not key:
        return f"invalid key {key!r}: keys are letters, digits and '_'"
    bad = _BAD_KEY_CHAR.search(key)
    if bad:
        return f"invalid character {bad.group()!r} in key {key!r}: keys are letters, digits and '_'"
    return None


def _quote(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _single_value(template, key):
    value = template.get(key)
    if value is not None and not isinstance(value, str):
        kind = "a vector" if isinstance(value, dict) else "given more than once"
        raise InvalidArgument(f"{key} must be a single value, but it is {kind}")
    return value


def is_digits(text):
    """Whether ``text`` is a whole number in ASCII digits. str.isdigit alone
    also takes "³", which int() refuses, and "٣", which it reads as 3: an id
    or a size from a user is neither."""
    return text.isascii() and text.isdigit()


def _positive_int(text):
    text = text.strip()
    if is_digits(text) and int(text) > 0:
        return int(text)
    return None


# ---------------------------------------------------------------- YAML, JSON

def _load_json(text):
    try:
        # Numbers keep the text they were written as, like every other value.
        return json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"invalid JSON: {exc.msg}", exc.lineno, exc.colno) from None


def _load_yaml(text):
    try:
        # BaseLoader: no implicit types, so every scalar stays the text written.
        return yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if mark is None:
            raise TemplateError(f"invalid YAML: {problem}") from None
        raise TemplateError(f"invalid YAML: {problem}", mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"invalid YAML: {exc}") from None


def _pairs_of_data(data):
    """Loaded YAML/JSON (or a template dict) -> normalised (key, value) pairs."""
    if not isinstance(data, dict):
        raise TemplateError(f"a template must be a mapping of keys to values, not {_kind(data)}")
    pairs = []
    for raw_key, value in data.items():
        key = _checked_key(raw_key, "")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                pairs.append((key, _vector_of_data(key, item)))
            elif isinstance(item, list):
                raise TemplateError(f"{key}: a list holds values or vectors, not lists")
            else:
                pairs.append((key, _scalar_text(item)))
    return pairs


def _vector_of_data(key, mapping):
    vector = {}
    for raw_name, value in mapping.items():
        name = _checked_key(raw_name, f"{key}.")
        if name in vector:
            raise TemplateError(f"duplicate key {name} in the {key} vector")
        if isinstance(value, (dict, list)):
            raise TemplateError(f"{key}.{name}: a vector holds single values, not {_kind(value)}")
        vector[name] = _scalar_text(value)
    return vector


def _checked_key(key, prefix):
    problem = _key_problem(key)
    if problem:
        raise TemplateError(prefix + problem if prefix else problem)
    return key.upper()


def _scalar_text(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _kind(value):
    if value is None or value == "":  # YAML's BaseLoader reads an empty document as ""
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a single value ({value!r})"


# ------------------------------------------------------------- OpenNebula

@dataclass(frozen=True)
class _Token:
    kind: str    # WORD, STRING, EQUALS, COMMA, OPEN, CLOSE, NEWLINE or END
    text: str    # the word, the string's value (unescaped) or the punctuation
    offset: int  # where it starts in the text

    def describe(self):
        if self.kind == "WORD":
            return repr(self.text)
        if self.kind == "STRING":
            return "a quoted string"
        if self.kind == "NEWLINE":
            return "the end of the line"
        if self.kind == "END":
            return "the end of the text"
        return f"'{self.text}'"


def _position(text, offset):
    """1-based (line, column) of a character offset."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def _tokenize(text):
    tokens = []
    at = 0
    while at < len(text):
        char = text[at]
        if char == "\n":
            tokens.append(_Token("NEWLINE", char, at))
            at += 1
        elif char.isspace():
            at += 1
        elif char == "#":
            end = text.find("\n", at)
            at = len(text) if end < 0 else end
        elif char in _PUNCTUATION:
            tokens.append(_Token(_PUNCTUATION[char], char, at))
            at += 1
        elif char == '"':
            value, end = _read_string(text, at)
            tokens.append(_Token("STRING", value, at))
            at = end
        else:
            word = _BARE_WORD.match(text, at).group()
            tokens.append(_Token("WORD", word, at))
            at += len(word)
    tokens.append(_Token("END", "", len(text)))
    return tokens


def _read_string(text, start):
    """The value of the string whose opening quote is at ``start``, and the
    offset just past its closing quote."""
    chars = []
    at = start + 1
    while at < len(text):
        char = text[at]
        if char == '"':
            return "".join(chars), at + 1
        if char == "\\" and text[at + 1:at + 2] in ('"', "\\"):
            chars.append(text[at + 1])
            at += 2
        else:
            chars.append(char)
            at += 1
    line, column = _position(text, start)
    raise TemplateError("unterminated string: the '\"' here is never closed", line, column)


class _Parser:
    """Recursive descent over the tokens:

        template := { NEWLINE } { attribute ( NEWLINE | END ) { NEWLINE } }
        attribute := KEY "=" ( "[" vector "]" | value | <nothing> )
        vector := [ KEY "=" value { "," KEY "=" value } ]   (newlines ignored)
        value := WORD | STRING
    """

    def __init__(self, text):
        self.text = text
        self.tokens = _tokenize(text)
        self.at = 0

    def template(self):
        pairs = []
        while True:
            self.skip_newlines()
            token = self.take()
            if token.kind == "END":
                return pairs
            key = self.key(token)
            pairs.append((key, self.attribute_value(key)))
            after = self.take()
            if after.kind == "END":
                return pairs
            if after.kind != "NEWLINE":
                self.fail(after, f"expected the end of the line after the value of {key}, "
                                 f"found {after.describe()} (quote values that contain spaces)")

    def attribute_value(self, key):
        equals = self.take()
        if equals.kind != "EQUALS":
            self.fail(equals, f"expected '=' after {key}, found {equals.describe()}")
        if self.peek().kind in ("NEWLINE", "END"):
            return ""  # "KEY =" alone on its line: an empty value, as in OpenNebula
        token = self.take()
        if token.kind == "OPEN":
            return self.vector(key, token)
        return self.value(key, token)

    def vector(self, key, opening):
        vector = {}
        if self.take_in_vector(key, opening, peek=True).kind == "CLOSE":
            self.take()
            return vector
        while True:
            token = self.take_in_vector(key, opening)
            name = self.key(token)
            if name in vector:
                self.fail(token, f"duplicate key {name} in the {key} vector")
            equals = self.take_in_vector(key, opening)
            if equals.kind != "EQUALS":
                self.fail(equals, f"expected '=' after {key}.{name}, found {equals.describe()}")
            token = self.take_in_vector(key, opening)
            if token.kind == "OPEN":
                self.fail(token, f"{key}.{name}: vectors cannot be nested")
            vector[name] = self.value(f"{key}.{name}", token)
            separator = self.take_in_vector(key, opening)
            if separator.kind == "CLOSE":
                return vector
            if separator.kind != "COMMA":
                line, column = _position(self.text, opening.offset)
                self.fail(separator, f"expected ',' or ']' in the {key} vector opened at line {line}, "
                                     f"column {column}, found {separator.describe()}")

    def take_in_vector(self, key, opening, peek=False):
        """The next token inside brackets, where newlines do not count; the
        end of the text there means the bracket was never closed."""
        self.skip_newlines()
        token = self.peek() if peek else self.take()
        if token.kind == "END":
            self.fail(opening, f"the '[' of {key} is never closed")
        return token

    def key(self, token):
        if token.kind != "WORD":
            self.fail(token, f"expected a key, found {token.describe()}")
        bad = _BAD_KEY_CHAR.search(token.text)
        if bad:
            self.fail(token, _key_problem(token.text), token.offset + bad.start())
        return token.text.upper()

    def value(self, name, token):
        if token.kind not in ("WORD", "STRING"):
            self.fail(token, f"expected a value for {name}, found {token.describe()}")
        return token.text

    def peek(self):
        return self.tokens[self.at]

    def take(self):
        token = self.tokens[self.at]
        if token.kind != "END":
            self.at += 1
        return token

    def skip_newlines(self):
        while self.peek().kind == "NEWLINE":
            self.at += 1

    def fail(self, token, message, offset=None):
        line, column = _position(self.text, token.offset if offset is None else offset)
        raise TemplateError(message, line, column)
