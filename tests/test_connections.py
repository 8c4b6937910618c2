"""The connection policy on its own (smallbms_bus/connections.py): who goes when a server is full, timeouts,
the descriptor budget, and the accept-error guard. The clock is a parameter; the floods over real sockets are
in tests/modbus/test_connections.py, tests/test_metrics_connections.py and tests/faults/test_connection_flood.py.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import subprocess
import sys
import textwrap

from smallbms_bus.connections import (
    MIN_GRANT,
    ConnectionPolicy,
    Limits,
    RateLimitedLog,
    address_of,
    fd_budget,
    release_fds,
)


class Conn:
    def __init__(self, address: str, name: str, waiting: bool = False) -> None:
        self.address, self.name, self.has_bytes = address, name, waiting

    def waiting(self) -> bool:
        return self.has_bytes

    def __repr__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def policy(total: int = 4, per_address: int = 2, first: float = 10.0, idle: float = 300.0) -> tuple[
        ConnectionPolicy, Clock]:
    clock = Clock()
    return ConnectionPolicy(Limits(total, per_address, first, idle), clock), clock


def test_a_newcomer_is_always_taken_and_its_own_address_pays_first():
    p, clock = policy(total=4, per_address=2)
    a1, a2, b1 = Conn("10.0.0.1", "a1"), Conn("10.0.0.1", "a2"), Conn("10.0.0.2", "b1")
    for c in (a1, b1, a2):
        assert p.admit(c) == []
        clock.t += 1
    p.request(a1)  # a1 polled: a2 (never asked) is now a's longest-idle
    a3 = Conn("10.0.0.1", "a3")
    assert p.admit(a3) == [a2]
    assert set(p) == {a1, b1, a3}


def test_when_full_connections_that_never_asked_go_first_oldest_first_then_the_longest_idle():
    p, clock = policy(total=3, per_address=3)
    polled, old_silent, new_silent = Conn("1", "polled"), Conn("2", "old_silent"), Conn("3", "new_silent")
    p.admit(polled)
    clock.t = 1
    p.request(polled)
    clock.t = 2
    p.admit(old_silent)
    clock.t = 3
    p.admit(new_silent)
    clock.t = 100  # the poller has been idle for 99 s, the silent ones for less: they still go first
    assert p.admit(Conn("4", "x")) == [old_silent]
    assert p.admit(Conn("5", "y")) == [new_silent]
    for name in ("x", "y"):
        p.request(next(c for c in p if c.name == name))  # type: ignore[attr-defined]
    assert p.admit(Conn("6", "z")) == [polled]  # everyone has asked: the longest since its last request


def test_a_newcomer_whose_request_is_waiting_unread_outranks_silent_ones_but_not_a_poller():
    """A flood from the poller's own address: the poller's new connection is the oldest "never asked" one by the
    time a few more flood connections arrive, but its request is already in the socket: the silent ones go."""
    p, clock = policy(total=10, per_address=3)
    steady = Conn("1", "steady")
    p.admit(steady)
    p.request(steady)
    clock.t = 1
    poller = Conn("1", "poller", waiting=True)
    p.admit(poller)
    flood = [Conn("1", f"flood{i}") for i in range(3)]
    clock.t = 2
    assert p.admit(flood[0]) == []
    assert p.admit(flood[1]) == [flood[0]]  # not the older poller: its request is waiting
    assert p.admit(flood[2]) == [flood[1]]
    p.admit(Conn("2", "other"))
    only_waiting = policy(total=2, per_address=2)[0]
    a, b = Conn("3", "a", waiting=True), Conn("3", "b", waiting=True)
    only_waiting.admit(a)
    only_waiting.admit(b)
    assert only_waiting.admit(Conn("3", "c")) == [a]  # all waiting: the oldest
    p2, _ = policy(total=2, per_address=2)
    polled, waiting = Conn("4", "polled"), Conn("4", "waiting", waiting=True)
    p2.admit(polled)
    p2.request(polled)
    p2.admit(waiting)
    assert p2.admit(Conn("4", "new")) == [waiting]  # a poller's polled connection stays


def test_a_per_address_cap_above_the_total_acts_as_the_total():
    p, _ = policy(total=2, per_address=50)
    first, second, third = Conn("1", "first"), Conn("1", "second"), Conn("1", "third")
    p.admit(first)
    p.admit(second)
    assert p.admit(third) == [first]
    assert len(p) == 2


def test_timeouts_first_request_and_idle_are_separate():
    p, clock = policy(first=10.0, idle=300.0)
    silent, poller = Conn("1", "silent"), Conn("2", "poller")
    p.admit(silent)
    p.admit(poller)
    clock.t = 5
    p.request(poller)
    clock.t = 10.5
    assert p.expired() == [(silent, "no_request")]
    clock.t = 304
    assert p.expired() == []
    clock.t = 305.5
    assert p.expired() == [(poller, "idle")]
    assert len(p) == 0


def test_a_forgotten_connection_is_not_revived_by_a_late_request():
    p, _ = policy()
    c = Conn("1", "c")
    p.admit(c)
    p.forget(c)
    p.request(c)
    assert len(p) == 0 and c not in p


def test_addresses_are_keyed_without_port_and_ipv4_mapped_as_ipv4():
    assert address_of(("127.0.0.2", 5555)) == "127.0.0.2"
    assert address_of(("::ffff:10.0.0.7", 5555, 0, 0)) == "10.0.0.7"
    assert address_of(("fe80::1%eth0", 502, 0, 2)) == "fe80::1"
    assert address_of(None) == "?"


def test_a_flood_of_events_is_a_few_log_lines(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.flood"), clock)
    with caplog.at_level(logging.INFO, logger="test.flood"):
        for i in range(2000):
            clock.t = i * 0.01  # 2,000 evictions in 20 s
            limited("evicted", logging.WARNING, "evicted %d", i)
            limited.flush()
        clock.t = 30.0  # the flood is over: its last line comes at the reaper's next flush
        limited.flush()
        limited.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["evicted 0", "evicted 1000 (and 999 more like it in the last 10 s)",
                     "evicted 1999 (999 like it in the last 10 s)"]


def test_the_fd_budget_raises_the_soft_limit_toward_the_hard_one_or_lowers_the_cap():
    """In a child process: the limits are process-wide."""
    code = textwrap.dedent("""
        import logging, resource, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
        from smallbms_bus.connections import fd_budget
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2048))
        granted = fd_budget(object(), "modbus.max_connections", 1000)
        print("granted", granted, "soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
        granted = fd_budget(object(), "metrics.max_connections", 1000)
        print("granted", granted, "soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard >= 2048, "the test needs a hard limit of 2048"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert any(line.startswith("INFO raised the open-file limit from 256 to") for line in lines), out
    first = next(line for line in lines if line.startswith("granted")).split()
    assert int(first[1]) == 1000 and 1000 < int(first[3]) <= 2048
    second = [line for line in lines if line.startswith("granted")][1].split()
    assert int(second[1]) == MIN_GRANT and int(second[3]) == 300  # nothing fits beside the first: the minimum
    assert any(line.startswith("WARNING metrics.max_connections = 1000 does not fit the open-file limit (300")
               for line in lines), out


def test_the_fd_budget_is_given_back():
    owner = object()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert fd_budget(owner, "modbus.max_connections", 10) == 10
    release_fds(owner)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft  # nothing to raise for 10


def test_an_accept_that_runs_out_of_descriptors_is_one_warning_and_the_loop_runs_on():
    """EMFILE on accept, for real, in a child process with a tiny descriptor limit: asyncio pauses the listener
    for 1 s and retries (no busy loop); the guard turns its traceback-per-second into one WARNING; a timer on
    the same loop keeps ticking; once descriptors are free again the waiting client is served."""
    code = textwrap.dedent("""
        import asyncio, logging, os, resource, socket, sys, time
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
        from smallbms_bus.connections import quiet_accept_errors

        async def main():
            quiet_accept_errors(asyncio.get_running_loop())
            async def serve(reader, writer):
                writer.write(b"hello"); await writer.drain(); writer.close()
            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            filler = []
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, resource.getrlimit(
                resource.RLIMIT_NOFILE)[1]))
            client = socket.socket(); client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            try:
                while True:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            ticks, started = 0, time.monotonic()
            while time.monotonic() - started < 2.5:  # the loop keeps running while accept fails
                await asyncio.sleep(0.1); ticks += 1
            cpu = time.process_time()
            for fd in filler: os.close(fd)
            got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 5), 5)
            print("ticks", ticks, "cpu", round(cpu, 2), "got", got.decode())
        asyncio.run(main())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    warnings = [line for line in out.splitlines() if "cannot accept a connection" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING") and "Too many open files" in warnings[0], out
    assert "Traceback" not in out + result.stderr
    ticks, cpu, got = (lambda f: (int(f[1]), float(f[3]), f[5]))(out.splitlines()[-1].split())
    assert ticks >= 20 and got == "hello", out
    assert cpu < 2.0, f"busy loop while accept failed: {cpu} s of CPU"  # 1 s retries, not a spin


def test_the_guard_passes_other_loop_errors_on():
    loop = asyncio.new_event_loop()
    seen = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
    try:
        from smallbms_bus.connections import quiet_accept_errors
        quiet_accept_errors(loop)
        quiet_accept_errors(loop)  # once per loop
        loop.call_exception_handler({"message": "something else"})
        loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                     "exception": OSError(24, "Too many open files")})
        assert seen == ["something else"]
    finally:
        loop.close()
