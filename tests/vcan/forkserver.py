"""`smallbms-bus` processes forked from one pre-imported Python, for the vcan suite.

Under software emulation (tests/vcan/run-in-vm) the imports of the service or the simulator cost 10-20 s
of every process start, which would spend most of the suite's time budget on start-ups. The fork server
imports them once; each spawn forks a child that runs `smallbms_bus.cli.main(argv)` (what the
`smallbms-bus` console script runs) with its stderr on a file: the same code in its own process, on the same
bus, only without paying for the imports again. The server has no threads, so forking it is safe.
(The suite's start-up test still runs the console entry with a fresh interpreter.)

Protocol, one JSON line each way over the server's stdin/stdout:
  {"spawn": [ARGV...], "stderr": PATH}  ->  {"pid": N}
  {"poll": N}                           ->  {"returncode": null or the exit status (-N: killed by signal N)}
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _child(argv: list[str], stderr: str) -> None:
    code = 1
    try:
        # Ended with the server (which ends when the test process does): no service left running after a crash.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)  # never read the server's command pipe
        os.dup2(null, 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        from smallbms_bus import cli

        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    # What `run` and `simulate` import, loaded once before any fork.
    import smallbms_bus.cli
    import smallbms_bus.service
    import smallbms_bus.sim.cli  # noqa: F401

    gc.freeze()  # the children's collector then leaves the inherited objects (and their pages) alone
    returncodes: dict[int, int] = {}
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        command: dict[str, Any] = json.loads(line)
        if "spawn" in command:
            pid = os.fork()
            if pid == 0:
                _child(command["spawn"], command["stderr"])
            reply: dict[str, Any] = {"pid": pid}
        else:
            while True:  # reap every child that has ended
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                returncodes[pid] = os.waitstatus_to_exitcode(status)
            reply = {"returncode": returncodes.get(command["poll"])}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class ForkServer:
    """The test side: start the server, spawn children, and handle them like `subprocess.Popen`s."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen([sys.executable, "-m", "tests.vcan.forkserver"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env=env)
        self._ready = False

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        if not self._ready:  # the imports ran while the caller did other things
            if json.loads(self._process.stdout.readline() or "{}").get("ready") is not True:
                raise RuntimeError(f"the fork server did not start (exit {self._process.poll()})")
            self._ready = True
        self._process.stdin.write(json.dumps(command) + "\n")
        self._process.stdin.flush()
        return json.loads(self._process.stdout.readline())

    def spawn(self, argv: list[str], stderr: str) -> Forked:
        return Forked(self, self._ask({"spawn": argv, "stderr": stderr})["pid"])

    def poll(self, pid: int) -> int | None:
        return self._ask({"poll": pid})["returncode"]

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class Forked:
    """A child of the fork server, with the part of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.poll(self.pid)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return code


if __name__ == "__main__":
    serve()
