"""Floors measured in the same run as a benchmark: what the platform cannot beat."""
import statistics
import subprocess
import sys
import time
from pathlib import Path

DOMAIN = """<domain type='test'><name>floor-{i}</name><memory unit='MiB'>8</memory>
<vcpu>1</vcpu><os><type>hvm</type></os></domain>"""


def libvirt_define_create(n, uri="test:///default"):
    """Median seconds of a raw defineXML + create on the same driver, in-process."""
    import libvirt
    conn = libvirt.open(uri)
    times = []
    try:
        for i in range(n):
            start = time.perf_counter()
            dom = conn.defineXML(DOMAIN.format(i=i))
            dom.create()
            times.append(time.perf_counter() - start)
            dom.destroy()
            dom.undefine()
    finally:
        conn.close()
    return statistics.median(times)


def nameko_rpc_round_trip(amqp_uri, n):
    """Median seconds of a bare Nameko RPC to a service that only echoes."""
    from nameko.standalone.rpc import ClusterRpcProxy
    echo = subprocess.Popen([sys.executable, str(Path(__file__).with_name("echo_service.py")),
                             amqp_uri], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().startswith("echo ready")
        with ClusterRpcProxy({"AMQP_URI": amqp_uri, "serializer": "json"}) as proxy:
            proxy.bench_echo.echo(0)    # warm up the reply queue
            times = []
            for i in range(n):
                start = time.perf_counter()
                proxy.bench_echo.echo(i)
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        echo.terminate()
        echo.wait(10)
