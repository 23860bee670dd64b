"""tcpclient ADDR PORT RESULT STOPFILE: one connection kept open, batches of 8 pipelined requests
(sequence numbers) until STOPFILE exists; every answer is checked (its sequence number, its
digest, and a service-wide total that must grow by exactly one per answer). Writes RESULT (JSON):
batches, errors, the first error, the longest wait for a batch (ms), the last total."""
import hashlib
import json
import os
import socket
import sys
import time

addr, port, result, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((addr, port), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
seq = batches = errors = 0
first_error = None
last_total = None
max_stall = 0.0
try:
    while not os.path.exists(stop):
        t0 = time.monotonic()
        s.sendall(b"".join(b"%d\n" % (seq + k) for k in range(8)))
        for k in range(8):
            line = f.readline()
            want_seq = b"%d" % (seq + k)
            parts = line.split()
            ok = (len(parts) == 3 and parts[0] == want_seq and
                  parts[1] == hashlib.sha256(want_seq).hexdigest()[:16].encode() and
                  (last_total is None or int(parts[2]) == last_total + 1))
            if not ok:
                errors += 1
                first_error = first_error or f"request {seq + k}: got {line!r}"
            if len(parts) == 3 and parts[2].isdigit():
                last_total = int(parts[2])
        seq += 8
        batches += 1
        max_stall = max(max_stall, (time.monotonic() - t0) * 1e3)
        time.sleep(0.002)
except Exception as e:
    errors += 1
    first_error = first_error or f"{type(e).__name__}: {e}"
with open(result, "w") as out:
    json.dump({"batches": batches, "errors": errors, "first_error": first_error,
               "max_stall_ms": max_stall, "last_total": last_total, "requests": seq}, out)
