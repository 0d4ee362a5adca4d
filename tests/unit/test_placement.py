from services.scheduler.placement import HostView, VmRequest, rank, rank_elsewhere


def host(id, free_cpu=400, free_mem=4096, vms=0):
    return HostView(id, f"h{id}", max_cpu=free_cpu, max_mem=free_mem, cpu_usage=0,
                    mem_usage=0, running_vms=vms)


def test_packing_prefers_the_busiest_host_that_fits():
    hosts = [host(1, vms=1), host(2, vms=3), host(3, free_cpu=50, vms=9)]
    ranked, reason = rank(VmRequest(1, 100, 512), hosts)
    assert [h.id for h in ranked] == [2, 1] and reason is None


def test_reasons_when_nothing_fits():
    assert rank(VmRequest(1, 100, 512), [])[1] == "No host is enabled and monitored"
    assert rank(VmRequest(1, 400, 512), [host(1, free_cpu=200)])[1] == \
        "Not enough CPU capacity: 400/200"
    assert rank(VmRequest(1, 100, 8192), [host(1, free_mem=1024)])[1] == \
        "Not enough memory: 8192/1024 MB"


def test_reserve_updates_the_view_so_a_pass_does_not_overfill():
    h = host(1, free_cpu=150)
    h.reserve(100, 256)
    assert rank(VmRequest(2, 100, 256), [h]) == ([], "Not enough CPU capacity: 100/50")


def test_a_vm_to_move_ranks_every_host_but_its_own():
    hosts = [host(1, vms=5), host(2, vms=1), host(3, vms=2)]
    ranked, reason = rank_elsewhere(VmRequest(1, 100, 512), hosts, current_host_id=1)
    assert [h.id for h in ranked] == [3, 2] and reason is None
    assert rank_elsewhere(VmRequest(1, 100, 512), [host(1)], 1) == \
        ([], "No other host is enabled and monitored")
    assert rank_elsewhere(VmRequest(1, 400, 512), [host(1), host(2, free_cpu=100)], 1)[1] == \
        "Not enough CPU capacity: 400/100"
