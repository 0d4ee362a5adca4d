"""Service templates: the JSON Schema and the rules beyond it, custom
attributes and networks at instantiate, the VM template a role makes, and
the order of roles (services/flow/templates.py)."""
import json
from pathlib import Path

import pytest

from cirrus.errors import InvalidArgument
from services.flow import templates

HERE = Path(__file__).parent / "flow_templates"


def role(name, parents=(), **more):
    return {"name": name, "vm_template_contents": "MEMORY = 64", "parents": list(parents),
            **more}


def refused(body):
    with pytest.raises(InvalidArgument) as err:
        templates.validate(body)
    return str(err.value)


def test_an_opennebula_template_loads_unchanged_with_its_unknown_keys():
    text = (HERE / "opennebula_wordpress.json").read_text()
    body = templates.validate(text)
    assert body == json.loads(text)
    assert body["logo"] == "images/logos/wordpress.png"


@pytest.mark.parametrize("body, message", [
    ([], "service template must be a JSON object, got list"),
    ({"roles": [role("a")]}, "(template): 'name' is a required property"),
    ({"name": "s", "roles": []}, "roles: [] should be non-empty"),
    ({"name": "s", "deployment": "parallel", "roles": [role("a")]},
     "deployment: 'parallel' is not one of ['none', 'straight']"),
    ({"name": "s", "roles": [{"name": "a"}]},
     "roles/0: a role needs vm_template (a VM template id) or vm_template_contents"),
    ({"name": "s", "roles": [role("a b")]}, "roles/0/name: 'a b' must be letters, digits and _"),
    ({"name": "s", "roles": [role("a", cardinality="2")]},
     "roles/0/cardinality: '2' is not of type 'integer'"),
    ({"name": "s", "roles": [role("a", shutdown_action="halt")]},
     "roles/0/shutdown_action: 'halt' is not one of"),
    ({"name": "s", "roles": [role("a", elasticity_policies=[{"type": "CHANGE"}])]},
     "roles/0/elasticity_policies/0: 'adjust' is a required property"),
    ({"name": "s", "roles": [role("a", scheduled_policies=[{"type": "CHANGE", "adjust": 1}])]},
     "roles/0/scheduled_policies/0: a scheduled policy needs start_time or recurrence"),
    ({"name": "s", "custom_attrs": {"A": "text"}, "roles": [role("a")]},
     "custom_attrs/A: 'text' must look like \"M|type|description|options|default\""),
    ({"name": "s", "roles": [role("a"), role("a")]}, "roles/1/name: role 'a' is defined twice"),
    ({"name": "s", "roles": [role("a", ["b"])]}, "roles/0/parents: no role named 'b'"),
    ({"name": "s", "roles": [role("a", cardinality=5, max_vms=3)]},
     "roles/0/cardinality: 5 is more than max_vms 3"),
    ({"name": "s", "roles": [role("a", min_vms=1, max_vms=2, elasticity_policies=[
        {"type": "CHANGE", "adjust": 1, "expression": "CPU >"}])]},
     "roles/0/elasticity_policies/0/expression: expected a number"),
    ({"name": "s", "roles": [role("a", scheduled_policies=[
        {"type": "CHANGE", "adjust": 1, "recurrence": "every day"}])]},
     "roles/0/scheduled_policies/0/recurrence: 'every day' is not a cron expression"),
    ({"name": "s", "roles": [role("a", vm_template_contents="MEMORY = [")]},
     "roles/0/vm_template_contents: line 1"),
    ({"name": "s", "roles": [role("a", ["c"]), role("b", ["a"]), role("c", ["b"])]},
     "roles: parents make a cycle: a -> c -> b -> a"),
])
def test_a_bad_template_is_refused_naming_the_path_of_the_field(body, message):
    assert message in refused(body)


def test_several_problems_are_listed_together():
    text = refused({"name": "s", "roles": [role("a", cardinality=-1, min_vms=-2)]})
    assert "roles/0/cardinality: -1 is less than the minimum of 0" in text
    assert "roles/0/min_vms: -2 is less than the minimum of 0" in text


def test_deploy_order_puts_parents_first_in_a_diamond():
    roles = [role("front", ["left", "right"]), role("left", ["db"]), role("right", ["db"]),
             role("db")]
    order = templates.deploy_order(roles)
    assert order[0] == "db" and order[-1] == "front"
    assert set(order[1:3]) == {"left", "right"}
    assert templates.children(roles) == {"front": [], "left": ["front"], "right": ["front"],
                                         "db": ["left", "right"]}


def test_custom_attribute_values_defaults_types_and_the_missing_mandatory_ones():
    body = {"custom_attrs": {"A": "M|text|a||", "B": "M|number|b||", "C": "O|text|c||dflt",
                             "D": "O|list|d|x,y|", "E": "O|range|e|1..5|"},
            "custom_attrs_values": {"B": "3"}}
    assert templates.custom_attr_values(body, {"A": "hi", "D": "y", "E": 2}) == \
        {"A": "hi", "B": "3", "C": "dflt", "D": "y", "E": "2"}
    with pytest.raises(InvalidArgument, match="without a value: A$"):
        templates.custom_attr_values(body, {})
    with pytest.raises(InvalidArgument, match="custom_attrs/D: z is not one of x, y"):
        templates.custom_attr_values(body, {"A": "1", "D": "z"})
    with pytest.raises(InvalidArgument, match="custom_attrs/E: 9.0 is outside 1..5|9 is outside"):
        templates.custom_attr_values(body, {"A": "1", "E": "9"})
    with pytest.raises(InvalidArgument, match="unknown attribute.*Z"):
        templates.custom_attr_values(body, {"A": "1", "Z": "1"})


def test_network_values_take_ids_and_refuse_what_cirrus_cannot_make():
    body = {"networks": {"Public": "M|network|p||id:", "Private": "O|network|q||id:7"}}
    assert templates.network_values(body, {"Public": {"id": "3"}}) == {"Public": 3, "Private": 7}
    with pytest.raises(InvalidArgument, match="without a value: Public"):
        templates.network_values(body, {})
    with pytest.raises(InvalidArgument, match="networks/Public: only an existing network id"):
        templates.network_values(body, {"Public": {"template_id": 2}})


def test_a_roles_vm_gets_the_service_role_and_attributes_in_its_context():
    spec = {"name": "web", "vm_template_contents":
            'CPU = 0.5\nNIC = [ NETWORK_ID = "$Public" ]\nCONTEXT = [ GREETING = "$TITLE" ]'}
    made = templates.vm_template_for(spec, {"MEMORY": "128", "CPU": "1"}, 42,
                                     {"TITLE": "hello"}, {"Public": 3})
    assert made["MEMORY"] == "128" and made["CPU"] == "0.5"
    assert made["NIC"] == [{"NETWORK_ID": "3"}]
    assert made["CONTEXT"] == {"GREETING": "hello", "SERVICE_ID": "42", "ROLE_NAME": "web",
                               "TITLE": "hello"}
    assert (made["SERVICE_ID"], made["ROLE_NAME"]) == ("42", "web")


@pytest.mark.parametrize("role, message", [
    ({"name": "db", "vm_template_contents": "CPU = 1"}, "role: name: role 'db' is defined twice"),
    ({"name": "web", "parents": ["nope"], "vm_template_contents": "CPU = 1"},
     "role: parents: no role named 'nope'"),
    ({"name": "web", "cardinality": -1, "vm_template_contents": "CPU = 1"},
     "role: cardinality: -1 is less than the minimum of 0"),
    ({"name": "web"}, "role: a role needs vm_template"),
    ('{"name": ', "role is not JSON: Expecting value"),
    ('["web"]', "role must be a JSON object, got list"),
])
def test_a_role_to_add_is_named_by_its_own_path(role, message):
    body = {"name": "svc", "roles": [{"name": "db", "vm_template_contents": "CPU = 1"}]}
    with pytest.raises(InvalidArgument) as err:
        templates.validate_added_role(body, role)
    assert str(err.value).startswith(message)


def test_a_role_to_add_comes_back_as_given_from_json_text():
    body = {"name": "svc", "roles": [{"name": "db", "vm_template_contents": "CPU = 1"}]}
    text = '{"name": "web", "parents": ["db"], "vm_template_contents": "CPU = 1", "x": [1]}'
    assert templates.validate_added_role(body, text) == json.loads(text)
