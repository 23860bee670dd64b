"""A multi-threaded CPython workload: the main thread hands work to 4 worker threads through a
queue and collects the results through another; every round's result is a sum, so it does not
depend on which worker took which item. Every 100 rounds: one `it=` line.
Usage: pythreads.py sleep|busy. Prints "start pid=N"; SIGUSR1 -> "SIGUSR1 count=N"."""
import os
import queue
import signal
import sys
import threading
import time

busy = len(sys.argv) > 1 and sys.argv[1] == "busy"
usr1 = 0


def on_usr1(signum, frame):
    global usr1
    usr1 += 1


def worker(inbox: queue.Queue, outbox: queue.Queue, tid_box: list, index: int) -> None:
    tid_box[index] = threading.get_native_id()
    local = threading.local()
    local.count = 0
    while True:
        item = inbox.get()
        local.count += 1
        acc = item
        for _ in range(50):
            acc = (acc * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        ok = threading.get_native_id() == tid_box[index]
        outbox.put((acc, ok))


signal.signal(signal.SIGUSR1, on_usr1)
inbox, outbox = queue.Queue(), queue.Queue()
tids = [0] * 4
for i in range(4):
    threading.Thread(target=worker, args=(inbox, outbox, tids, i), daemon=True).start()
print(f"start pid={os.getpid()}", flush=True)
total, seen, tids_ok = 0, 0, True
for it in range(1, 10 ** 9):
    for k in range(8):
        inbox.put(it * 8 + k)
    for _ in range(8):
        acc, ok = outbox.get()
        total = (total + acc) % (1 << 64)
        tids_ok = tids_ok and ok
    if it % 100 == 0:
        print(f"it={it} total={total:016x} tids={'ok' if tids_ok else 'BAD'}", flush=True)
    if usr1 != seen:
        seen = usr1
        print(f"SIGUSR1 count={seen}", flush=True)
    if not busy:
        time.sleep(0.001)
