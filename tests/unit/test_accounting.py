"""Stays and accounting from synthetic history rows."""
from datetime import datetime, timedelta, timezone

import pytest

from cirrus.errors import InvalidArgument
from services.lifecycle import accounting

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def at(minutes):
    return T0 + timedelta(minutes=minutes)


def history(*steps):
    """Rows from (minute, action, to_status, host_id) tuples."""
    return [{"seq": i + 1, "action": action, "to_status": to, "host_id": host, "at": at(m),
             "host": f"h{host}" if host else None}
            for i, (m, action, to, host) in enumerate(steps)]


# deployed on host 1 at minute 1, running from minute 3
RUNNING_AT_3 = [
    (0, "allocate", "PENDING", None),
    (1, "deploy", "PROLOG", 1),
    (2, "prolog_success", "BOOT", 1),
    (3, "boot_success", "RUNNING", 1),
]

LIFE = history(
    (0, "allocate", "PENDING", None),
    (1, "deploy", "PROLOG", 1),
    (3, "prolog_success", "BOOT", 1),
    (4, "boot_success", "RUNNING", 1),
    (64, "terminate", "SHUTDOWN", 1),
    (65, "shutdown_success", "EPILOG", 1),
    (67, "epilog_success", "DONE", 1),
)


def test_one_stay_from_deploy_to_done_with_its_phases_and_reason():
    [stay] = accounting.stays(LIFE, now=at(100))
    assert (stay["host_id"], stay["host"], stay["start"], stay["end"]) == (1, "h1", at(1), at(67))
    assert (stay["prolog_seconds"], stay["boot_seconds"], stay["running_seconds"],
            stay["epilog_seconds"]) == (120, 60, 3600, 120)
    assert stay["reason"] == "terminate"
    assert stay["ended_by"] == "epilog_success"


def test_a_vm_still_running_has_an_open_stay_counted_until_now():
    [stay] = accounting.stays(LIFE[:4], now=at(34))
    assert stay["end"] is None and stay["reason"] is None
    assert stay["running_seconds"] == 30 * 60
    assert accounting.vm_hours([stay], None, None, now=at(34)) == pytest.approx(33 / 60)
    # an end before now clips the open stay
    assert accounting.vm_hours([stay], None, at(31), now=at(34)) == pytest.approx(0.5)


def test_a_migration_makes_two_stays():
    rows = history(
        *RUNNING_AT_3,
        (10, "migrate_live", "MIGRATE", 1),
        (11, "migrate_success", "BOOT_MIGRATE", 1),
        (12, "boot_migrate_success", "RUNNING", 2),
        (20, "terminate", "SHUTDOWN", 2),
        (21, "shutdown_success", "EPILOG", 2),
        (22, "epilog_success", "DONE", 2),
    )
    first, second = accounting.stays(rows, now=at(30))
    assert (first["host_id"], first["start"], first["end"]) == (1, at(1), at(12))
    assert first["reason"] == "migrate_live" and first["boot_seconds"] == 120
    assert (second["host_id"], second["start"], second["end"]) == (2, at(12), at(22))
    assert second["running_seconds"] == 8 * 60 and second["reason"] == "terminate"


def test_leaving_without_a_driver_result_names_the_action_that_ended_the_stay():
    rows = history(
        *RUNNING_AT_3,
        (5, "monitor_unknown", "UNKNOWN", 1),
        (6, "recover", "PENDING", None),
        (7, "deploy", "PROLOG", 2),
    )
    first, second = accounting.stays(rows, now=at(8))
    assert first["end"] == at(6) and first["reason"] == "recover"
    assert second["end"] is None and second["host_id"] == 2


def test_windows_clip_stays_and_sum_per_vm_and_per_user():
    vms = [{"id": 1, "name": "a", "owner": "ann", "owner_id": 10, "cpu": 2.0, "memory": 2048},
           {"id": 2, "name": "b", "owner": "ann", "owner_id": 10, "cpu": 1.0, "memory": 512},
           {"id": 3, "name": "c", "owner": "bob", "owner_id": 11, "cpu": 1.0, "memory": 1024}]
    pending_only = history((0, "allocate", "PENDING", None))
    out = accounting.usage(vms, {1: LIFE, 2: LIFE[:4], 3: pending_only},
                           start=at(7), end=at(127), now=at(187))
    # VM 1 is on its host from minute 1 to 67: 60 minutes inside [7, 127)
    # VM 2 is still running at now: from 7 to the end of the window, 120 minutes
    by_id = {line["id"]: line for line in out["vms"]}
    assert set(by_id) == {1, 2}, "a VM never on a host is not charged"
    assert by_id[1]["hours"] == pytest.approx(1.0)
    assert by_id[1]["cpu_hours"] == pytest.approx(2.0)
    assert by_id[1]["memory_gb_hours"] == pytest.approx(2.0)
    assert by_id[2]["hours"] == pytest.approx(2.0)
    assert by_id[2]["memory_gb_hours"] == pytest.approx(1.0)
    [ann] = out["users"]
    assert (ann["owner"], ann["owner_id"], ann["vms"]) == ("ann", 10, 2)
    assert ann["cpu_hours"] == pytest.approx(4.0)
    assert ann["memory_gb_hours"] == pytest.approx(3.0)
    assert (out["start"], out["end"]) == (at(7).isoformat(), at(127).isoformat())


def test_a_window_outside_every_stay_charges_nothing():
    vms = [{"id": 1, "name": "a", "owner": "ann", "owner_id": 10, "cpu": 1.0, "memory": 1024}]
    out = accounting.usage(vms, {1: LIFE}, start=at(68), end=None, now=at(200))
    assert out == {"vms": [], "users": [], "start": at(68).isoformat(), "end": None}


def test_times_are_iso_8601_and_a_bad_one_is_named():
    assert accounting.parse_time("start", "2026-01-01T00:07:00Z") == at(7)
    assert accounting.parse_time("start", "2026-01-01T00:07:00") == at(7)
    assert accounting.parse_time("end", None) is None
    with pytest.raises(InvalidArgument, match="start: not an ISO-8601 time: 'yesterday'"):
        accounting.parse_time("start", "yesterday")
