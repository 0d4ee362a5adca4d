"""The VM template parser: OpenNebula syntax, YAML and JSON into one shape."""
import json

import pytest

from cirrus.errors import InvalidArgument
from cirrus.template import MULTI, TemplateError, dumps, is_digits, parse, vm_resources

# As an operator would paste it from OpenNebula: comments, odd spacing, a
# lower-case key, bare and quoted values, a multi-line quoted script.
OPENNEBULA_TEMPLATE = r'''# Web server, exported from OpenNebula 6.8
NAME   = "web-01"
CPU    = 0.5
VCPU   = 2
MEMORY = 1024

DISK = [
  IMAGE       = "ubuntu-22.04",
  IMAGE_UNAME = "oneadmin" ]
DISK = [ TYPE = "swap", SIZE = 1024 ]   # swap

NIC = [ NETWORK = "public", network_uname = oneadmin,
        SECURITY_GROUPS = "0" ]

OS       = [ ARCH = x86_64, BOOT = "disk0" ]
GRAPHICS = [ LISTEN = 0.0.0.0, TYPE = VNC ]

CONTEXT = [
  NETWORK        = "YES",
  SSH_PUBLIC_KEY = "$USER[SSH_PUBLIC_KEY]",
  START_SCRIPT   = "#!/bin/sh
echo \"hello, world\" > /etc/motd
sed -i 's/a\\b/c/' /etc/hosts" ]

sched_requirements = "HYPERVISOR = \"kvm\""
'''

EXPECTED = {
    "NAME": "web-01",
    "CPU": "0.5",
    "VCPU": "2",
    "MEMORY": "1024",
    "DISK": [
        {"IMAGE": "ubuntu-22.04", "IMAGE_UNAME": "oneadmin"},
        {"TYPE": "swap", "SIZE": "1024"},
    ],
    "NIC": [{"NETWORK": "public", "NETWORK_UNAME": "oneadmin", "SECURITY_GROUPS": "0"}],
    "OS": {"ARCH": "x86_64", "BOOT": "disk0"},
    "GRAPHICS": {"LISTEN": "0.0.0.0", "TYPE": "VNC"},
    "CONTEXT": {
        "NETWORK": "YES",
        "SSH_PUBLIC_KEY": "$USER[SSH_PUBLIC_KEY]",
        "START_SCRIPT": '#!/bin/sh\necho "hello, world" > /etc/motd\nsed -i \'s/a\\b/c/\' /etc/hosts',
    },
    "SCHED_REQUIREMENTS": 'HYPERVISOR = "kvm"',
}

YAML_TEMPLATE = r'''# Web server
NAME: web-01
CPU: 0.5
VCPU: 2
MEMORY: 1024
DISK:
  - IMAGE: ubuntu-22.04
    image_uname: oneadmin
  - {TYPE: swap, SIZE: 1024}
NIC:                    # given once, still a list: NIC is in MULTI
  NETWORK: public
  NETWORK_UNAME: oneadmin
  SECURITY_GROUPS: "0"
OS: {ARCH: x86_64, BOOT: disk0}
GRAPHICS: {LISTEN: 0.0.0.0, TYPE: VNC}
CONTEXT:
  NETWORK: YES
  SSH_PUBLIC_KEY: $USER[SSH_PUBLIC_KEY]
  START_SCRIPT: |-
    #!/bin/sh
    echo "hello, world" > /etc/motd
    sed -i 's/a\b/c/' /etc/hosts
sched_requirements: HYPERVISOR = "kvm"
'''

JSON_TEMPLATE = json.dumps({
    "NAME": "web-01", "CPU": 0.5, "VCPU": 2, "memory": 1024,
    "DISK": [{"IMAGE": "ubuntu-22.04", "IMAGE_UNAME": "oneadmin"}, {"TYPE": "swap", "SIZE": 1024}],
    "NIC": {"NETWORK": "public", "NETWORK_UNAME": "oneadmin", "SECURITY_GROUPS": 0},
    "OS": {"ARCH": "x86_64", "BOOT": "disk0"},
    "GRAPHICS": {"LISTEN": "0.0.0.0", "TYPE": "VNC"},
    "CONTEXT": EXPECTED["CONTEXT"],
    "SCHED_REQUIREMENTS": 'HYPERVISOR = "kvm"',
}, indent=2)


# ------------------------------------------------------------------ reading

def test_a_pasted_opennebula_template():
    assert parse(OPENNEBULA_TEMPLATE) == EXPECTED


def test_yaml_and_json_give_the_same_dict():
    assert parse(YAML_TEMPLATE) == EXPECTED
    assert parse(JSON_TEMPLATE) == EXPECTED


def test_multi_keys_are_lists_and_other_repeated_keys_become_lists():
    template = parse('DISK = [ IMAGE = a ]\nFEATURE = x\nFEATURE = "y"\nNAME = n\nPCI = [ VENDOR = 1 ]')
    assert template == {"DISK": [{"IMAGE": "a"}], "FEATURE": ["x", "y"], "NAME": "n",
                        "PCI": [{"VENDOR": "1"}]}
    assert MULTI == {"DISK", "NIC", "NIC_ALIAS", "PCI", "SCHED_ACTION", "SNAPSHOT"}


def test_keys_are_case_insensitive_so_differently_cased_keys_repeat():
    assert parse("label = a\nLabel = b") == {"LABEL": ["a", "b"]}


def test_empty_values_vectors_and_templates():
    assert parse("") == {}
    assert parse("# only a comment\n\n") == {}
    assert parse("DESCRIPTION =\nCPU = 1") == {"DESCRIPTION": "", "CPU": "1"}
    assert parse('EMPTY = ""\nOS = [ ]') == {"EMPTY": "", "OS": {}}


def test_quoted_strings_unescape_only_quote_and_backslash():
    assert parse(r'A = "say \"hi\" \\ C:\temp\n"') == {"A": 'say "hi" \\ C:\\temp\\n'}


def test_a_yaml_empty_list_is_the_same_as_no_key_and_a_single_item_list_is_one_value():
    assert parse("DISK: []\nCPU: [1]\nNAME: x") == {"CPU": "1", "NAME": "x"}


def test_yaml_scalars_keep_the_text_written():
    assert parse("CPU: 0.50\nNETWORK: yes\nMAC: 02:00:0a:00:00:01\nEMPTY:") == {
        "CPU": "0.50", "NETWORK": "yes", "MAC": "02:00:0a:00:00:01", "EMPTY": ""}


def test_json_literals():
    assert parse('{"A": true, "B": false, "C": null, "D": 1.50}') == {
        "A": "true", "B": "false", "C": "", "D": "1.50"}


def test_detection_looks_at_the_first_significant_line():
    # A comment and a blank line before a YAML mapping: still YAML.
    assert parse("# c\n\nCPU: 1") == {"CPU": "1"}
    # A quoted value containing ': ' does not make OpenNebula syntax YAML.
    assert parse('NAME = "web: 1"') == {"NAME": "web: 1"}


# ------------------------------------------------------------------- errors

def error_of(text, **kwargs):
    with pytest.raises(TemplateError) as caught:
        parse(text, **kwargs)
    return caught.value


@pytest.mark.parametrize("text, line, column, message", [
    ('NAME = "web"\nCPU = 1\nDISK    [ IMAGE = "x" ]', 3, 9, "expected '=' after DISK, found '['"),
    ('CPU = 1\nNAME = "web\nMEMORY = 512\n', 2, 8, "unterminated string"),
    ('DISK = [\n  IMAGE = "x",\n  SIZE = 10\n', 1, 8, "the '[' of DISK is never closed"),
    ('DISK = [ IMAGE = "x"\nNIC = [ NETWORK = "n" ]', 2, 1,
     "expected ',' or ']' in the DISK vector opened at line 1, column 8, found 'NIC'"),
    ("CPU = 1\nMEM-ORY = 512", 2, 4, "invalid character '-' in key 'MEM-ORY'"),
    ('DISK = [ IMAGE = "x", size = 1,\n  Image = "y" ]', 2, 3, "duplicate key IMAGE in the DISK vector"),
    ("NAME = my vm", 1, 11, "expected the end of the line after the value of NAME, found 'vm'"),
    ("CPU\n= 1", 1, 4, "expected '=' after CPU, found the end of the line"),
    ("OS = [ ARCH = [ X = 1 ] ]", 1, 15, "OS.ARCH: vectors cannot be nested"),
    ("OS = [ ARCH = , BOOT = disk0 ]", 1, 15, "expected a value for OS.ARCH, found ','"),
    ("OS = [ ARCH = x86_64, ]", 1, 23, "expected a key, found ']'"),
    ("CPU = 1\n= 2", 2, 1, "expected a key, found '='"),
])
def test_opennebula_syntax_errors_name_line_and_column(text, line, column, message):
    error = error_of(text)
    assert (error.line, error.column) == (line, column)
    assert message in error.message
    assert str(error).startswith(f"line {line}, column {column}: ")
    assert isinstance(error, InvalidArgument)


def test_the_error_string_reads_as_one_sentence():
    error = error_of('NAME = "web"\nCPU = 1\nDISK    [ IMAGE = "x" ]')
    assert str(error) == "line 3, column 9: expected '=' after DISK, found '['"


def test_json_errors_take_line_and_column_from_the_json_parser():
    error = error_of('{\n  "CPU": 1,\n  "MEMORY": \n}')
    assert (error.line, error.column) == (4, 1)
    assert "invalid JSON" in str(error)


def test_yaml_errors_take_line_and_column_from_the_yaml_parser():
    error = error_of("CPU: 1\nDISK:\n  - IMAGE: x\n   SIZE: 1\n")
    assert error.line == 4
    assert error.column is not None
    assert str(error).startswith("line 4, column ")
    assert "invalid YAML" in str(error)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "a template must be a mapping of keys to values, not a list"),
    ("- CPU: 1", "a template must be a mapping of keys to values, not a list"),
    ("---\n", "a template must be a mapping of keys to values, not nothing"),
    ("DISK:\n  - [a, b]", "DISK: a list holds values or vectors, not lists"),
    ("OS:\n  ARCH: {X: 1}", "OS.ARCH: a vector holds single values, not a mapping"),
    ("OS:\n  arch: x\n  ARCH: y", "duplicate key ARCH in the OS vector"),
    ('{"MEM ORY": 1}', "invalid character ' ' in key 'MEM ORY'"),
])
def test_yaml_and_json_that_do_not_make_a_template(text, message):
    error = error_of(text)
    assert error.message.startswith(message)
    assert error.line is None  # a problem of structure, not of syntax: the message names the key


def test_text_over_the_size_limit_is_refused_with_size_and_limit():
    text = 'CONTEXT = [ NOTE = "' + "é" * 60 + '" ]'  # 2 UTF-8 bytes per é
    size = len(text.encode("utf-8"))
    assert parse(text, max_bytes=size)["CONTEXT"]["NOTE"] == "é" * 60
    error = error_of(text, max_bytes=size - 1)
    assert str(error) == f"template is {size} bytes, over the limit of {size - 1} bytes"


def test_the_default_limit_is_64_kib():
    assert "over the limit of 65536 bytes" in str(error_of("A = " + "x" * 65536))


# --------------------------------------------------------------- round trip

@pytest.mark.parametrize("template", [
    EXPECTED,
    {},
    {"EMPTY": "", "OS": {}},
    {"TRICKY": 'quotes " and \\" backslashes \\ \\\\ # hash , comma ] [ = equals',
     "LINES": "one\ntwo\r\nthree\n", "SPACES": "  padded  "},
    {"V": {"A": "", "B": "x y", "C": '"'}, "NIC": [{"NETWORK": "a"}, {"NETWORK": "b"}]},
    {"MIXED": ["plain", {"A": "1"}], "SNAPSHOT": [{"NAME": "s1"}]},
    {"UNICODE": "héllo wörld ✓"},
])
def test_dumps_round_trips(template):
    assert parse(dumps(template)) == template


def test_dumps_renders_opennebula_syntax():
    text = dumps({"CPU": "1", "DISK": [{"IMAGE": "a", "SIZE": "2"}, {"IMAGE": 'b"c'}]})
    assert text == 'CPU="1"\nDISK=[ IMAGE="a", SIZE="2" ]\nDISK=[ IMAGE="b\\"c" ]\n'


def test_dumps_normalises_a_loose_dict_and_refuses_a_bad_key():
    assert parse(dumps({"cpu": 1, "nic": {"network": "n"}})) == {"CPU": "1", "NIC": [{"NETWORK": "n"}]}
    with pytest.raises(TemplateError, match="invalid character '-' in key 'BAD-KEY'"):
        dumps({"BAD-KEY": "1"})


# ------------------------------------------------------------ vm_resources

def test_vm_resources_of_a_template():
    assert vm_resources(parse(OPENNEBULA_TEMPLATE)) == dict(name="web-01", cpu=0.5, vcpu=2, memory=1024)


def test_vm_resources_defaults_cpu_vcpu_and_name():
    assert vm_resources({"MEMORY": "512"}) == dict(name=None, cpu=1.0, vcpu=1, memory=512)


@pytest.mark.parametrize("template, message", [
    ({}, "MEMORY is required (in MB)"),
    ({"MEMORY": "0"}, "MEMORY must be a whole number of MB greater than 0, got '0'"),
    ({"MEMORY": "-5"}, "MEMORY must be a whole number of MB greater than 0, got '-5'"),
    ({"MEMORY": "1.5"}, "MEMORY must be a whole number of MB greater than 0, got '1.5'"),
    ({"MEMORY": "lots"}, "MEMORY must be a whole number of MB greater than 0, got 'lots'"),
    ({"MEMORY": "512", "CPU": "0"}, "CPU must be a number greater than 0, got '0'"),
    ({"MEMORY": "512", "CPU": "-1"}, "CPU must be a number greater than 0, got '-1'"),
    ({"MEMORY": "512", "CPU": "fast"}, "CPU must be a number greater than 0, got 'fast'"),
    ({"MEMORY": "512", "CPU": "nan"}, "CPU must be a number greater than 0, got 'nan'"),
    ({"MEMORY": "512", "VCPU": "0"}, "VCPU must be a whole number greater than 0, got '0'"),
    ({"MEMORY": "512", "VCPU": "2.5"}, "VCPU must be a whole number greater than 0, got '2.5'"),
    ({"MEMORY": ["512", "1024"]}, "MEMORY must be a single value, but it is given more than once"),
    ({"MEMORY": "512", "CPU": {"X": "1"}}, "CPU must be a single value, but it is a vector"),
])
def test_vm_resources_names_what_is_wrong(template, message):
    with pytest.raises(InvalidArgument) as caught:
        vm_resources(template)
    assert str(caught.value) == message


@pytest.mark.parametrize("text, digits", [
    ("0", True), ("42", True), ("", False), ("-1", False), (" 1", False), ("1.0", False),
    ("\u00b3", False), ("\u0663", False), ("\uff11", False)])
def test_is_digits_takes_ascii_digits_only(text, digits):
    assert is_digits(text) is digits
