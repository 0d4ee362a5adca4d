"""Start Cirrus programs as real processes for integration and end-to-end tests."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port():
    """A TCP port nothing listens on now, for a process to serve on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output goes to a log file that tests can wait on."""

    def __init__(self, args, env, log_path):
        self.args = [str(BIN / args[0]), *args[1:]]
        self.env = env
        self.log_path = Path(log_path)
        self.popen = None

    def start(self):
        self.log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.args, env=self.env, stdout=self.log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self):
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output()):
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.args} exited {self.popen.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.args}: no {pattern!r} in {timeout}s:\n{self.output()[-3000:]}")

    def kill(self, sig=signal.SIGKILL):
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            self.popen.wait(timeout=15)

    def stop(self):
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                # longer than the launcher's own stop (10 s), so it can reap its children
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.popen:
            self.log.close()


def start_services(names, env, log_dir):
    """Start ``cirrus-service NAME`` for each name; returns them once all are up."""
    procs = [Proc(["cirrus-service", name], env, log_dir / f"{name}.log").start()
             for name in names]
    for proc, name in zip(procs, names):
        proc.wait_for(f"{name} started")
    return procs


def wait_until(predicate, timeout=30, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met in {timeout}s")
