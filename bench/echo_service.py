"""A Nameko service that only echoes: the floor for one RPC round trip."""
import cirrus  # noqa: F401  (silences eventlet's deprecation warning)
import eventlet

eventlet.monkey_patch()

import sys  # noqa: E402

from nameko.rpc import rpc  # noqa: E402
from nameko.runners import ServiceRunner  # noqa: E402


class EchoService:
    name = "bench_echo"

    @rpc
    def echo(self, value):
        return value


if __name__ == "__main__":
    runner = ServiceRunner({"AMQP_URI": sys.argv[1], "serializer": "json"})
    runner.add_service(EchoService)
    runner.start()
    print("echo ready", flush=True)
    runner.wait()
