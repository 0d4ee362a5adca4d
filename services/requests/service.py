"""The request manager: authenticates every call, validates requests, and
hands them to the service that owns the resource.

Approvals and quotas will sit here too; today a valid request goes straight
to ``lifecycle``.
"""
from nameko.rpc import rpc

from cirrus import auth, config, messages
from cirrus.dependencies import Database, Rpc
from cirrus.errors import CirrusError, NotFound, PermissionDenied, Unauthenticated
from cirrus.template import parse, vm_resources

api = rpc(expected_exceptions=CirrusError)


def parse_template(text):
    return parse(text or "", config.get()["limits"]["template_bytes"])


def allocate_arguments(template, spec):
    """Merge a request's explicit fields over a parsed template's
    NAME/CPU/VCPU/MEMORY; returns the arguments of lifecycle.allocate."""
    template = dict(template)
    for key in ("name", "cpu", "vcpu", "memory"):
        if spec.get(key) is not None:
            template[key.upper()] = str(spec[key])
    resources = vm_resources(template)
    return dict(name=resources["name"], cpu=resources["cpu"], vcpu=resources["vcpu"],
                memory=resources["memory"], template=template, hold=bool(spec.get("hold")),
                request_id=spec.get("request_id"))


class RequestsService:
    name = "requests"

    db = Database()
    lifecycle = Rpc(messages.LIFECYCLE)

    def user(self, credentials):
        with self.db() as session:
            try:
                user = auth.authenticate(session, credentials)
            except auth.AuthError as exc:
                raise Unauthenticated(str(exc)) from None
            return {"id": user.id, "name": user.name, "role": user.role,
                    "admin": user.role == "admin"}

    def owned(self, user, resource, kind, rid):
        """Users see their own resources; admins see all. Others' look absent."""
        if not user["admin"] and resource["owner_id"] != user["id"]:
            raise NotFound(f"{kind} {rid} does not exist")
        return resource

    def admin(self, credentials):
        user = self.user(credentials)
        if not user["admin"]:
            raise PermissionDenied("host management is for administrators")
        return user

    @api
    def login(self, credentials):
        with self.db() as session, session.begin():
            try:
                user, token, expires = auth.login(session, credentials.get("username"),
                                                  credentials.get("password"))
            except auth.AuthError as exc:
                raise Unauthenticated(str(exc)) from None
            return {"token": token, "expires_at": expires.isoformat(),
                    "user": {"id": user.id, "name": user.name, "role": user.role}}

    @api
    def whoami(self, credentials):
        """The caller: {"id", "name", "role", "admin"}."""
        return self.user(credentials)

    # -------------------------------------------------------------- VMs

    @api
    def create_vm(self, credentials, spec):
        user = self.user(credentials)
        template = parse_template(spec["template"]) if spec.get("template") else {}
        return self.lifecycle.allocate(owner_id=user["id"], **allocate_arguments(template, spec))

    @api
    def get_vm(self, credentials, vm_id):
        user = self.user(credentials)
        return self.owned(user, self.lifecycle.get_vm(vm_id), "VM", vm_id)

    @api
    def list_vms(self, credentials, include_done=False):
        user = self.user(credentials)
        return self.lifecycle.list_vms(None if user["admin"] else user["id"], include_done)

    @api
    def terminate_vm(self, credentials, vm_id, hard=False):
        self.get_vm(credentials, vm_id)
        return self.lifecycle.terminate(vm_id, hard)

    # -------------------------------------------------------------- hosts

    @api
    def create_host(self, credentials, name):
        self.admin(credentials)
        return self.lifecycle.create_host(name)

    @api
    def get_host(self, credentials, host_id):
        self.user(credentials)
        return self.lifecycle.get_host(host_id)

    @api
    def list_hosts(self, credentials):
        self.user(credentials)
        return self.lifecycle.list_hosts()

    @api
    def enable_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.enable_host(host_id)

    @api
    def disable_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.disable_host(host_id)

    @api
    def delete_host(self, credentials, host_id):
        self.admin(credentials)
        return self.lifecycle.delete_host(host_id)

    # -------------------------------------------------------------- templates

    @api
    def create_template(self, credentials, name, text):
        user = self.user(credentials)
        return self.lifecycle.create_template(user["id"], name, parse_template(text))

    @api
    def get_template(self, credentials, template_id):
        user = self.user(credentials)
        return self.owned(user, self.lifecycle.get_template(template_id), "template", template_id)

    @api
    def list_templates(self, credentials):
        user = self.user(credentials)
        return self.lifecycle.list_templates(None if user["admin"] else user["id"])

    @api
    def delete_template(self, credentials, template_id):
        self.get_template(credentials, template_id)
        return self.lifecycle.delete_template(template_id)

    @api
    def instantiate_template(self, credentials, template_id, name=None, hold=False):
        user = self.user(credentials)
        template = self.owned(user, self.lifecycle.get_template(template_id), "template",
                              template_id)
        spec = {"name": name or template["name"], "hold": hold}
        return self.lifecycle.allocate(owner_id=user["id"],
                                       **allocate_arguments(template["body"], spec))
