"""The approval process: a BPMN 2.0 file run by SpiffWorkflow.

- The process's variables are the request's data (``process_data``): vcpu,
  memory (MB), memory_gb, cpu, owner, role, groups, group, template, kind.
  Gateway conditions are Python expressions over them.
- A user task is an approval; the lane it sits in names the role that decides
  it (``APPROVER_ROLES``). A decision sets ``approved`` and ``reason`` in the
  task's data, and the engine runs on to the next wait or the end.
- The request is approved when the process ends with ``approved`` not false:
  a process with no user task on its path approves on its own.

The whole workflow (with its spec) serializes to JSON, which the requests
service writes at every step; a request keeps the process it started with.
"""
import hashlib
from functools import lru_cache

from lxml import etree
from SpiffWorkflow import TaskState
from SpiffWorkflow.bpmn import BpmnWorkflow
from SpiffWorkflow.bpmn.parser import BpmnParser, BpmnValidator
from SpiffWorkflow.bpmn.script_engine import PythonScriptEngine, TaskDataEnvironment
from SpiffWorkflow.bpmn.serializer import BpmnWorkflowSerializer
from SpiffWorkflow.bpmn.specs.defaults import UserTask
from SpiffWorkflow.exceptions import SpiffWorkflowException

from cirrus.errors import InvalidArgument

APPROVER_ROLES = ("finance", "cloud-admin")
BPMN_NS = "http://www.omg.org/spec/BPMN/20100524/MODEL"
# what a condition may call: arithmetic and comparisons need no more, and no
# import or open reaches a loaded file's expressions
SAFE_BUILTINS = {name: __builtins__[name] if isinstance(__builtins__, dict)
                 else getattr(__builtins__, name)
                 for name in ("abs", "all", "any", "bool", "float", "int", "len", "max", "min",
                              "round", "str", "sum", "True", "False", "None")}
ENGINE = PythonScriptEngine(environment=TaskDataEnvironment({"__builtins__": SAFE_BUILTINS}))
SERIALIZER = BpmnWorkflowSerializer()


def process_data(kind, resources, owner, role, groups, template):
    """The variables a process's decisions read."""
    memory = int(resources.get("memory") or 0)
    return {"kind": kind, "vcpu": int(resources.get("vcpu") or 0),
            "cpu": float(resources.get("cpu") or 0), "memory": memory,
            "memory_gb": memory / 1024, "owner": owner, "role": role,
            "groups": list(groups), "group": groups[0] if groups else "",
            "template": template or {}}


def parse(bpmn):
    """(process id, spec) of the first executable process in ``bpmn`` (text
    or bytes); InvalidArgument with the parser's message if it does not parse,
    has no process, a condition is not an expression, or a user task is not
    in a lane named after an approver role."""
    data = bpmn.encode() if isinstance(bpmn, str) else bytes(bpmn)
    parser = BpmnParser(validator=BpmnValidator())
    try:
        parser.add_bpmn_str(data, "process.bpmn")
        ids = parser.get_process_ids()
        if not ids:
            raise InvalidArgument("the BPMN file has no process")
        process_id = executable_process(data, ids)
        spec = parser.get_spec(process_id)
    except InvalidArgument:
        raise
    except (etree.LxmlError, SpiffWorkflowException, ValueError, KeyError) as exc:
        raise InvalidArgument(f"the BPMN file does not parse: {exc}") from None
    check_conditions(data)
    check_user_tasks(spec)
    return process_id, spec


def executable_process(data, ids):
    root = etree.fromstring(data)
    executable = [p.get("id") for p in root.iter(f"{{{BPMN_NS}}}process")
                  if p.get("isExecutable", "true").lower() == "true" and p.get("id") in ids]
    if not executable:
        raise InvalidArgument("the BPMN file has no executable process (isExecutable=\"true\")")
    return executable[0]


def check_conditions(data):
    root = etree.fromstring(data)
    for flow in root.iter(f"{{{BPMN_NS}}}sequenceFlow"):
        for condition in flow.iter(f"{{{BPMN_NS}}}conditionExpression"):
            text = (condition.text or "").strip()
            try:
                compile(text, flow.get("id"), "eval")
            except SyntaxError as exc:
                raise InvalidArgument(f"sequence flow {flow.get('id')}: condition {text!r} is "
                                   f"not an expression: {exc.msg}") from None


def check_user_tasks(spec):
    for task_spec in spec.task_specs.values():
        if isinstance(task_spec, UserTask) and task_spec.lane not in APPROVER_ROLES:
            raise InvalidArgument(
                f"user task {task_spec.bpmn_id} ({task_spec.bpmn_name}) is in lane "
                f"{task_spec.lane!r}: put each approval in a lane named after the role that "
                f"decides it ({', '.join(APPROVER_ROLES)})")


@lru_cache(maxsize=16)
def spec_of(bpmn):
    return parse(bpmn)[1]


def digest(bpmn):
    return hashlib.sha256(bpmn.encode()).hexdigest()


def start(bpmn, data):
    """A new workflow of the process ``bpmn`` over ``data``, run to its first wait."""
    workflow = BpmnWorkflow(spec_of(bpmn), script_engine=ENGINE)
    for task in workflow.get_tasks(state=TaskState.READY):
        task.data.update(data)
    return run(workflow)


def run(workflow):
    try:
        workflow.do_engine_steps()
    except SpiffWorkflowException as exc:
        # a condition that fails on this request's data (a name it lacks...)
        raise InvalidArgument(f"the approval process failed: {exc}") from None
    return workflow


def dumps(workflow):
    return SERIALIZER.serialize_json(workflow)


def loads(text):
    workflow = SERIALIZER.deserialize_json(text)
    workflow.script_engine = ENGINE
    return workflow


def waiting(workflow):
    """The approvals the workflow waits for: [(task, step name, role)]."""
    return [(task, task.task_spec.bpmn_name or task.task_spec.bpmn_id, task.task_spec.lane)
            for task in workflow.get_tasks(state=TaskState.READY, manual=True)]


def decide(workflow, task, approved, reason, who):
    task.data.update(approved=bool(approved), reason=reason or "", decided_by=who)
    task.run()
    return run(workflow)


def outcome(workflow):
    """None while running, else "approved" or "rejected"."""
    if not workflow.is_completed():
        return None
    return "rejected" if workflow.data.get("approved") is False else "approved"
