"""outbox.merge: a transaction's messages, fewer. Driver commands per host,
and VM state changes per routing key, without reordering any VM's changes."""
from cirrus import messages, outbox, tracing

BOOT, RUNNING = messages.vm_state_key("BOOT"), messages.vm_state_key("RUNNING")


def change(vm_id, key, request_id=None):
    return outbox.event_row(messages.LIFECYCLE, key, {"id": vm_id, "key": key},
                            tracing.headers(request_id))


def command(vm_id, host):
    return outbox.command_row({"id": f"c{vm_id}", "action": "deploy", "vm_id": vm_id,
                               "host": host, "args": {}})


def shape(rows):
    """Each row as (routing key, [VM ids]) of its changes or commands."""
    return [(row["routing_key"],
             [e["id"] for e in messages.events_in(row["payload"])]
             if row["exchange"] != messages.COMMANDS.name else
             [c["vm_id"] for c in messages.commands_in(row["payload"])]) for row in rows]


def test_changes_under_one_key_become_one_message_each_with_its_request():
    merged = outbox.merge([change(1, BOOT, "r1"), command(1, "h1"), change(2, BOOT, "r2"),
                           command(2, "h1"), change(3, BOOT)])
    assert shape(merged) == [(BOOT, [1, 2, 3]), ("h1", [1, 2])]
    assert [e["request_id"] for e in merged[0]["payload"]["events"]] == ["r1", "r2", None]
    assert merged[0]["headers"] == {}       # the requests are the changes' own


def test_a_lone_change_and_other_events_stay_as_they_were():
    host_state = outbox.event_row(messages.LIFECYCLE, messages.HOST_STATE, {"id": 7})
    alone = change(1, BOOT, "r1")
    assert outbox.merge([host_state, alone, {**host_state}]) == [host_state, alone, host_state]


def test_a_vm_changed_twice_keeps_its_order():
    # VM 1 goes BOOT then RUNNING; VM 2's RUNNING may join VM 1's, but VM 1's
    # later BOOT may not join the first BOOT message, which comes before
    merged = outbox.merge([change(1, BOOT), change(2, RUNNING), change(1, RUNNING),
                           change(3, BOOT), change(1, BOOT), change(4, RUNNING)])
    assert shape(merged) == [(BOOT, [1, 3]), (RUNNING, [2, 1, 4]), (BOOT, [1])]
