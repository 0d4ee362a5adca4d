"""OneGate's rules without HTTP: bodies, tokens, reach, restrictions, the rate limit."""
from datetime import datetime, timezone

import pytest

from services.gate import protocol, security
from services.gate.protocol import BadRequest, Forbidden, TooManyRequests, Unauthorized
from services.lifecycle.devices import vm_token

START = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_attributes_are_opennebula_lines_with_quotes_and_comments():
    body = b'# load\nAPP_LOAD = 9.7\nmotd = "say \\"hi\\""\n\nREADY=YES\n'
    assert protocol.parse_attributes(body) == {"APP_LOAD": "9.7", "MOTD": 'say "hi"',
                                               "READY": "YES"}


@pytest.mark.parametrize("body, says", [
    (b"", "no KEY = VALUE line"), (b"A", "expected '='"), (b"A = [ B = 1 ]", "vector values"),
    (b"A = 1\nA = 2", "given more than once"), (b"\xff", "not UTF-8"),
    (b'A = "x', "unterminated string"), (b"A = two words", "quote values"),
])
def test_bad_attribute_bodies_name_the_problem(body, says):
    with pytest.raises(BadRequest, match=says):
        protocol.parse_attributes(body)


def test_names_to_erase_and_the_update_type():
    assert protocol.parse_names(b"load\nREADY ") == ["LOAD", "READY"]
    with pytest.raises(BadRequest, match="name the attribute"):
        protocol.parse_names(b" \n")
    with pytest.raises(BadRequest, match="'a-b' is not an attribute name"):
        protocol.parse_names(b"a-b")
    assert [protocol.update_type(t) for t in (None, "1", "2")] == ["merge", "merge", "erase"]
    with pytest.raises(BadRequest, match="type: must be 1"):
        protocol.update_type("0")


def test_cardinality_and_action_bodies_in_json_or_opennebulas_quoted_form():
    assert protocol.parse_cardinality(b'{"cardinality": 3}') == 3
    assert protocol.parse_cardinality(b"{'cardinality' : 10}") == 10
    assert protocol.parse_action(b"{'action' : {'perform': 'resched'}}") == (
        "resched", "resched", {})
    assert protocol.parse_action(b'{"action": {"perform": "Terminate-Hard"}}') == (
        "terminate-hard", "terminate", {"hard": True})
    for body, says in ((b'{"cardinality": true}', "whole number"), (b"[]", "got list"),
                       (b"__import__('os')", "not a JSON object"),
                       (b'{"action": {"perform": "resched-hard"}}', "unknown action"),
                       (b"[" * 5000, "not a JSON object")):
        with pytest.raises(BadRequest, match=says):
            (protocol.parse_action if b"action" in body else protocol.parse_cardinality)(body)


def test_documents_use_opennebulas_numbers():
    vm = {"id": 7, "name": "web_0", "state": "ACTIVE", "lcm_state": "RUNNING",
          "template": {"SERVICE_ID": "3", "ROLE_NAME": "web", "USER_TEMPLATE": {"READY": "YES"}},
          "nics": [{"id": 0, "ip": "10.0.0.5", "mac": "02:00:0a:00:00:05", "network": "n",
                    "network_id": 1}]}
    doc = protocol.vm_document(vm)["VM"]
    assert (doc["STATE"], doc["LCM_STATE"]) == ("3", "3")
    assert doc["USER_TEMPLATE"] == {"READY": "YES", "SERVICE_ID": "3", "ROLE_NAME": "web"}
    assert doc["TEMPLATE"]["NIC"][0]["IP"] == "10.0.0.5"
    service = protocol.service_document(
        {"id": 3, "name": "s", "state": "RUNNING"},
        [{"id": 1, "name": "web", "state": "HOLD", "cardinality": 1}],
        {1: [{"vm_id": 7, "status": "RUNNING", "name": "web_0"}]})["SERVICE"]
    assert (service["state"], service["roles"][0]["state"]) == (2, 11)
    assert service["roles"][0]["nodes"] == [{"deploy_id": 7, "running": True,
                                             "vm_info": {"VM": {"ID": "7", "NAME": "web_0"}}}]


def test_a_token_is_bound_to_its_vm_its_start_and_the_secret():
    token = vm_token("s3cret", 7, START)
    security.check_token("s3cret", 7, START, token)
    later = START.replace(minute=5)
    for secret, vm_id, started in (("s3cret", 8, START), ("s3cret", 7, later),
                                   ("rotated", 7, START), (None, 7, START)):
        with pytest.raises(Unauthorized):
            security.check_token(secret, vm_id, started, token)


def test_headers_name_what_is_missing():
    with pytest.raises(Unauthorized, match="X-ONEGATE-VMID: missing"):
        security.claimed_vm_id({})
    with pytest.raises(Unauthorized, match="'1; drop' is not a VM id"):
        security.claimed_vm_id({"X-ONEGATE-VMID": "1; drop"})
    with pytest.raises(Unauthorized, match="X-ONEGATE-TOKEN: missing"):
        security.claimed_token({"X-ONEGATE-VMID": "1"})


@pytest.mark.parametrize("raw", ["\u00b3", "\u0663", "1\u00b2"])
def test_digits_that_are_not_ascii_are_no_vm_id(raw):
    """str.isdigit takes "³" (which int() refuses: a 503 before) and "٣"."""
    with pytest.raises(Unauthorized, match="is not a VM id"):
        security.claimed_vm_id({"X-ONEGATE-VMID": raw})
    with pytest.raises(BadRequest, match="is not a VM id"):
        protocol.parse_vm_id(raw, "path")
    with pytest.raises(BadRequest, match="cardinality: must be a whole number"):
        protocol.parse_cardinality(f'{{"cardinality": "{raw}"}}'.encode())


def test_reach_restrictions_and_route_groups():
    settings = security.Settings.from_config({"restricted_attributes": ["secret_key"],
                                              "routes": {"vm_action": False}})
    me = {"id": 1, "service_id": 5}
    security.check_reach(me, 1, None)
    security.check_reach(me, 2, 5)
    for target, service in ((3, 6), (3, None)):
        with pytest.raises(Forbidden, match="not in your service"):
            security.check_reach(me, target, service)
    with pytest.raises(Forbidden, match="not in your service"):
        security.check_reach({"id": 1, "service_id": None}, 2, None)
    with pytest.raises(Forbidden, match="ROLE_NAME, SECRET_KEY"):
        security.check_attributes(settings, ["SECRET_KEY", "ROLE_NAME", "LOAD"])
    security.check_attributes(settings, ["LOAD"])
    with pytest.raises(Forbidden, match="reboot-hard"):
        security.check_action(settings, "reboot-hard")
    with pytest.raises(Forbidden, match="gate.routes.vm_action"):
        security.check_route(settings, "vm_action")
    security.check_route(settings, "vm_read")
    with pytest.raises(ValueError, match="gate.routes.vm_writes: unknown route group"):
        security.Settings.from_config({"routes": {"vm_writes": False}})


def test_the_rate_limit_is_a_bucket_per_vm():
    now = [0.0]
    limiter = security.RateLimiter(rate=2, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take(1)
    with pytest.raises(TooManyRequests) as refused:
        limiter.take(1)
    assert refused.value.headers["Retry-After"] == "1"
    limiter.take(2)                 # another VM's bucket is full
    now[0] = 0.5                    # half a second: one more request's worth
    limiter.take(1)
    with pytest.raises(TooManyRequests):
        limiter.take(1)
    security.RateLimiter(rate=0, burst=1).take(1)   # 0: no limit
