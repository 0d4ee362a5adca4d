"""A small SDK for Cirrus's gRPC API: every method returns plain dicts.

    from cirrus.client import Client
    with Client() as cirrus:
        vm = cirrus.create_vm(name="web", cpu=1, vcpu=1, memory=512)
        cirrus.wait_vm(vm["id"], "RUNNING", timeout=60)

Credentials, first found wins: the arguments; CIRRUS_TOKEN; the token file
``~/.config/cirrus/token`` that ``cirrus login`` writes; CIRRUS_USER and
CIRRUS_PASSWORD; the configuration's bootstrap admin. Errors raise
ClientError with the gRPC status name and its details.
"""
import base64
import json
import os
import time
import uuid
from datetime import timezone
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from cirrus import config, states
from cirrus.template import is_digits
from cirrus.v1 import (
    host_pb2, host_pb2_grpc, session_pb2, session_pb2_grpc, template_pb2,
    template_pb2_grpc, vm_pb2, vm_pb2_grpc,
)
from cirrus.v1 import (
    datastore_pb2, datastore_pb2_grpc, image_pb2, image_pb2_grpc, vnet_pb2, vnet_pb2_grpc,
)
from cirrus.v1 import cluster_pb2, cluster_pb2_grpc, vmgroup_pb2, vmgroup_pb2_grpc
from cirrus.v1 import flow_pb2, flow_pb2_grpc
from cirrus.v1 import gate_pb2, gate_pb2_grpc
from cirrus.v1 import status_pb2, status_pb2_grpc
from cirrus.v1 import (
    audit_pb2, audit_pb2_grpc, request_pb2, request_pb2_grpc, user_pb2, user_pb2_grpc,
)

# statuses a VM does not leave on its own: waiting for anything else is over
FINAL_STATUSES = frozenset({"DONE"} | {s for s, short in states.SHORT_NAMES.items()
                                       if short == "fail"})
# a broken or refused stream: wait_vm carries on by polling with Get
_RETRY_WATCH = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL}
_RETRY_WATCH_NAMES = {code.name for code in _RETRY_WATCH}
# well-known types that MessageToDict turns into plain JSON values
_JSON_VALUED = {"google.protobuf.Struct", "google.protobuf.Timestamp",
                "google.protobuf.Value", "google.protobuf.ListValue"}


class ClientError(Exception):
    """A failed call: ``code`` is the gRPC status name (NOT_FOUND...)."""

    def __init__(self, code, details):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def token_path():
    return Path.home() / ".config" / "cirrus" / "token"


def save_token(token, path=None):
    """Write the login token, readable by its owner only."""
    path = Path(path or token_path())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)   # in case the file was there with looser bits
    return path


def read_token(path=None):
    try:
        return Path(path or token_path()).read_text().strip() or None
    except FileNotFoundError:
        return None


def default_credentials(environ=None):
    """{"token": T} or {"username": U, "password": P}, from the environment,
    the token file, or the configuration's bootstrap admin."""
    environ = os.environ if environ is None else environ
    if environ.get("CIRRUS_TOKEN"):
        return {"token": environ["CIRRUS_TOKEN"]}
    token = read_token()
    if token:
        return {"token": token}
    if environ.get("CIRRUS_USER"):
        return {"username": environ["CIRRUS_USER"],
                "password": environ.get("CIRRUS_PASSWORD", "")}
    auth = config.get()["auth"]
    return {"username": str(auth["admin_user"]), "password": str(auth["admin_password"])}


def authorization(credentials):
    """The ``authorization`` metadata value for credentials."""
    if credentials.get("token"):
        return f"Bearer {credentials['token']}"
    pair = f"{credentials['username']}:{credentials.get('password') or ''}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def default_address():
    gateway = config.get()["gateway"]
    return f"{gateway['address']}:{gateway['port']}"


def channel(address, tls_ca=None):
    """A channel to the gateway at ``address``: TLS when ``tls_ca`` (default:
    the configuration's gateway.tls_ca) is the PEM file of the CAs to trust,
    or "system" for the system's own; plaintext when neither says so."""
    tls_ca = tls_ca or config.get()["gateway"].get("tls_ca")
    if not tls_ca:
        return grpc.insecure_channel(address)
    roots = None if tls_ca == "system" else config.read_pem("gateway.tls_ca", tls_ca,
                                                             "CERTIFICATE")
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots))


def to_dict(message):
    """A message as a dict with the proto's field names. Unset optional
    fields are None, rather than missing, so ``vm["host"]`` always works."""
    data = MessageToDict(message, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)
    _add_nones(message, data)
    return data


def _add_nones(message, data):
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            if not field.is_repeated:
                data[field.name] = None
        elif field.message_type is not None and \
                field.message_type.full_name not in _JSON_VALUED and \
                not field.message_type.GetOptions().map_entry:     # maps are plain dicts
            value = getattr(message, field.name)
            if field.is_repeated:
                for item, item_data in zip(value, data[field.name]):
                    _add_nones(item, item_data)
            else:
                _add_nones(value, data[field.name])


def resolve_id(ref, listing, kind):
    """The id of a resource given by id (an int or a string of digits) or by
    name, looked up among ``listing()``; a name that several share is refused."""
    if isinstance(ref, int) or is_digits(str(ref)):
        return int(ref)
    ids = [found["id"] for found in listing() if found["name"] == ref]
    if not ids:
        raise ClientError("NOT_FOUND", f"{kind} {ref!r} does not exist")
    if len(ids) > 1:
        raise ClientError("INVALID_ARGUMENT", f"{len(ids)} {kind}s are called {ref!r} "
                          f"(ids {', '.join(map(str, ids))}): give the id")
    return ids[0]


class Client:
    def __init__(self, address=None, token=None, username=None, password=None, timeout=30,
                 request_id=None, tls_ca=None):
        self.address = address or default_address()
        self.request_id = request_id    # every call's x-request-id, unless one is given
        if token:
            self.credentials = {"token": token}
        elif username:
            self.credentials = {"username": username, "password": password or ""}
        else:
            self.credentials = default_credentials()
        self.timeout = timeout
        self.channel = channel(self.address, tls_ca)
        self.vms = vm_pb2_grpc.VirtualMachineServiceStub(self.channel)
        self.hosts = host_pb2_grpc.HostServiceStub(self.channel)
        self.templates = template_pb2_grpc.TemplateServiceStub(self.channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        self.datastores = datastore_pb2_grpc.DatastoreServiceStub(self.channel)
        self.images = image_pb2_grpc.ImageServiceStub(self.channel)
        self.vnets = vnet_pb2_grpc.VirtualNetworkServiceStub(self.channel)
        self.clusters = cluster_pb2_grpc.ClusterServiceStub(self.channel)
        self.vmgroups = vmgroup_pb2_grpc.VmGroupServiceStub(self.channel)
        self.flow_templates = flow_pb2_grpc.FlowTemplateServiceStub(self.channel)
        self.flows = flow_pb2_grpc.FlowServiceStub(self.channel)
        self.users = user_pb2_grpc.UserServiceStub(self.channel)
        self.groups = user_pb2_grpc.GroupServiceStub(self.channel)
        self.quotas = user_pb2_grpc.QuotaServiceStub(self.channel)
        self.requests = request_pb2_grpc.RequestServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.gate = gate_pb2_grpc.GateServiceStub(self.channel)
        self.status_service = status_pb2_grpc.StatusServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _metadata(self, request_id=None):
        metadata = [("authorization", authorization(self.credentials))]
        request_id = request_id or self.request_id
        if request_id:
            metadata.append(("x-request-id", request_id))
        return metadata

    def _call(self, method, request, request_id=None, timeout=None):
        try:
            return method(request, metadata=self._metadata(request_id),
                          timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None

    # -------------------------------------------------------------- session

    def login(self, username=None, password=None):
        """A token for the user: {"token", "expires_at", "user": {...}}."""
        if username is None:
            username, password = self.credentials.get("username"), self.credentials.get("password")
        request = session_pb2.LoginRequest(username=username or "", password=password or "")
        return to_dict(self._call(self.sessions.Login, request))

    def logout(self):
        """Forget this client's token on the server: it stops working at once."""
        self._call(self.sessions.Logout, session_pb2.LogoutRequest())

    # -------------------------------------------------------------- hosts

    def create_host(self, name, ha=None):
        """Register a host; ``ha`` is its failure policy, "none" (default) or "reschedule"."""
        return to_dict(self._call(self.hosts.Create,
                                  host_pb2.CreateHostRequest(name=name, ha=ha or "")))

    def host_id(self, host):
        """The id of a host given by id (an int or a string of digits) or by name."""
        return resolve_id(host, self.list_hosts, "host")

    def get_host(self, host_id):
        return to_dict(self._call(self.hosts.Get, host_pb2.GetHostRequest(id=host_id)))

    def list_hosts(self):
        reply = self._call(self.hosts.List, host_pb2.ListHostsRequest())
        return [to_dict(h) for h in reply.hosts]

    def enable_host(self, host_id):
        return to_dict(self._call(self.hosts.Enable, host_pb2.EnableHostRequest(id=host_id)))

    def disable_host(self, host_id):
        return to_dict(self._call(self.hosts.Disable, host_pb2.DisableHostRequest(id=host_id)))

    def delete_host(self, host_id):
        return to_dict(self._call(self.hosts.Delete, host_pb2.DeleteHostRequest(id=host_id)))

    def offline_host(self, host_id):
        return to_dict(self._call(self.hosts.Offline, host_pb2.OfflineHostRequest(id=host_id)))

    def flush_host(self, host_id):
        return to_dict(self._call(self.hosts.Flush, host_pb2.FlushHostRequest(id=host_id)))

    def update_host(self, host_id, ha=None, template=None):
        """Change a host's HA policy and/or merge KEY=VALUE into its template
        (an empty value removes the key)."""
        request = host_pb2.UpdateHostRequest(id=host_id, ha=ha)
        if template:
            request.template.update({str(k): str(v) for k, v in template.items()})
        return to_dict(self._call(self.hosts.Update, request))

    # -------------------------------------------------------------- clusters

    def create_cluster(self, name, template=None):
        request = cluster_pb2.CreateClusterRequest(name=name)
        if template:
            request.template.update({str(k): str(v) for k, v in template.items()})
        return to_dict(self._call(self.clusters.Create, request))

    def cluster_id(self, cluster):
        return resolve_id(cluster, self.list_clusters, "cluster")

    def get_cluster(self, cluster_id):
        return to_dict(self._call(self.clusters.Get, cluster_pb2.GetClusterRequest(id=cluster_id)))

    def list_clusters(self):
        reply = self._call(self.clusters.List, cluster_pb2.ListClustersRequest())
        return [to_dict(c) for c in reply.clusters]

    def delete_cluster(self, cluster_id):
        return to_dict(self._call(self.clusters.Delete,
                                  cluster_pb2.DeleteClusterRequest(id=cluster_id)))

    def cluster_add_host(self, cluster_id, host_id):
        return to_dict(self._call(self.clusters.AddHost, cluster_pb2.ClusterHostRequest(
            id=cluster_id, host_id=host_id)))

    def cluster_del_host(self, cluster_id, host_id):
        return to_dict(self._call(self.clusters.DelHost, cluster_pb2.ClusterHostRequest(
            id=cluster_id, host_id=host_id)))

    # -------------------------------------------------------------- VM groups

    def create_vmgroup(self, name, roles, rules=()):
        """``roles``: [{"name", "policy", "host_affined", "host_anti_affined"}];
        ``rules``: [{"policy": "AFFINED" | "ANTI_AFFINED", "roles": [...]}]."""
        request = vmgroup_pb2.CreateVmGroupRequest(
            name=name,
            roles=[vmgroup_pb2.VmGroupRole(
                name=r["name"], policy=r.get("policy") or "",
                host_affined=r.get("host_affined") or [],
                host_anti_affined=r.get("host_anti_affined") or []) for r in roles],
            rules=[vmgroup_pb2.VmGroupRule(policy=r["policy"], roles=r["roles"])
                   for r in rules or ()])
        return to_dict(self._call(self.vmgroups.Create, request))

    def vmgroup_id(self, group):
        return resolve_id(group, self.list_vmgroups, "VM group")

    def get_vmgroup(self, group_id):
        return to_dict(self._call(self.vmgroups.Get, vmgroup_pb2.GetVmGroupRequest(id=group_id)))

    def list_vmgroups(self):
        reply = self._call(self.vmgroups.List, vmgroup_pb2.ListVmGroupsRequest())
        return [to_dict(g) for g in reply.vmgroups]

    def delete_vmgroup(self, group_id):
        return to_dict(self._call(self.vmgroups.Delete,
                                  vmgroup_pb2.DeleteVmGroupRequest(id=group_id)))

    # -------------------------------------------------------------- VMs

    def create_vm(self, name=None, cpu=None, vcpu=None, memory=None, template=None,
                  hold=False, request_id=None, requirements=None, rank=None, vmgroup=None):
        """Create a VM; None leaves a value to the template (or the server).
        A retry after UNAVAILABLE reuses the request id, so it makes one VM."""
        request = vm_pb2.CreateVmRequest(name=name, cpu=cpu, vcpu=vcpu, memory=memory,
                                         template=template or "", hold=hold,
                                         requirements=requirements, rank=rank, vmgroup=vmgroup)
        request_id = request_id or self.request_id or uuid.uuid4().hex
        try:
            reply = self._call(self.vms.Create, request, request_id)
        except ClientError as exc:
            if exc.code != "UNAVAILABLE":
                raise
            time.sleep(0.5)
            reply = self._call(self.vms.Create, request, request_id)
        return to_dict(reply)

    def get_vm(self, vm_id):
        """One VM with its template, history, stays, and what it holds while
        placed: "disks", "nics" and "context" (values, CD path, token yes/no)."""
        return to_dict(self._call(self.vms.Get, vm_pb2.GetVmRequest(id=vm_id)))

    def list_vms(self, include_done=False):
        reply = self._call(self.vms.List, vm_pb2.ListVmsRequest(include_done=include_done))
        return [to_dict(vm) for vm in reply.vms]

    def terminate_vm(self, vm_id, hard=False):
        return to_dict(self._call(self.vms.Terminate,
                                  vm_pb2.TerminateVmRequest(id=vm_id, hard=hard)))

    def vm_action(self, vm_id, action, hard=False, live=False, host_id=None, operation=None):
        """Any user action on a VM (poweroff, resume, migrate...; see
        VmActionRequest in vm.proto); returns the VM as the action left it."""
        request = vm_pb2.VmActionRequest(id=vm_id, action=action, hard=hard, live=live,
                                         host_id=host_id, operation=operation)
        return to_dict(self._call(self.vms.Action, request))

    def accounting(self, user=None, start=None, end=None):
        """CPU-hours and memory-GB-hours per VM and per user over [start, end):
        datetimes (naive ones are UTC) or None for an open end."""
        request = vm_pb2.AccountingRequest(user=user)
        for name, moment in (("start", start), ("end", end)):
            if moment is not None:
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=timezone.utc)
                getattr(request, name).FromDatetime(moment.astimezone(timezone.utc))
        return to_dict(self._call(self.vms.Accounting, request))

    def watch_vms(self, vm_id=None, timeout=None, status=None, user=None):
        """Yield state changes as dicts: first the current state(s) (``current``
        true), then each change, until the caller stops iterating. ``status``
        keeps the changes into that status (or state, e.g. ACTIVE), ``user``
        those of that user's VMs."""
        request = vm_pb2.WatchVmsRequest(id=vm_id, status=status, user=user)
        stream = self.vms.Watch(request, metadata=self._metadata(), timeout=timeout)
        try:
            for change in stream:
                yield to_dict(change)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None
        finally:
            stream.cancel()

    def wait_vm(self, vm_id, status, timeout=60):
        """Block until the VM's status is ``status``; returns the VM.

        Raises ClientError DEADLINE_EXCEEDED on timeout, FAILED_PRECONDITION if
        the VM reaches DONE or a failure state instead. Built on Watch; if the
        stream breaks or is refused it goes on with Get.
        """
        target = str(status).upper()
        if target not in states.ALL_STATUSES:
            raise ClientError("INVALID_ARGUMENT", f"unknown VM status {status!r}; expected one "
                              f"of {', '.join(states.ALL_STATUSES)}")
        deadline = time.monotonic() + timeout
        last = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError("DEADLINE_EXCEEDED", f"VM {vm_id} did not reach {target} "
                                  f"within {timeout:g}s; it is {last or 'unknown'}")
            try:
                stream = self.vms.Watch(vm_pb2.WatchVmsRequest(id=vm_id),
                                        metadata=self._metadata(), timeout=remaining)
                try:
                    for change in stream:
                        last = change.status
                        if self._reached(vm_id, target, change.status, change.error):
                            return self.get_vm(vm_id)
                finally:
                    stream.cancel()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue    # the loop reports the timeout with the last status
                if exc.code() not in _RETRY_WATCH:
                    raise ClientError(exc.code().name, exc.details()) from None
            # the stream ended or broke: look with Get, then watch again
            try:
                vm = self.get_vm(vm_id)
            except ClientError as exc:
                if exc.code != "UNAVAILABLE":
                    raise
            else:
                last = vm["status"]
                if self._reached(vm_id, target, vm["status"], vm.get("error")):
                    return vm
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    @staticmethod
    def _reached(vm_id, target, current, error):
        if current == target:
            return True
        if current in FINAL_STATUSES:
            reason = f": {error}" if error else ""
            raise ClientError("FAILED_PRECONDITION",
                              f"VM {vm_id} reached {current} instead of {target}{reason}")
        return False

    # -------------------------------------------------------------- templates

    def create_template(self, text, name=""):
        request = template_pb2.CreateTemplateRequest(name=name or "", text=text)
        return to_dict(self._call(self.templates.Create, request))

    def get_template(self, template_id):
        return to_dict(self._call(self.templates.Get,
                                  template_pb2.GetTemplateRequest(id=template_id)))

    def list_templates(self):
        reply = self._call(self.templates.List, template_pb2.ListTemplatesRequest())
        return [to_dict(t) for t in reply.templates]

    def delete_template(self, template_id):
        return to_dict(self._call(self.templates.Delete,
                                  template_pb2.DeleteTemplateRequest(id=template_id)))

    def instantiate_template(self, template_id, name=None, hold=False):
        request = template_pb2.InstantiateTemplateRequest(id=template_id, name=name, hold=hold)
        return to_dict(self._call(self.templates.Instantiate, request))

    # -------------------------------------------------------------- datastores (issue 5)

    def create_datastore(self, name, type, path, host_id=None):
        """Register a datastore: ``type`` IMAGE (a directory on the front end)
        or SYSTEM (a node's directory of running VMs, on host ``host_id``)."""
        request = datastore_pb2.CreateDatastoreRequest(name=name, type=type, path=path,
                                                       host_id=host_id)
        return to_dict(self._call(self.datastores.Create, request))

    def datastore_id(self, datastore):
        return resolve_id(datastore, self.list_datastores, "datastore")

    def get_datastore(self, datastore_id):
        return to_dict(self._call(self.datastores.Get,
                                  datastore_pb2.GetDatastoreRequest(id=datastore_id)))

    def list_datastores(self):
        reply = self._call(self.datastores.List, datastore_pb2.ListDatastoresRequest())
        return [to_dict(d) for d in reply.datastores]

    def delete_datastore(self, datastore_id):
        return to_dict(self._call(self.datastores.Delete,
                                  datastore_pb2.DeleteDatastoreRequest(id=datastore_id)))

    # -------------------------------------------------------------- images (issue 5)

    def create_image(self, name, path, datastore=None, persistent=False):
        """Register the qcow2 or raw file at ``path`` (on the front end) as an
        image, in ``datastore`` (name or id; default: the only IMAGE datastore)."""
        request = image_pb2.CreateImageRequest(
            name=name, path=path, persistent=persistent,
            datastore=None if datastore is None else str(datastore))
        return to_dict(self._call(self.images.Create, request))

    def image_id(self, image):
        return resolve_id(image, self.list_images, "image")

    def get_image(self, image_id):
        return to_dict(self._call(self.images.Get, image_pb2.GetImageRequest(id=image_id)))

    def list_images(self):
        reply = self._call(self.images.List, image_pb2.ListImagesRequest())
        return [to_dict(i) for i in reply.images]

    def delete_image(self, image_id):
        return to_dict(self._call(self.images.Delete, image_pb2.DeleteImageRequest(id=image_id)))

    def set_image_persistent(self, image_id, persistent):
        request = image_pb2.SetImagePersistentRequest(id=image_id, persistent=persistent)
        return to_dict(self._call(self.images.SetPersistent, request))

    # -------------------------------------------------------------- virtual networks (issue 5)

    def create_vnet(self, template, name=""):
        """A network from an OpenNebula template (NAME, NETWORK_MASK, GATEWAY,
        DNS and AR = [TYPE=IP4, IP=..., SIZE=...] vectors); see vnet.proto."""
        request = vnet_pb2.CreateVnetRequest(name=name or "", template=template)
        return to_dict(self._call(self.vnets.Create, request))

    def vnet_id(self, vnet):
        return resolve_id(vnet, self.list_vnets, "virtual network")

    def get_vnet(self, vnet_id):
        return to_dict(self._call(self.vnets.Get, vnet_pb2.GetVnetRequest(id=vnet_id)))

    def list_vnets(self):
        reply = self._call(self.vnets.List, vnet_pb2.ListVnetsRequest())
        return [to_dict(v) for v in reply.vnets]

    def delete_vnet(self, vnet_id):
        return to_dict(self._call(self.vnets.Delete, vnet_pb2.DeleteVnetRequest(id=vnet_id)))

    def vnet_hold(self, vnet_id, address):
        """Keep an address (IPv4, IPv6 or MAC) from being leased."""
        request = vnet_pb2.VnetAddressRequest(id=vnet_id, address=address)
        return to_dict(self._call(self.vnets.Hold, request))

    def vnet_release(self, vnet_id, address):
        request = vnet_pb2.VnetAddressRequest(id=vnet_id, address=address)
        return to_dict(self._call(self.vnets.Release, request))

    def vnet_addar(self, vnet_id, template):
        """Add the address range of ``template`` (``AR = [...]`` or its keys alone)."""
        request = vnet_pb2.AddAddressRangeRequest(id=vnet_id, template=template)
        return to_dict(self._call(self.vnets.AddAddressRange, request))

    def vnet_rmar(self, vnet_id, ar_id):
        request = vnet_pb2.RemoveAddressRangeRequest(id=vnet_id, ar_id=ar_id)
        return to_dict(self._call(self.vnets.RemoveAddressRange, request))

    # -------------------------------------------------------------- OneFlow (issue 6)

    @staticmethod
    def _flow_template(message):
        """A FlowTemplate as a dict, its JSON body decoded."""
        template = to_dict(message)
        template["body"] = json.loads(template["body"]) if template["body"] else {}
        return template

    def create_flow_template(self, body):
        """Save a service template: OneFlow JSON, as text or a dict."""
        request = flow_pb2.CreateFlowTemplateRequest(body=_json_text(body))
        return self._flow_template(self._call(self.flow_templates.Create, request))

    def flow_template_id(self, template):
        return resolve_id(template, self.list_flow_templates, "service template")

    def list_flow_templates(self):
        reply = self._call(self.flow_templates.List, flow_pb2.ListFlowTemplatesRequest())
        return [self._flow_template(t) for t in reply.templates]

    def get_flow_template(self, template_id):
        return self._flow_template(self._call(self.flow_templates.Get,
                                              flow_pb2.GetFlowTemplateRequest(id=template_id)))

    def update_flow_template(self, template_id, body):
        request = flow_pb2.UpdateFlowTemplateRequest(id=template_id, body=_json_text(body))
        return self._flow_template(self._call(self.flow_templates.Update, request))

    def delete_flow_template(self, template_id):
        return self._flow_template(self._call(
            self.flow_templates.Delete, flow_pb2.DeleteFlowTemplateRequest(id=template_id)))

    def clone_flow_template(self, template_id, name):
        request = flow_pb2.CloneFlowTemplateRequest(id=template_id, name=name)
        return self._flow_template(self._call(self.flow_templates.Clone, request))

    def instantiate_flow_template(self, template_id, name=None, custom_attrs=None,
                                  networks=None):
        """Start a service: ``custom_attrs`` {NAME: value}, ``networks``
        {network name: virtual network id}."""
        request = flow_pb2.InstantiateFlowTemplateRequest(
            id=template_id, name=name,
            custom_attrs={str(k): str(v) for k, v in (custom_attrs or {}).items()},
            networks={str(k): int(v) for k, v in (networks or {}).items()})
        return to_dict(self._call(self.flow_templates.Instantiate, request))

    def flow_id(self, service):
        return resolve_id(service, self.list_flows, "service")

    def list_flows(self):
        reply = self._call(self.flows.List, flow_pb2.ListFlowsRequest())
        return [to_dict(f) for f in reply.flows]

    def get_flow(self, service_id):
        return to_dict(self._call(self.flows.Get, flow_pb2.GetFlowRequest(id=service_id)))

    def delete_flow(self, service_id):
        """Undeploy a service: its roles shut down in reverse order, then DONE."""
        return to_dict(self._call(self.flows.Delete, flow_pb2.DeleteFlowRequest(id=service_id)))

    def recover_flow(self, service_id, delete=False):
        request = flow_pb2.RecoverFlowRequest(id=service_id, delete=delete)
        return to_dict(self._call(self.flows.Recover, request))

    def release_flow(self, service_id):
        return to_dict(self._call(self.flows.Release, flow_pb2.ReleaseFlowRequest(id=service_id)))

    def scale_flow(self, service_id, role, cardinality, force=False):
        request = flow_pb2.ScaleFlowRequest(id=service_id, role=role, cardinality=cardinality,
                                            force=force)
        return to_dict(self._call(self.flows.Scale, request))

    def flow_role_action(self, service_id, role, action, period=0, number=0):
        """A VM action on every VM of a role; ``number`` of them every
        ``period`` seconds when both are set."""
        request = flow_pb2.FlowRoleActionRequest(id=service_id, role=role, action=action,
                                                 period=period or 0, number=number or 0)
        return to_dict(self._call(self.flows.RoleAction, request))

    def add_flow_role(self, service_id, body):
        """Add a role (OneFlow JSON of one role, as text or a dict) to a
        deployed service; it deploys after its parents."""
        request = flow_pb2.AddFlowRoleRequest(id=service_id, body=_json_text(body))
        return to_dict(self._call(self.flows.AddRole, request))

    def remove_flow_role(self, service_id, role):
        """Remove a role: its VMs end first, then it leaves the service."""
        request = flow_pb2.RemoveFlowRoleRequest(id=service_id, role=role)
        return to_dict(self._call(self.flows.RemoveRole, request))

    def watch_flows(self, service_id=None, timeout=None):
        """Yield {"flow": service, "current": bool}: first the current state(s),
        then the whole service again at each change, until the caller stops."""
        stream = self.flows.Watch(flow_pb2.WatchFlowsRequest(id=service_id),
                                  metadata=self._metadata(), timeout=timeout)
        try:
            for change in stream:
                yield to_dict(change)
        except grpc.RpcError as exc:
            raise ClientError(exc.code().name, exc.details()) from None
        finally:
            stream.cancel()

    def follow_flow(self, service_id, timeout=600):
        """Yield a service each time it changes, from Watch; a broken or
        refused stream goes on with Get and a new Watch. Raises ClientError
        DEADLINE_EXCEEDED after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError("DEADLINE_EXCEEDED", f"service {service_id} is still {state} "
                                  f"after {timeout:g}s")
            try:
                for change in self.watch_flows(service_id, timeout=remaining):
                    state = change["flow"]["state"]
                    yield change["flow"]
            except ClientError as exc:
                if exc.code == "DEADLINE_EXCEEDED":
                    continue    # the loop reports the timeout with the last state
                if exc.code not in _RETRY_WATCH_NAMES:
                    raise
            try:
                service = self.get_flow(service_id)
            except ClientError as exc:
                if exc.code != "UNAVAILABLE":
                    raise
            else:
                state = service["state"]
                yield service
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def wait_flow(self, service_id, timeout=600):
        """Block until a service is RUNNING; returns it. Raises ClientError
        FAILED_PRECONDITION if it reaches a FAILED state or DONE instead,
        DEADLINE_EXCEEDED on timeout."""
        for service in self.follow_flow(service_id, timeout):
            if deployed(service):
                return service

    # -------------------------------------------------------------- request management (issue 8)

    def create_user(self, name, password, role="user", groups=()):
        return to_dict(self._call(self.users.Create, user_pb2.CreateUserRequest(
            name=name, password=password, role=role or "user", groups=list(groups or ()))))

    def list_users(self):
        return [to_dict(u) for u in self._call(self.users.List,
                                                user_pb2.ListUsersRequest()).users]

    def get_user(self, ref):
        """A user by name or id, with their quota."""
        return to_dict(self._call(self.users.Get, user_pb2.UserRef(ref=str(ref))))

    def delete_user(self, ref):
        return to_dict(self._call(self.users.Delete, user_pb2.UserRef(ref=str(ref))))

    def set_password(self, ref, password):
        return to_dict(self._call(self.users.SetPassword,
                                  user_pb2.SetPasswordRequest(ref=str(ref), password=password)))

    def set_user_role(self, ref, role):
        return to_dict(self._call(self.users.SetRole,
                                  user_pb2.SetRoleRequest(ref=str(ref), role=role)))

    def create_group(self, name):
        return to_dict(self._call(self.groups.Create, user_pb2.CreateGroupRequest(name=name)))

    def list_groups(self):
        return [to_dict(g) for g in self._call(self.groups.List,
                                                user_pb2.ListGroupsRequest()).groups]

    def get_group(self, ref):
        return to_dict(self._call(self.groups.Get, user_pb2.GroupRef(ref=str(ref))))

    def delete_group(self, ref):
        return to_dict(self._call(self.groups.Delete, user_pb2.GroupRef(ref=str(ref))))

    def group_add_user(self, group, user):
        return to_dict(self._call(self.groups.AddUser, user_pb2.GroupMemberRequest(
            group=str(group), user=str(user))))

    def group_del_user(self, group, user):
        return to_dict(self._call(self.groups.DelUser, user_pb2.GroupMemberRequest(
            group=str(group), user=str(user))))

    def set_quota(self, scope, ref, **limits):
        """Set limits (vms, cpu, memory, images; -1: no limit) of a user or group."""
        return to_dict(self._call(self.quotas.Set, user_pb2.SetQuotaRequest(
            scope=scope, ref=str(ref), limits=user_pb2.QuotaValues(**limits))))

    def get_quota(self, scope, ref):
        return to_dict(self._call(self.quotas.Get, user_pb2.QuotaRef(scope=scope, ref=str(ref))))

    def submit_vm(self, name=None, cpu=None, vcpu=None, memory=None, template=None, hold=False,
                  request_id=None, requirements=None, rank=None, vmgroup=None,
                  template_id=None):
        """Request a VM (or, with ``template_id``, a VM from a saved template):
        the request, with "vm" when it was provisioned at once."""
        vm = vm_pb2.CreateVmRequest(name=name, cpu=cpu, vcpu=vcpu, memory=memory,
                                    template=template or "", hold=hold,
                                    requirements=requirements, rank=rank, vmgroup=vmgroup)
        return to_dict(self._call(self.requests.SubmitVm, request_pb2.SubmitVmRequest(
            vm=vm, template_id=template_id), request_id or self.request_id or uuid.uuid4().hex))

    def submit_flow(self, template_id, name=None, custom_attrs=None, networks=None,
                    request_id=None):
        """Request a service from a service template: the request, with
        "service" when it was provisioned at once. ``request_id`` (default: a
        new one): a retry with the same one gets the same request and service."""
        request = request_pb2.SubmitFlowRequest(
            template_id=template_id, name=name,
            custom_attrs={str(k): str(v) for k, v in (custom_attrs or {}).items()},
            networks={str(k): int(v) for k, v in (networks or {}).items()})
        return to_dict(self._call(self.requests.SubmitFlow, request,
                                  request_id or self.request_id or uuid.uuid4().hex))

    def list_requests(self, waiting_for=None, state=None, mine=False):
        reply = self._call(self.requests.List, request_pb2.ListRequestsRequest(
            waiting_for=waiting_for, state=state, mine=mine))
        return [to_dict(r) for r in reply.requests]

    def get_request(self, request_id):
        return to_dict(self._call(self.requests.Get,
                                  request_pb2.GetProvisionRequest(id=request_id)))

    def approve_request(self, request_id, reason=""):
        return to_dict(self._call(self.requests.Approve,
                                  request_pb2.DecideRequest(id=request_id, reason=reason or "")))

    def reject_request(self, request_id, reason):
        return to_dict(self._call(self.requests.Reject,
                                  request_pb2.DecideRequest(id=request_id, reason=reason or "")))

    def request_stats(self):
        return to_dict(self._call(self.requests.Stats, request_pb2.RequestStatsRequest()))

    def load_process(self, bpmn):
        return to_dict(self._call(self.requests.LoadProcess,
                                  request_pb2.LoadProcessRequest(bpmn=bpmn)))

    def get_process(self):
        return to_dict(self._call(self.requests.GetProcess, request_pb2.GetProcessRequest()))

    def list_audit(self, object_kind=None, object_id=None, actor=None, after_id=None,
                   limit=None):
        reply = self._call(self.audit.List, audit_pb2.ListAuditRequest(
            object_kind=object_kind, object_id=None if object_id is None else str(object_id),
            actor=actor, after_id=after_id, limit=limit))
        return [{**to_dict(e), "id": e.id, "details": json.loads(e.details or "{}")}
                for e in reply.entries]

    def audit_entries(self, **filters):
        """Every audit entry matching ``filters``, page after page."""
        after_id = None
        while True:
            page = self.list_audit(after_id=after_id, **filters)
            yield from page
            if len(page) < 1000:
                return
            after_id = int(page[-1]["id"])

    # -------------------------------------------------------------- OneGate

    def rotate_gate_secret(self):
        """A new OneGate secret (administrators): every VM's token made
        before stops working, new deploys get new ones. {"rotated_at"}."""
        return to_dict(self._call(self.gate.RotateSecret, gate_pb2.RotateSecretRequest()))

    # -------------------------------------------------------------- status

    def status(self, service=None):
        """Every process heard from (of ``service``): {"instances": [...],
        "heartbeat_interval", "down_after"}; each instance with its state (UP,
        DOWN, STOPPED), uptime, last heard, version and queue depths."""
        return to_dict(self._call(self.status_service.List,
                                  status_pb2.ListStatusRequest(service=service)))


def deployed(service):
    """Whether a deploy is over: True once the service is RUNNING, False
    while it goes on; ClientError FAILED_PRECONDITION when it ended in a
    FAILED state or DONE."""
    state = service["state"]
    if state == "RUNNING":
        return True
    if state.startswith("FAILED") or state == "DONE":
        reason = f": {service['message']}" if service.get("message") else ""
        raise ClientError("FAILED_PRECONDITION", f"service {service['id']} ({service['name']}) "
                          f"reached {state} instead of RUNNING{reason}")
    return False


def _json_text(body):
    """A template body as JSON text: text as given, anything else encoded."""
    return body if isinstance(body, str) else json.dumps(body)
