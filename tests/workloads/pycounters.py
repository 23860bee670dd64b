#!/usr/bin/env python3
"""Deterministic self-checking CPython workload for prerestore tests.

Usage: pycounters.py sleep|busy
Env:   MB     bytearray size in MiB (default 4)
       ITERS  exit 0 after that many iterations (default: run forever)

Every 100 iterations it prints one line

  it=<N> sum=<int> crc=<hex8> dict=<hex16> list=<len>/<sum> acc=<repr float> gen=<int> OK|MISMATCH

whose content depends only on N (and MB).  Not compared with the reference:
  start pid=<pid>
  SIGUSR1 count=<n>
"""
import os
import signal
import sys
import time
import zlib

REPORT_EVERY = 100
UPDATES_PER_ITER = 200
MASK64 = (1 << 64) - 1

usr1_count = 0


def on_usr1(signum, frame):
    global usr1_count
    usr1_count += 1


def xorshift64(x):
    x ^= (x << 13) & MASK64
    x ^= x >> 7
    x ^= (x << 17) & MASK64
    return x


def fib_gen():
    """A generator with live frame state kept across iterations."""
    a, b = 0, 1
    try:
        while True:
            yield a
            a, b = b, (a + b) % 1000000007
    finally:
        # never reached while the workload runs
        pass


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("sleep", "busy"):
        print("usage: pycounters.py sleep|busy  (env MB, ITERS)", file=sys.stderr)
        return 2
    do_sleep = sys.argv[1] == "sleep"
    mb = int(os.environ.get("MB") or 4) or 1
    iters = int(os.environ.get("ITERS") or 0)

    signal.signal(signal.SIGUSR1, on_usr1)

    size = mb << 20
    buf = bytearray(size)
    for off in range(0, size, 4096):
        buf[off] = (off >> 12) & 0xFF
    running = sum(buf)
    counters = {"k%02d" % i: 0 for i in range(64)}
    lst = []
    acc = 1.0
    gen = fib_gen()
    rng = 0x243F6A8885A308D3
    gval = 0
    last_usr1 = 0

    print("start pid=%d" % os.getpid(), flush=True)

    it = 0
    while iters == 0 or it < iters:
        it += 1
        for _ in range(UPDATES_PER_ITER):
            rng = xorshift64(rng)
            idx = rng % size
            delta = (rng >> 40) & 0xFF
            old = buf[idx]
            new = (old + delta) & 0xFF
            buf[idx] = new
            running += new - old
            counters["k%02d" % ((rng >> 20) & 63)] += 1
            acc = acc * 0.999 + (rng & 1023) / 7.0
        lst.append(rng & 0xFFFF)
        if len(lst) > 1000:
            del lst[0]
        gval = next(gen)

        if do_sleep:
            time.sleep(0.001)

        c = usr1_count
        if c != last_usr1:
            last_usr1 = c
            print("SIGUSR1 count=%d" % c, flush=True)

        if it % REPORT_EVERY == 0:
            full = sum(buf)
            dh = 0
            for k in sorted(counters):
                dh = (dh * 1000003 + counters[k]) & MASK64
            print("it=%d sum=%d crc=%08x dict=%016x list=%d/%d acc=%r gen=%d %s"
                  % (it, running, zlib.crc32(buf), dh, len(lst), sum(lst), acc,
                     gval, "OK" if full == running else "MISMATCH"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
