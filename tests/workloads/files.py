"""files DIR: a process holding a directory open (it lists it through the fd) and a file it
deleted while open (it keeps appending numbered records to it and reading them all back through
the same fd, its offset moving along). Prints "start pid=N", then "it=N records=N sum=HEX"
every 100 turns (BAD if the directory or the file lost anything)."""
import hashlib
import os
import sys
import time

d = sys.argv[1]
for name in ("alpha", "beta", "gamma"):
    open(os.path.join(d, name), "w").close()
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
path = os.path.join(d, "scratch.bin")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.unlink(path)
print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    n += 1
    os.write(fd, hashlib.sha256(b"%d" % n).digest())          # 32 bytes, at the offset
    if n % 100 == 0:
        if sorted(x for x in os.listdir(dfd) if x in ("alpha", "beta", "gamma")) != \
                ["alpha", "beta", "gamma"]:
            print("BAD the directory fd lists something else", flush=True)
        here = os.lseek(fd, 0, os.SEEK_CUR)
        data = os.pread(fd, here, 0)
        want = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(1, n + 1))
        if here != 32 * n or data != want:
            print(f"BAD the deleted file has {len(data)} bytes at offset {here}", flush=True)
        print(f"it={n} records={n} sum={hashlib.sha256(data).hexdigest()[:16]}", flush=True)
    time.sleep(0.0005)
