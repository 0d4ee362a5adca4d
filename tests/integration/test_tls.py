"""TLS served by the gateway (gateway.tls_cert and tls_key, with the requests
service behind it) and by the gate (gate.tls_cert and tls_key), on the real
broker and database, and the clients that trust their CA (gateway.tls_ca,
`cirrus --tls-ca`) or do not."""
import http.client
import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from cirrus import config
from cirrus.client import Client, ClientError
from tests.integration.test_gate_api import start_gate
from tests.integration.test_gateway import cirrus, start_gateway
from tests.procs import Proc, free_port, start_services


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", cwd=directory)
    return directory / f"{name}.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the gateway's certificate for 127.0.0.1 signed by it, and a CA
    that signed nothing."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "gateway.key", "-out", "gateway.csr", "-subj", "/CN=127.0.0.1",
            cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "gateway.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "gateway.pem", "-days", "1", "-extfile", "san.cnf",
            cwd=directory)
    return {"ca": ca, "cert": directory / "gateway.pem", "key": directory / "gateway.key",
            "other_ca": make_ca(directory, "other")}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("gateway-tls")


@pytest.fixture(scope="module")
def requests_service(cirrus_env, logs):
    procs = start_services(["requests"], cirrus_env, logs)
    yield
    for proc in procs:
        proc.stop()


def tls_env(env, section, cert=None, key=None):
    """``env`` with CIRRUS_<SECTION>_TLS_CERT and _TLS_KEY for the files given."""
    return {**env, **{f"CIRRUS_{section}_TLS_{name}": str(path)
                      for name, path in (("CERT", cert), ("KEY", key)) if path}}


def exits_naming(program, env, log_path, error):
    """``program`` started with a wrong setting exits 2 with a line naming it."""
    proc = Proc([program], env, log_path).start()
    try:
        assert proc.popen.wait(timeout=30) == 2
        proc.wait_for(error, timeout=5)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway(requests_service, cirrus_env, logs, pki):
    proc, address = start_gateway(tls_env(cirrus_env, "GATEWAY", pki["cert"], pki["key"]), logs)
    proc.wait_for(r"gateway listening on .* \(TLS\)")
    yield address
    proc.stop()


def test_a_client_trusting_the_ca_works_over_tls(gateway, pki):
    with Client(gateway, tls_ca=str(pki["ca"])) as api:
        session = api.login(str(config.get()["auth"]["admin_user"]),
                            str(config.get()["auth"]["admin_password"]))
        assert session["user"]["role"] == "admin"
        assert "admin" in [user["name"] for user in api.list_users()]


def test_the_cli_takes_the_ca_from_the_flag_or_the_configuration(gateway, cirrus_env, pki,
                                                                  tmp_path):
    env = {**cirrus_env, "HOME": str(tmp_path)}
    by_flag = cirrus(gateway, env, "--tls-ca", str(pki["ca"]), "user", "list")
    assert by_flag.returncode == 0, by_flag.stderr
    by_config = cirrus(gateway, {**env, "CIRRUS_GATEWAY_TLS_CA": str(pki["ca"])}, "user", "list")
    assert by_config.returncode == 0, by_config.stderr
    assert by_config.stdout == by_flag.stdout


@pytest.fixture(scope="module")
def plaintext_gateway(requests_service, cirrus_env, logs):
    proc, address = start_gateway(cirrus_env, logs)
    proc.wait_for(r"gateway listening on .* \(plaintext\)")
    yield address
    proc.stop()


@pytest.mark.parametrize("which, argv, hint", [
    ("tls", (), "does the gateway at {address} serve TLS? then give its CA with --tls-ca"),
    ("tls", ("--tls-ca", "{other_ca}"),
     "the certificate of the gateway at {address} is not signed by a CA of --tls-ca"),
    ("plaintext", ("--tls-ca", "{ca}"),
     "the gateway at {address} does not serve TLS: leave out --tls-ca"),
])
def test_the_cli_says_what_to_check_when_tls_fails(gateway, plaintext_gateway, cirrus_env, pki,
                                                  tmp_path, which, argv, hint):
    address = gateway if which == "tls" else plaintext_gateway
    fill = {"address": address, "ca": str(pki["ca"]), "other_ca": str(pki["other_ca"])}
    done = cirrus(address, {**cirrus_env, "HOME": str(tmp_path)},
                  *(arg.format(**fill) for arg in argv), "user", "list")
    assert done.returncode == 1
    assert "cirrus: UNAVAILABLE" in done.stderr and hint.format(**fill) in done.stderr


@pytest.mark.parametrize("trust", ["plaintext", "other_ca", "system"])
def test_a_client_that_cannot_verify_the_gateway_gets_nothing(gateway, pki, trust):
    tls_ca = {"plaintext": None, "other_ca": str(pki["other_ca"]), "system": "system"}[trust]
    with Client(gateway, tls_ca=tls_ca, timeout=5) as api:
        with pytest.raises(ClientError) as exc_info:
            api.list_users()
    assert exc_info.value.code == "UNAVAILABLE"


def test_a_ca_file_that_is_missing_or_not_a_certificate_is_named(gateway, cirrus_env, pki,
                                                                 tmp_path):
    env = {**cirrus_env, "HOME": str(tmp_path)}
    missing = cirrus(gateway, env, "--tls-ca", str(tmp_path / "nope.pem"), "host", "list")
    assert missing.returncode == 1
    assert f"gateway.tls_ca: cannot read {tmp_path / 'nope.pem'}" in missing.stderr
    with pytest.raises(config.ConfigError, match="holds no PEM CERTIFICATE"):
        Client(gateway, tls_ca=str(pki["key"]))


@pytest.mark.parametrize("given, error", [
    ({"cert": "cert"}, "gateway.tls_cert is set but gateway.tls_key is not"),
    ({"key": "key"}, "gateway.tls_key is set but gateway.tls_cert is not"),
    ({"cert": "key", "key": "key"}, "gateway.tls_cert: .*gateway.key holds no PEM CERTIFICATE"),
])
def test_a_gateway_with_a_wrong_tls_setting_says_which_and_exits(cirrus_env, logs, pki,
                                                                 given, error):
    files = {name: pki[which] for name, which in given.items()}
    env = {**tls_env(cirrus_env, "GATEWAY", **files), "CIRRUS_GATEWAY_PORT": str(free_port())}
    exits_naming("cirrus-gateway", env, logs / f"gateway-wrong-{'-'.join(given)}.log",
                 f"configuration: {error}")



# ----------------------------------------------------------------- the gate (OneGate)

@pytest.mark.parametrize("processes", [1, 2])
def test_the_gate_serves_https_and_refuses_plain_http(cirrus_env, logs, pki, processes):
    """With two processes, each wraps its own socket (SO_REUSEPORT)."""
    proc, url = start_gate(tls_env(cirrus_env, "GATE", pki["cert"], pki["key"]), logs,
                           processes=processes)
    port = int(url.rsplit(":", 1)[1])
    try:
        for index in range(1, processes + 1):
            proc.wait_for(rf"gate process {index}/{processes} listening on .* \(TLS\)")
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        # a client that connects and never says hello holds up no one
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(processes)]
        for _ in range(4 * processes):      # new connections: the kernel spreads them
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/vm", context=trusting,
                                       timeout=10)
            # the gate's own refusal of a guest without a token, over TLS
            assert answer.value.code == 401
            assert "error" in json.loads(answer.value.read())
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/vm", timeout=10)
        distrusting = ssl.create_default_context(cafile=str(pki["other_ca"]))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/vm", context=distrusting,
                                   timeout=10)
        for sock in silent:
            sock.close()
    finally:
        proc.stop()


def test_a_gate_with_a_wrong_tls_setting_says_which_and_exits(cirrus_env, logs, pki):
    env = {**tls_env(cirrus_env, "GATE", key=pki["key"]), "CIRRUS_GATE_PORT": str(free_port())}
    exits_naming("cirrus-gate", env, logs / "gate-wrong.log",
                 "cirrus-gate: configuration: gate.tls_key is set but gate.tls_cert is not")
