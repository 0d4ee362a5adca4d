"""The CLI's request-management commands without a gateway: a service
request that waits prints like a VM's (issue 8), and logout forgets the
token on the server before deleting the file."""
import json

import pytest

from cirrus import cli, client as sdk
from cirrus.client import ClientError

SERVICE = {"id": 7, "name": "blog", "state": "PENDING"}
WAITING = {"id": 12, "state": "WAITING", "waiting_for": "finance", "step": "Finance approval",
           "service": None, "vm": None}


class Submitting:
    """What flow-template instantiate reads from the SDK."""

    def __init__(self, answer):
        self.answer, self.submitted = answer, []

    def flow_template_id(self, ref):
        return 3

    def vnet_id(self, ref):
        return 4

    def submit_flow(self, template_id, **options):
        self.submitted.append((template_id, options))
        return self.answer

    def instantiate_flow_template(self, *args, **kwargs):
        raise AssertionError("the old RPC fails a waiting request: SubmitFlow is used")


def run(capsys, monkeypatch, api, *argv):
    monkeypatch.setattr(cli, "client", lambda args: api)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_a_service_made_at_once_prints_its_id(capsys, monkeypatch):
    api = Submitting({"id": 11, "state": "PROVISIONED", "service": SERVICE, "vm": None})
    code, out, _ = run(capsys, monkeypatch, api, "flow-template", "instantiate", "blog",
                       "--name", "b1", "--attr", "DB=x", "--network", "private=net")
    assert (code, out) == (0, "7\n")
    assert api.submitted == [(3, {"name": "b1", "custom_attrs": {"DB": "x"},
                                  "networks": {"private": 4}})]


def test_a_waiting_service_request_says_whom_it_waits_for(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch, Submitting(WAITING), "flow-template",
                         "instantiate", "blog")
    assert (code, err) == (0, "")
    assert out == ("request 12 waits for approval by finance (Finance approval); follow it "
                   "with `cirrus request show 12`\n")


def test_json_prints_the_service_or_the_request(capsys, monkeypatch):
    made = {"id": 11, "state": "PROVISIONED", "service": SERVICE, "vm": None}
    _, out, _ = run(capsys, monkeypatch, Submitting(made), "flow-template", "instantiate",
                    "3", "--json")
    assert json.loads(out)["id"] == 7
    _, out, _ = run(capsys, monkeypatch, Submitting(WAITING), "flow-template", "instantiate",
                    "3", "--json")
    assert json.loads(out)["waiting_for"] == "finance"


# ----------------------------------------------------------------- logout

class Sessions:
    """The SDK's Client as logout uses it; ``fails`` is the error Logout gives."""
    made = []

    def __init__(self, fails=None):
        self.fails = fails

    def __call__(self, address=None, token=None, **_):
        self.token, self.logged_out = token, False
        Sessions.made.append(self)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def logout(self):
        if self.fails:
            raise self.fails
        self.logged_out = True


@pytest.fixture
def token_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Sessions.made.clear()
    return sdk.save_token("tok-1")


def logout(capsys, monkeypatch, sessions):
    monkeypatch.setattr(sdk, "Client", sessions)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["logout"])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_logout_forgets_the_token_on_the_server_then_deletes_the_file(capsys, monkeypatch,
                                                                      token_file):
    code, out, _ = logout(capsys, monkeypatch, Sessions())
    assert code == 0
    [api] = Sessions.made
    assert (api.token, api.logged_out) == ("tok-1", True)
    assert not token_file.exists()
    assert out == f"logged out: the server forgot the token; {token_file} deleted\n"


def test_a_token_the_server_no_longer_knows_is_deleted_all_the_same(capsys, monkeypatch,
                                                                    token_file):
    code, out, _ = logout(capsys, monkeypatch,
                          Sessions(ClientError("UNAUTHENTICATED", "unknown token")))
    assert code == 0 and not token_file.exists()
    assert "no longer knew the token" in out


def test_a_server_that_cannot_be_reached_keeps_the_file(capsys, monkeypatch, token_file):
    code, _, err = logout(capsys, monkeypatch,
                          Sessions(ClientError("UNAVAILABLE", "connection refused")))
    assert code == 1 and token_file.exists()
    assert "UNAVAILABLE: connection refused" in err


def test_logout_without_a_token_file_calls_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    Sessions.made.clear()
    code, out, _ = logout(capsys, monkeypatch, Sessions())
    assert code == 0 and Sessions.made == []
    assert out.startswith("not logged in: no token at ")
