#!/usr/bin/env python3
"""This machine's loopback TCP between two processes, as `alexnet plan` takes a link: prints
"GBIT LATENCY_US" (one direction's throughput in Gbit/s, and half a small message's round
trip in microseconds). For checking the planner against runs on this machine, whose
replicas talk over loopback."""
import os
import socket
import sys
import time

BLOCK = 4 << 20
TOTAL = 512 << 20
ROUND_TRIPS = 2000


def peer(srv, mode):
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "bandwidth":
        buf = bytearray(BLOCK)
        got = 0
        while got < TOTAL:
            k = c.recv_into(buf)
            if not k:
                break
            got += k
        c.sendall(b"k")
    else:
        while True:
            d = c.recv(8)
            if not d:
                break
            c.sendall(d)
    c.close()


def measure(mode):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    pid = os.fork()
    if pid == 0:
        peer(srv, mode)
        os._exit(0)
    s = socket.create_connection(srv.getsockname())
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "bandwidth":
        block = bytes(BLOCK)
        t0 = time.perf_counter()
        for _ in range(TOTAL // BLOCK):
            s.sendall(block)
        s.recv(1)
        result = TOTAL * 8 / (time.perf_counter() - t0) / 1e9
    else:
        for _ in range(100):
            s.sendall(b"warmup!!")
            s.recv(8)
        t0 = time.perf_counter()
        for _ in range(ROUND_TRIPS):
            s.sendall(b"12345678")
            s.recv(8)
        result = (time.perf_counter() - t0) / ROUND_TRIPS / 2 * 1e6
    s.close()
    os.waitpid(pid, 0)
    srv.close()
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(__doc__)
    print(f"{measure('bandwidth'):.2f} {measure('latency'):.1f}")
