"""Run one Nameko service: ``cirrus-service lifecycle``.

Our own entry point around ServiceRunner, because the ``nameko`` CLI of 2.14
imports pkg_resources. It applies the eventlet monkey patch and makes psycopg2
cooperative before anything else is imported.
"""
import cirrus  # noqa: F401  (silences eventlet's deprecation warning before the import)
import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

from psycogreen.eventlet import patch_psycopg  # noqa: E402

patch_psycopg()

SERVICES = {
    "requests": "services.requests.service:RequestsService",
    "scheduler": "services.scheduler.service:SchedulerService",
    "lifecycle": "services.lifecycle.service:LifecycleService",
    "flow": "services.flow.service:FlowService",
}


def load_service(name):
    module, cls = SERVICES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def nameko_config():
    from cirrus import config
    cfg = config.get()
    return {"AMQP_URI": cfg["amqp"]["uri"],
            "max_workers": cfg["lifecycle"].get("max_workers", 10),
            "serializer": "json"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="cirrus-service", description=__doc__)
    parser.add_argument("service", choices=sorted(SERVICES))
    args = parser.parse_args(argv)

    from cirrus import heartbeat, instance
    instance.start(args.service)
    from nameko.runners import ServiceRunner

    runner = ServiceRunner(nameko_config())
    runner.add_service(load_service(args.service))

    def stop(signum, frame):
        eventlet.spawn_n(runner.stop)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runner.start()
    heartbeat.serving(heartbeat.nameko_queues(runner.containers))
    logging.getLogger("cirrus").info("%s started", args.service)
    runner.wait()
    heartbeat.stop()


if __name__ == "__main__":
    main()
