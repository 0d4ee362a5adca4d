"""The walking skeleton end to end on the embedded driver: the CLI, the
gateway, every service and a driver worker, as separate processes."""
import pytest

from tests.procs import wait_until


def test_twenty_vms_run_on_the_driver_and_are_gone_after_terminate(cluster):
    ids = [cluster.create_vm("--name", f"e2e-{i}", "--cpu", "0.1", "--memory", "32")
           for i in range(20)]
    for vm_id in ids:
        cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "60")
    shown = [cluster.json("vm", "show", vm_id) for vm_id in ids]
    assert {vm["host"] for vm in shown} == {"node-1"}
    assert all((vm["state"], vm["lcm_state"]) == ("ACTIVE", "RUNNING") for vm in shown)
    assert [h["to_status"] for h in shown[0]["history"]] == ["PENDING", "PROLOG", "BOOT", "RUNNING"]
    deploy_ids = {vm["deploy_id"] for vm in shown}
    assert len(deploy_ids) == 20

    # the driver's own libvirt connection reports every domain running
    wait_until(lambda: all(cluster.domains("node-1").get(d) == "RUNNING" for d in deploy_ids),
               timeout=15, what="20 running domains in the node's report")

    for vm_id in ids:
        cluster.cli("vm", "terminate", vm_id)
    cluster.wait_status(ids, "DONE", timeout=60)
    wait_until(lambda: not deploy_ids & set(cluster.domains("node-1")),
               timeout=15, what="domains gone from the node")
    host = cluster.json("host", "show", cluster.host_id("node-1"))
    assert (host["cpu_usage"], host["mem_usage"]) == (0, 0)


def test_vm_list_and_show_tables_speak_opennebula(cluster):
    vm_id = cluster.create_vm("--name", "table-vm", "--cpu", "0.1", "--memory", "16")
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "60")
    listing = cluster.cli("vm", "list").stdout
    row = next(line for line in listing.splitlines() if "table-vm" in line)
    assert "runn" in row and "node-1" in row
    assert "RUNNING" in cluster.cli("vm", "show", vm_id).stdout
    cluster.cli("vm", "terminate", vm_id, "--hard")
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "60")


def error_of(done):
    assert done.returncode != 0, done.stdout
    return done.stderr


def vm_count(cluster):
    return len(cluster.json("vm", "list", "--all"))


@pytest.mark.parametrize("args,status,field", [
    (["--name", "m0", "--cpu", "1", "--memory", "0"], "INVALID_ARGUMENT", "memory"),
    (["--name", "m-", "--cpu", "1", "--memory", "-5"], "INVALID_ARGUMENT", "memory"),
    (["--name", "c0", "--cpu", "0", "--memory", "64"], "INVALID_ARGUMENT", "cpu"),
    (["--name", "", "--cpu", "1", "--memory", "64"], "INVALID_ARGUMENT", "name"),
])
def test_bad_vm_requests_name_the_field_and_persist_nothing(cluster, args, status, field):
    before = vm_count(cluster)
    err = error_of(cluster.cli("vm", "create", *args, check=False))
    assert status in err and field in err.lower()
    assert vm_count(cluster) == before


def test_missing_memory_is_refused(cluster, tmp_path):
    tpl = tmp_path / "no-memory.tpl"
    tpl.write_text('NAME = "nomem"\nCPU = 1\n')
    before = vm_count(cluster)
    err = error_of(cluster.cli("vm", "create", "--file", tpl, check=False))
    assert "INVALID_ARGUMENT" in err and "MEMORY" in err.upper()
    assert vm_count(cluster) == before


def test_a_template_over_64_kib_is_refused(cluster, tmp_path):
    tpl = tmp_path / "huge.tpl"
    tpl.write_text('NAME = "huge"\nMEMORY = 64\nDESCRIPTION = "' + "x" * 70000 + '"\n')
    before = vm_count(cluster)
    err = error_of(cluster.cli("vm", "create", "--file", tpl, check=False))
    assert "INVALID_ARGUMENT" in err and "65536" in err
    assert vm_count(cluster) == before


def test_a_template_syntax_error_names_line_and_column(cluster, tmp_path):
    tpl = tmp_path / "broken.tpl"
    tpl.write_text('NAME = "ok"\nMEMORY = 64\nDISK = [ IMAGE = "x"\n')
    err = error_of(cluster.cli("template", "create", "--file", tpl, check=False))
    assert "INVALID_ARGUMENT" in err and "line" in err


def test_unknown_ids_are_not_found(cluster):
    assert "NOT_FOUND" in error_of(cluster.cli("host", "show", "987654", check=False))
    assert "NOT_FOUND" in error_of(cluster.cli("vm", "show", "987654", check=False))
    assert "NOT_FOUND" in error_of(cluster.cli("vm", "terminate", "987654", check=False))


def test_terminating_a_done_vm_is_refused(cluster):
    vm_id = cluster.create_vm("--name", "twice", "--cpu", "0.1", "--memory", "16", "--hold")
    cluster.cli("vm", "terminate", vm_id)
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "30")
    err = error_of(cluster.cli("vm", "terminate", vm_id, check=False))
    assert "FAILED_PRECONDITION" in err and "DONE" in err


def test_opennebula_template_create_instantiate(cluster, tmp_path):
    tpl = tmp_path / "one.tpl"
    tpl.write_text('# pasted from OpenNebula\nNAME = "one-style"\nCPU = 0.1\nVCPU = 1\n'
                   'MEMORY = 32\nCONTEXT = [ NETWORK = "YES", SSH_PUBLIC_KEY = "$USER[SSH]" ]\n')
    template_id = int(cluster.cli("template", "create", "--file", tpl).stdout.strip())
    assert cluster.json("template", "show", template_id)["name"] == "one-style"
    vm_id = int(cluster.cli("template", "instantiate", template_id, "--name", "from-tpl")
                .stdout.strip())
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "60")
    vm = cluster.json("vm", "show", vm_id)
    assert vm["name"] == "from-tpl" and vm["memory"] == 32
    cluster.cli("vm", "terminate", vm_id)
    cluster.cli("template", "delete", template_id)
    assert "NOT_FOUND" in error_of(cluster.cli("template", "show", template_id, check=False))


def test_host_disable_keeps_new_vms_pending_with_a_reason(cluster):
    host_id = cluster.host_id("node-1")
    cluster.cli("host", "disable", host_id)
    try:
        vm_id = cluster.create_vm("--name", "waits", "--cpu", "0.1", "--memory", "16")
        wait_until(lambda: cluster.json("vm", "show", vm_id).get("sched_message"),
                   timeout=15, what="a scheduling message")
        assert cluster.json("vm", "show", vm_id)["status"] == "PENDING"
    finally:
        cluster.cli("host", "enable", host_id)
    cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "60")
    cluster.cli("vm", "terminate", vm_id)


@pytest.mark.parametrize("template,failure,message", [
    ('DISK = [ SOURCE = "/nonexistent/x.img" ]', "PROLOG_FAILURE", "/nonexistent/x.img"),
    ('OS = [ ARCH = "bogus" ]', "BOOT_FAILURE", "bogus"),
])
def test_a_driver_failure_sets_the_failure_state_with_the_drivers_message(
        cluster, tmp_path, template, failure, message):
    tpl = tmp_path / "fails.tpl"
    tpl.write_text(f'NAME = "fails"\nCPU = 0.1\nMEMORY = 16\n{template}\n')
    vm_id = cluster.create_vm("--file", tpl)
    waited = cluster.cli("vm", "wait", vm_id, "--state", "RUNNING", "--timeout", "60", check=False)
    assert waited.returncode == 1 and failure in waited.stderr
    vm = cluster.json("vm", "show", vm_id)
    assert vm["status"] == failure and message in vm["error"]
    # terminate cleans up what the failure left, and frees the capacity
    cluster.cli("vm", "terminate", vm_id)
    cluster.cli("vm", "wait", vm_id, "--state", "DONE", "--timeout", "60")
