"""A Nameko service for testing ``vm_state_handler`` as services use it:
``python -m tests.event_probe FILE`` handles the ``vm.state.PROBE.*``
changes (a status no VM has, so other tests' events never reach it) and
writes each as a JSON line to FILE, with the request id its worker served.
A change with ``"fail": true`` fails the first time it comes, and its
message goes back to the queue (``requeue_on_error``).

Run it, never import it: importing it applies eventlet's monkey patch to the
importer, and a pytest process patched so hangs in unrelated tests."""
import cirrus.runner  # noqa: F401  (eventlet's monkey patch, before anything else)

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from nameko.runners import ServiceRunner  # noqa: E402

from cirrus import logs, tracing  # noqa: E402
from cirrus.dependencies import vm_state_handler  # noqa: E402
from cirrus.runner import nameko_config  # noqa: E402

PATTERN = "vm.state.PROBE.#"
failed = set()


class EventProbe:
    name = "event_probe"
    trace = tracing.Tracing()

    @vm_state_handler(PATTERN, requeue_on_error=True)
    def on_vm_state(self, event):
        if event.get("fail") and event["id"] not in failed:
            failed.add(event["id"])
            raise RuntimeError(f"VM {event['id']}: failing once, as asked")
        with open(sys.argv[1], "a") as out:
            out.write(json.dumps({"id": event["id"], "request_id": tracing.request_id()}) + "\n")


def main():
    logs.setup_logging()
    runner = ServiceRunner(nameko_config())
    runner.add_service(EventProbe)
    runner.start()
    logging.getLogger("cirrus").info("event_probe started")
    runner.wait()


if __name__ == "__main__":
    main()
