"""The gate against its OpenAPI document (services/gate/openapi.yaml) with
schemathesis: fuzzed paths, queries, headers and bodies, on a running
cirrus-gate. No answer is a 5xx, and every answer's status, content type
and body are the ones the document gives.

Each case is sent as generated (fuzzed X-ONEGATE-* headers: the token
check) and again with a real VM's headers (the body and parameter
parsers). The routes that call flow or lifecycle (a scale, a VM action)
get only the first: no flow or lifecycle process runs here."""
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_schema_conformance,
                                               status_code_conformance)
from schemathesis.checks import not_a_server_error

from tests.integration.test_gate_api import gate, world  # noqa: F401  (fixtures)

DOCUMENT = Path(__file__).resolve().parents[2] / "services" / "gate" / "openapi.yaml"
schema = schemathesis.openapi.from_path(DOCUMENT)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
REMOTE = ("/vms/{id}/action", "/service/role/{role}")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_document(case, gate, world):  # noqa: F811
    case.call_and_validate(base_url=gate, checks=CHECKS)
    if case.path in REMOTE:
        return
    vm_id = world["ids"]["c1"]
    case.call_and_validate(base_url=gate, checks=CHECKS, headers={
        "X-ONEGATE-VMID": str(vm_id), "X-ONEGATE-TOKEN": world["tokens"][vm_id]})


def test_the_document_names_every_route_of_the_server():
    from services.gate.app import ROUTES
    served = {(rule.rule.replace("<", "{").replace(">", "}"), method)
              for rule in ROUTES.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}}
    served = {(path.replace("{vm}", "{id}"), method) for path, method in served}
    documented = {(path, method.upper()) for path, item in schema.raw_schema["paths"].items()
                  for method in item}
    assert served == documented
