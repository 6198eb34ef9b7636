"""``python -m bench.client_check [--quick]``: is the benchmark client fast enough to measure servers?

Runs the suite's download client (`bench_client.download`) against a trivial POP3 server that answers
from memory (every reply encoded in advance; its own process, a thread per connection), and against Dovecot in the
same run, with the same mail (workload 1's shape, unpipelined and pipelined). The client alone must be
at least 3× faster than the fastest server measured, or the client would be measuring itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import sys
import threading

from bench import bench_client as bc
from bench import bench_mail as mail
from bench.bench_report import median
from bench.bench_servers import HOST, BenchDovecot

REPEATS = 5


class MemoryServer:
    """POP3 from memory: USER/PASS accept anything; STAT, UIDL, RETR, QUIT; replies prepared in advance.
    It runs in a process of its own, so that it does not share the client's interpreter lock."""

    def __init__(self, messages: list[bytes]) -> None:
        self.stat = f"+OK {len(messages)} {sum(len(m) for m in messages)}\r\n".encode()
        self.uidl = b"+OK\r\n" + b"".join(f"{i} m{i}\r\n".encode() for i in range(1, len(messages) + 1)) + b".\r\n"
        self.retr = {str(i).encode(): b"+OK\r\n" + m + b".\r\n" for i, m in enumerate(messages, 1)}
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.process = multiprocessing.get_context("fork").Process(target=self._accept, daemon=True)
        self.process.start()
        self.listener.close()  # the child has it

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"+OK ready\r\n")
            for line in lines:
                word, _, arg = line.strip().partition(b" ")
                word = word.upper()
                if word == b"RETR":
                    conn.sendall(self.retr[arg])
                elif word == b"UIDL":
                    conn.sendall(self.uidl)
                elif word == b"STAT":
                    conn.sendall(self.stat)
                elif word == b"QUIT":
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:
                    conn.sendall(b"+OK\r\n")

    def close(self) -> None:
        self.process.terminate()
        self.process.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.client_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 messages instead of 2,000")
    args = parser.parse_args(argv)
    count = 100 if args.quick else 2000
    messages = list(mail.messages(count, 20_000))
    memory = MemoryServer(messages)
    dovecot = BenchDovecot(users=1)
    dovecot.start()
    try:
        user, password = dovecot.take_user()
        dovecot.bulk_deliver(user, messages)
        bc.download(dovecot.port, user, password, pipelined=False, expect=count)  # Dovecot builds its index
        print(f"{count} × 20 KB, MB/s (median of {REPEATS}):")
        worst = None
        for pipelined in (False, True):
            rates = {"client alone": [], "dovecot": []}
            for _ in range(REPEATS):
                for name, port in (("client alone", memory.port), ("dovecot", dovecot.port)):
                    result = bc.download(port, user, password, pipelined=pipelined, expect=count)
                    rates[name].append(result.octets / result.total / 1e6)
            alone, server = median(rates["client alone"]), median(rates["dovecot"])
            ratio = alone / server
            worst = ratio if worst is None else min(worst, ratio)
            shape = "pipelined" if pipelined else "unpipelined"
            print(f"  {shape:12} client alone {alone:7.1f}   dovecot {server:7.1f}   ratio {ratio:.1f}×")
        print(f"the client is {worst:.1f}× the fastest server measured: "
              + ("fast enough (≥ 3×)" if worst >= 3 else "NOT fast enough (< 3×)"))
        return 0
    finally:
        dovecot.stop()
        memory.close()


if __name__ == "__main__":
    sys.exit(main())
