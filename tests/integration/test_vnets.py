"""Virtual networks and leases on the real PostgreSQL, through lifecycle's logic."""
import pytest
from nameko.exceptions import RemoteError
from sqlalchemy import func, select

from cirrus.db.models import AddressRange, Host, Lease, Setting, VirtualNetwork, VmDevices
from cirrus.errors import FailedPrecondition, InvalidArgument, NotFound
from services.lifecycle import devices, logic, vnets
from tests.vm_devices import (admin_id, answer, commands, deploy_each_on_its_own_host,  # noqa: F401
                              deploy_to_running, factory, host, lifecycle_rpc,
                              terminate_to_done, unique)


def make_vnet(factory, admin_id, size=4, ip="10.0.0.1", **template):
    name = unique("net")
    with factory() as s, s.begin():
        vnet = vnets.create_vnet(s, admin_id, name, {
            "GATEWAY": "10.0.0.254", "DNS": "10.0.0.253", "NETWORK_MASK": "255.255.255.0",
            **template, "AR": [{"TYPE": "IP4", "IP": ip, "SIZE": str(size)}]})
        return vnet.id, name


def nic_vm(s, admin_id, network, ip=None, name="vm", **context):
    nic = {"NETWORK": network, **({"IP": ip} if ip else {})}
    template = {"NIC": [nic], **({"CONTEXT": context} if context else {})}
    return logic.allocate(s, admin_id, name, 0.1, 1, 64, template).id


def lease_of(s, vm_id):
    return {nic: addresses for nic, (_, addresses) in vnets.vm_leases(s, vm_id).items()}


def counts(s):
    return [s.scalar(select(func.count()).select_from(t))
            for t in (VirtualNetwork, AddressRange, Lease)]


def test_a_network_shows_its_ranges_and_the_leases_in_use(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=3)
    with factory() as s, s.begin():
        vm_id = nic_vm(s, admin_id, name)
        assert logic.deploy(s, vm_id, host)["outcome"] == "deployed"
    with factory() as s:
        shown = vnets.vnet_to_dict(s, vnets.get_vnet(s, vnet_id))
        assert (shown["size"], shown["used"]) == (3, 1)
        assert shown["ranges"][0]["leases"] == [{"ip": "10.0.0.1", "mac": "02:00:0a:00:00:01",
                                                 "ip6": None, "vm_id": vm_id, "nic_id": 0,
                                                 "hold": False}]
        assert name in [v["name"] for v in vnets.list_vnets(s)]


@pytest.mark.parametrize("ranges,message", [
    ([{"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "0"}], r"^AR\[0\] SIZE: must be at least 1"),
    ([{"TYPE": "IP4", "IP": "10.0.0.1", "SIZE": "8"},
      {"TYPE": "IP4", "IP": "10.0.0.5", "SIZE": "8"}],
     r"^AR\[1\] IP: the range overlaps"),
])
def test_overlapping_or_empty_ranges_are_refused_leaving_nothing_written(factory, admin_id,
                                                                          ranges, message):
    with factory() as s:
        before = counts(s)
    with pytest.raises(InvalidArgument, match=message):
        with factory() as s, s.begin():
            vnets.create_vnet(s, admin_id, unique("bad"), {"AR": ranges})
    with factory() as s:
        assert counts(s) == before


def test_addar_refuses_an_overlap_and_rmar_a_range_in_use(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=2)
    with factory() as s, s.begin():
        with pytest.raises(InvalidArgument, match=r"^AR IP: the range overlaps"):
            vnets.add_range(s, vnet_id, {"TYPE": "IP4", "IP": "10.0.0.2", "SIZE": "5"})
    with factory() as s, s.begin():
        vnets.add_range(s, vnet_id, {"TYPE": "IP4", "IP": "10.0.0.3", "SIZE": "5"})
        vm_id = nic_vm(s, admin_id, name)
        assert logic.deploy(s, vm_id, host)["outcome"] == "deployed"
    with factory() as s, s.begin():
        first, second = vnets.vnet_ranges(s, vnet_id)
        with pytest.raises(FailedPrecondition, match="1 leases in use"):
            vnets.remove_range(s, vnet_id, first.id)
    with factory() as s, s.begin():
        vnets.remove_range(s, vnet_id, second.id)
    with factory() as s:
        assert [ar.id for ar in vnets.vnet_ranges(s, vnet_id)] == [first.id]
        assert s.scalar(select(func.count()).select_from(Lease)
                        .where(Lease.ar_id == second.id)) == 0
        with pytest.raises(FailedPrecondition, match=f"VMs {vm_id}"):
            vnets.delete_vnet(s, vnet_id)


def test_fifty_concurrent_deploys_never_share_an_address(factory, admin_id):
    vnet_id, name = make_vnet(factory, admin_id, size=60)
    with factory() as s, s.begin():
        ids = [nic_vm(s, admin_id, name, name=f"race{i}") for i in range(50)]
    outcomes = deploy_each_on_its_own_host(factory, ids)
    assert outcomes == ["deployed"] * 50
    with factory() as s:
        ips = [lease_of(s, vm_id)[0]["ip"] for vm_id in ids]
        assert len(set(ips)) == 50
        sent = [commands(s, vm_id)[-1]["args"]["vm"]["nics"][0]["ip"] for vm_id in ids]
        assert sorted(sent) == sorted(ips)


def test_no_free_lease_leaves_the_vm_pending_with_the_reason(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=1)
    with factory() as s, s.begin():
        first, second = nic_vm(s, admin_id, name), nic_vm(s, admin_id, name)
        assert logic.deploy(s, first, host)["outcome"] == "deployed"
        usage = s.get(Host, host, populate_existing=True).cpu_usage
    with factory() as s, s.begin():
        assert logic.deploy(s, second, host) == {
            "outcome": "vm_waits", "reason": f"No free lease in network {name!r}"}
    with factory() as s:
        vm = s.get(logic.VirtualMachine, second)
        assert (vm.state, vm.sched_message) == ("PENDING", f"No free lease in network {name!r}")
        assert s.get(Host, host).cpu_usage == usage      # the reservation was given back
        assert lease_of(s, second) == {}


def test_leases_are_freed_at_done_and_handed_out_round_robin(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=3)
    with factory() as s, s.begin():
        vm_id = nic_vm(s, admin_id, name)
        deploy_to_running(s, vm_id, host)
        assert lease_of(s, vm_id)[0]["ip"] == "10.0.0.1"
        terminate_to_done(s, vm_id)
        assert lease_of(s, vm_id) == {}
        # .1 is free again, but the cursor moved on
        later = nic_vm(s, admin_id, name)
        logic.deploy(s, later, host)
        assert lease_of(s, later)[0]["ip"] == "10.0.0.2"


def test_recreate_frees_the_lease_and_the_next_deploy_takes_one_again(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=2)
    with factory() as s, s.begin():
        vm_id = nic_vm(s, admin_id, name)
        deploy_to_running(s, vm_id, host)
        logic.recover(s, vm_id, "recreate")
        answer(s, vm_id)                # the cleanup's delete
        assert logic.vm_status(logic.get_vm_locked(s, vm_id)) == "PENDING"
        assert lease_of(s, vm_id) == {}
        assert logic.deploy(s, vm_id, host)["outcome"] == "deployed"
        assert lease_of(s, vm_id)[0]["ip"] == "10.0.0.2"


def test_an_ip_out_of_range_or_taken_is_refused_at_create(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=4)
    with factory() as s, s.begin():
        with pytest.raises(InvalidArgument,
                           match=r"^NIC\[0\] IP: 10.0.0.9 is not in any address range"):
            nic_vm(s, admin_id, name, ip="10.0.0.9")
        with pytest.raises(NotFound, match=r"^NIC\[0\] NETWORK: virtual network 'nope'"):
            nic_vm(s, admin_id, "nope")
        owner = nic_vm(s, admin_id, name, ip="10.0.0.3")
        assert logic.deploy(s, owner, host)["outcome"] == "deployed"
        assert lease_of(s, owner)[0] == {"ip": "10.0.0.3", "mac": "02:00:0a:00:00:03",
                                         "ip6": None}
        with pytest.raises(FailedPrecondition,
                           match=rf"^NIC\[0\] IP: IP 10.0.0.3 of network .* taken by VM {owner}"):
            nic_vm(s, admin_id, name, ip="10.0.0.3")


def test_an_ip_taken_after_create_makes_the_deploy_wait(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=4)
    with factory() as s, s.begin():
        first = nic_vm(s, admin_id, name, ip="10.0.0.2")
        second = nic_vm(s, admin_id, name, ip="10.0.0.2")
        assert logic.deploy(s, first, host)["outcome"] == "deployed"
        answer_ = logic.deploy(s, second, host)
        assert answer_["outcome"] == "vm_waits"
        assert answer_["reason"] == f"IP 10.0.0.2 of network {name!r} is taken by VM {first}"


def test_hold_keeps_an_address_from_vms_until_released(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=2)
    with factory() as s, s.begin():
        vnets.hold(s, vnet_id, "10.0.0.1")
        with pytest.raises(FailedPrecondition, match="already on hold"):
            vnets.hold(s, vnet_id, "10.0.0.1")
        with pytest.raises(InvalidArgument, match=r"^address: 10.0.1.1 is not in any"):
            vnets.hold(s, vnet_id, "10.0.1.1")
        with pytest.raises(FailedPrecondition, match="is on hold"):
            nic_vm(s, admin_id, name, ip="10.0.0.1")
        vm_id = nic_vm(s, admin_id, name)
        logic.deploy(s, vm_id, host)
        assert lease_of(s, vm_id)[0]["ip"] == "10.0.0.2"
        with pytest.raises(FailedPrecondition, match=f"leased to VM {vm_id}"):
            vnets.hold(s, vnet_id, "10.0.0.2")
        vnets.release(s, vnet_id, "10.0.0.1")
        with pytest.raises(FailedPrecondition, match="not on hold"):
            vnets.release(s, vnet_id, "10.0.0.1")
        assert nic_vm(s, admin_id, name, ip="10.0.0.1")


def test_the_driver_spec_carries_nics_and_context_with_the_token(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=2, ip="10.0.0.7")
    with factory() as s, s.begin():
        vm_id = nic_vm(s, admin_id, name, name="ctx", TOKEN="YES", GREETING="it's `x`")
        deploy_to_running(s, vm_id, host)
        spec = commands(s, vm_id)[-1]["args"]["vm"]
        clone = commands(s, vm_id)[0]["args"]["vm"]
    assert spec["nics"] == [{"id": 0, "network": name, "network_id": vnet_id,
                             "ip": "10.0.0.7", "ip6": None, "mac": "02:00:0a:00:00:07",
                             "mask": "255.255.255.0", "gateway": "10.0.0.254",
                             "dns": "10.0.0.253", "model": "virtio"}]
    context = spec["context"]
    assert (context["VMID"], context["NAME"], context["TOKEN"]) == (str(vm_id), "ctx", "YES")
    assert (context["ETH0_IP"], context["ETH0_GATEWAY"]) == ("10.0.0.7", "10.0.0.254")
    assert context["GREETING"] == "it's `x`" and context["ONEGATE_ENDPOINT"]
    with factory() as s:
        held = s.get(VmDevices, vm_id)
        secret = s.scalar(select(Setting.value).where(Setting.key == "gate.secret"))
        assert spec["token"] == devices.vm_token(secret, vm_id, held.started_at)
        assert devices.platform_secret(s) == secret         # made once, then kept
    # every command of the stay carries the same values
    assert (clone["nics"], clone["context"], clone["token"]) == \
        (spec["nics"], spec["context"], spec["token"])


def test_the_network_rpcs_of_the_lifecycle_service(lifecycle_rpc, admin_id):
    rpc = lifecycle_rpc
    name = unique("rpc-net")
    vnet = rpc.create_vnet(admin_id, name, {"AR": {"TYPE": "IP4", "IP": "10.9.0.1", "SIZE": "4"}})
    assert (vnet["name"], vnet["size"], vnet["used"]) == (name, 4, 0)
    vnet = rpc.vnet_addar(vnet["id"], {"TYPE": "IP6", "SIZE": "2", "GLOBAL_PREFIX": "fd00::"})
    assert [ar["type"] for ar in vnet["ranges"]] == ["IP4", "IP6"]
    assert rpc.vnet_hold(vnet["id"], "10.9.0.2")["used"] == 1
    with pytest.raises(RemoteError) as refused:
        rpc.vnet_hold(vnet["id"], "10.9.0.2")
    assert refused.value.exc_type == "FailedPrecondition"
    assert rpc.vnet_release(vnet["id"], "10.9.0.2")["used"] == 0
    assert len(rpc.vnet_rmar(vnet["id"], vnet["ranges"][1]["id"])["ranges"]) == 1
    assert name in [v["name"] for v in rpc.list_vnets()]
    assert rpc.get_vnet(vnet["id"])["ranges"][0]["ip"] == "10.9.0.1"
    rpc.delete_vnet(vnet["id"])
    with pytest.raises(RemoteError) as gone:
        rpc.get_vnet(vnet["id"])
    assert gone.value.exc_type == "NotFound"


def test_a_batch_deploy_takes_leases_and_leaves_the_rest_waiting(factory, admin_id, host):
    vnet_id, name = make_vnet(factory, admin_id, size=8)
    with factory() as s, s.begin():
        ids = [nic_vm(s, admin_id, name, name=f"batch{i}") for i in range(10)]
        usage = s.get(Host, host, populate_existing=True).running_vms
    with factory() as s, s.begin():
        answers = logic.deploy_many(s, [[vm_id, host] for vm_id in ids])
    assert [a["outcome"] for a in answers] == ["deployed"] * 8 + ["vm_waits"] * 2
    with factory() as s:
        sent = [commands(s, vm_id)[-1]["args"]["vm"]["nics"][0]["ip"] for vm_id in ids[:8]]
        assert sorted(sent) == sorted(lease_of(s, vm_id)[0]["ip"] for vm_id in ids[:8])
        assert len(set(sent)) == 8
        assert s.get(Host, host).running_vms == usage + 8
        assert {s.get(logic.VirtualMachine, vm_id).sched_message for vm_id in ids[8:]} == \
            {f"No free lease in network {name!r}"}


def test_a_nic_may_ask_for_its_ipv6_or_its_mac(factory, admin_id, host):
    name = unique("net6")
    with factory() as s, s.begin():
        vnets.create_vnet(s, admin_id, name, {"AR": [
            {"TYPE": "IP6_STATIC", "IP6": "fd00::10", "SIZE": "4"},
            {"TYPE": "ETHER", "MAC": "02:00:00:00:10:00", "SIZE": "4"}]})
        by_ip6 = logic.allocate(s, admin_id, "v6", 0.1, 1, 64,
                                {"NIC": {"NETWORK": name, "IP6": "fd00::12"}}).id
        by_mac = logic.allocate(s, admin_id, "mac", 0.1, 1, 64,
                                {"NIC": {"NETWORK": name, "MAC": "02:00:00:00:10:03"}}).id
        for vm_id in (by_ip6, by_mac):
            assert logic.deploy(s, vm_id, host)["outcome"] == "deployed"
        assert lease_of(s, by_ip6)[0]["ip6"] == "fd00::12"
        assert lease_of(s, by_mac)[0] == {"mac": "02:00:00:00:10:03", "ip": None, "ip6": None}
        with pytest.raises(FailedPrecondition, match=rf"^NIC\[0\] MAC: MAC 02:00:00:00:10:03 .* "
                                                     rf"taken by VM {by_mac}"):
            logic.allocate(s, admin_id, "again", 0.1, 1, 64,
                           {"NIC": {"NETWORK": name, "MAC": "02:00:00:00:10:03"}})
        with pytest.raises(InvalidArgument, match=r"^NIC\[0\] IP6: fd00::99 is not in any"):
            logic.allocate(s, admin_id, "out", 0.1, 1, 64,
                           {"NIC": {"NETWORK": name, "IP6": "fd00::99"}})
