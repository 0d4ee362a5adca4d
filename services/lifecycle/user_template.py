"""A VM's user template: attributes its owner or its guest sets while it
lives (``onevm update``; READY=YES pushed through OneGate), kept apart from
the template the VM was made from, in ``template["USER_TEMPLATE"]``.

Each update is one transaction that also queues a ``vm.updated`` event in
the outbox, so a listener (flow's READY gate) hears every change that was
committed, and none that was not.
"""
import re

from cirrus import messages, outbox
from cirrus.db import get_row
from cirrus.db.models import VirtualMachine, utcnow
from cirrus.errors import FailedPrecondition, InvalidArgument

KEY = "USER_TEMPLATE"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def checked_attributes(attrs):
    """{KEY: "text"} from a mapping of names to scalars; InvalidArgument
    naming the first bad name or value."""
    if not isinstance(attrs, dict):
        raise InvalidArgument(f"attributes: expected a mapping of names to values, got "
                              f"{type(attrs).__name__}")
    out = {}
    for name, value in attrs.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"attributes: {name!r} is not a valid attribute name "
                                  "(letters, digits and _, not starting with a digit)")
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise InvalidArgument(f"attributes {name}: the value must be text or a number")
        out[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def user_template(vm):
    return dict((vm.template or {}).get(KEY) or {})


def update(session, vm_id, attrs, replace=False):
    """Merge ``attrs`` into the VM's user template (``replace``: make it
    exactly ``attrs``); returns the VM. A VM that is DONE is not updated."""
    attrs = checked_attributes(attrs)
    vm = get_row(session, VirtualMachine, vm_id, "VM", lock=True)
    if vm.state == "DONE":
        raise FailedPrecondition(f"VM {vm_id} is DONE: its template can no longer change")
    current = {} if replace else user_template(vm)
    vm.template = {**(vm.template or {}), KEY: {**current, **attrs}}
    vm.updated_at = utcnow()
    outbox.add_event(session, messages.LIFECYCLE, messages.VM_UPDATED, {
        "id": vm.id, "owner_id": vm.owner_id, "seq": vm.seq,
        "user_template": vm.template[KEY], "at": vm.updated_at.isoformat()})
    return vm
