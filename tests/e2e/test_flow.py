"""OneFlow's reference scenario on a whole cluster (cirrus-launch, the
embedded libvirt test driver), through the SDK and gRPC: a 2-role straight
service, master then slave, with the READY gate. The guests' READY=YES is set
through lifecycle's update call until OneGate lands."""
from tests.broker import rpc_proxy
from tests.procs import wait_until


def test_a_straight_master_slave_service_waits_for_ready_then_runs_and_undeploys(cluster):
    api = cluster.client()
    small = "CPU = 0.1\nMEMORY = 64\n"
    template = api.create_flow_template({
        "name": "master-slave", "deployment": "straight", "ready_status_gate": True,
        "custom_attrs": {"GREETING": "M|text|a word for the guests||"},
        "roles": [{"name": "master", "cardinality": 1, "vm_template_contents": small},
                  {"name": "slave", "cardinality": 2, "parents": ["master"],
                   "vm_template_contents": small}]})
    service = api.instantiate_flow_template(template["id"], custom_attrs={"GREETING": "hi"})
    sid = service["id"]

    def roles():
        return {r["name"]: r for r in api.get_flow(sid)["roles"]}

    def nodes(name):
        return roles()[name].get("nodes") or []

    with rpc_proxy(cluster.env["CIRRUS_AMQP_URI"], "lifecycle") as lifecycle:
        wait_until(lambda: [n["status"] for n in nodes("master")] == ["RUNNING"], 60,
                   what="master's VM RUNNING")
        assert roles()["slave"]["state"] == "PENDING"      # master is not READY yet
        [master] = nodes("master")
        context = lifecycle.get_vm(master["vm_id"])["template"]["CONTEXT"]
        assert (context["SERVICE_ID"], context["ROLE_NAME"], context["GREETING"]) == \
            (str(sid), "master", "hi")
        lifecycle.update_vm_template(master["vm_id"], {"READY": "YES"})
        wait_until(lambda: len(nodes("slave")) == 2 and all(
            n["status"] == "RUNNING" for n in nodes("slave")), 60, what="slaves RUNNING")
        assert api.get_flow(sid)["state"] == "DEPLOYING"
        for node in nodes("slave"):
            lifecycle.update_vm_template(node["vm_id"], {"READY": "YES"})
        wait_until(lambda: api.get_flow(sid)["state"] == "RUNNING", 60, what="RUNNING")
        vms = [n["vm_id"] for r in roles().values() for n in r["nodes"]]
        api.delete_flow(sid)
        wait_until(lambda: api.get_flow(sid)["state"] == "DONE", 60, what="DONE")
        assert {lifecycle.get_vm(v)["status"] for v in vms} == {"DONE"}
