"""kvclient KIND ADDR PORT MB RESULT STOPFILE: a client of memcached (KIND=memcached) or redis
(KIND=redis). It loads MB megabytes of keys (1 KiB values derived from the key), then keeps one
connection busy with pipelined set/get rounds (a new key set and an old one read back and
checked each time) until STOPFILE exists, measuring the longest wait for a round; then reads
every key back (the loaded ones and the ones set under load) and checks each. Writes RESULT
(JSON). Prints "loaded" once the data is in."""
import hashlib
import json
import os
import socket
import sys
import time

kind, addr, port, mb, result, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5], sys.argv[6]
VALUE = 1024


def value(i: int) -> bytes:
    seed = hashlib.sha256(b"%d" % i).digest()
    return (seed * (VALUE // 32 + 1))[:VALUE]


class Conn:
    def __init__(self):
        self.s = socket.create_connection((addr, port), timeout=60)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rwb", buffering=1 << 16)

    def set(self, i: int) -> None:
        v = value(i)
        if kind == "memcached":
            self.f.write(b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(v), v))
        else:
            self.f.write(b"*3\r\n$3\r\nSET\r\n$%d\r\nk%d\r\n$%d\r\n%s\r\n"
                         % (len(b"k%d" % i), i, len(v), v))

    def set_reply(self) -> bool:
        line = self.f.readline()
        return line == (b"STORED\r\n" if kind == "memcached" else b"+OK\r\n")

    def get(self, i: int) -> None:
        if kind == "memcached":
            self.f.write(b"get k%d\r\n" % i)
        else:
            self.f.write(b"*2\r\n$3\r\nGET\r\n$%d\r\nk%d\r\n" % (len(b"k%d" % i), i))

    def get_reply(self) -> bytes | None:
        line = self.f.readline()
        if kind == "memcached":
            if line == b"END\r\n":
                return None
            n = int(line.split()[3])
            v = self.f.read(n + 2)[:-2]
            if self.f.readline() != b"END\r\n":
                return b"?"
            return v
        if line.startswith(b"$-1"):
            return None
        n = int(line[1:])
        return self.f.read(n + 2)[:-2]


c = Conn()
keys = mb * 1024 * 1024 // VALUE
for start in range(0, keys, 1000):
    for i in range(start, min(keys, start + 1000)):
        c.set(i)
    c.f.flush()
    for i in range(start, min(keys, start + 1000)):
        assert c.set_reply(), f"set k{i} failed"
print("loaded", flush=True)
errors, first_error, rounds, max_stall = 0, None, 0, 0.0
nxt = keys
while not os.path.exists(stop):
    t0 = time.monotonic()
    try:
        for k in range(8):
            c.set(nxt + k)
            c.get((nxt * 7 + k) % keys)
        c.f.flush()
        for k in range(8):
            if not c.set_reply():
                errors += 1
                first_error = first_error or f"set k{nxt + k} failed"
            got = c.get_reply()
            if got != value((nxt * 7 + k) % keys):
                errors += 1
                first_error = first_error or f"k{(nxt * 7 + k) % keys} read back wrong"
    except Exception as e:
        errors += 1
        first_error = first_error or f"{type(e).__name__}: {e}"
        break
    nxt += 8
    rounds += 1
    max_stall = max(max_stall, (time.monotonic() - t0) * 1e3)
    time.sleep(0.001)
bad = 0
try:
    for start in range(0, nxt, 1000):
        for i in range(start, min(nxt, start + 1000)):
            c.get(i)
        c.f.flush()
        for i in range(start, min(nxt, start + 1000)):
            if c.get_reply() != value(i):
                bad += 1
except Exception as e:
    errors += 1
    first_error = first_error or f"read back: {type(e).__name__}: {e}"
with open(result, "w") as out:
    json.dump({"rounds": rounds, "errors": errors, "first_error": first_error,
               "max_stall_ms": max_stall, "keys": nxt, "bad_keys": bad}, out)
