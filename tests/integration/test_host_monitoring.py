"""Host monitoring in earnest, on libvirt's test:///default: the report's values
are there and sane, the datastore's free space is what statvfs says, and a
worker reports at once when a domain changes, not only every interval."""
import os
import uuid

from cirrus import messages
from services.drivers.libvirt_backend import LibvirtBackend, host_net_counters
from tests.node_worker import a_vm, bus, now_iso, run_ok, start_node, vm_states  # noqa: F401

MB = 2**20


def test_a_libvirt_host_report_has_sane_values(tmp_path):
    datastore = tmp_path / "ds"
    datastore.mkdir()
    lv = LibvirtBackend("test:///default", str(datastore))
    try:
        vm = a_vm()
        vm["memory"] = 256
        lv.deploy(vm)
        before = host_net_counters()
        report = lv.monitor()
        after = host_net_counters()
        fs = os.statvfs(datastore)
    finally:
        lv.delete(vm)
        lv.close()
    assert report["HYPERVISOR"] == "test" and report["URI"] == "test:///default"
    assert (report["TOTALCPU"], report["CPUSPEED"]) == (1600, 1400)
    assert 0 <= report["USEDCPU"] <= report["TOTALCPU"]
    assert report["USEDCPU"] + report["FREECPU"] == report["TOTALCPU"]
    # the test driver has no node memory stats: its domains' memory is what is used
    assert report["USEDMEMORY"] >= 256 * 1024
    assert report["USEDMEMORY"] + report["FREEMEMORY"] == report["TOTALMEMORY"]
    # the datastore as statvfs sees it (free space may move a little meanwhile)
    assert report["DS_LOCATION_TOTAL_MB"] == fs.f_blocks * fs.f_frsize // MB
    assert abs(report["DS_LOCATION_FREE_MB"] - fs.f_bavail * fs.f_frsize // MB) <= 64
    assert report["DS_LOCATION_USED_MB"] + report["DS_LOCATION_FREE_MB"] == \
        report["DS_LOCATION_TOTAL_MB"]
    # the host's NICs' counters, which only grow
    assert before["NETRX"] <= report["NETRX"] <= after["NETRX"]
    assert before["NETTX"] <= report["NETTX"] <= after["NETTX"]
    [mine] = report["VMS"]
    assert (mine["VM_ID"], mine["STATE"], mine["MEMORY"]) == (vm["id"], "RUNNING", 256 * 1024)
    assert {"CPU", "NETRX", "NETTX", "DISKRDBYTES", "DISKWRBYTES"} <= set(mine)


def test_a_worker_reports_at_once_when_a_domain_changes(start_node, bus):
    host = f"node-{uuid.uuid4().hex[:6]}"
    # a report every minute: any other report is an early one
    start_node(host, env={"CIRRUS_DRIVERS_MONITOR_INTERVAL": "60",
                          "CIRRUS_LIFECYCLE_HOST_TIMEOUT": "120"})
    first = bus.wait_for(lambda k, b: k == messages.HOST_MONITOR and b["host"] == host)
    assert first["sync"] and vm_states(first) == {}
    vm = a_vm()
    deployed_at = now_iso()
    run_ok(bus, host, vm, "deploy")
    report = bus.monitor_after(host, deployed_at, timeout=20)
    assert vm_states(report) == {vm["id"]: "RUNNING"}
    vm["deploy_id"] = f"cirrus-{vm['id']}"
    stopped_at = now_iso()
    run_ok(bus, host, vm, "cancel")
    assert vm_states(bus.monitor_after(host, stopped_at, timeout=20)) == {vm["id"]: "POWEROFF"}
    run_ok(bus, host, vm, "delete")
