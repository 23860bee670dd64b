"""files DIR: a process living on files.

- a directory fd (it lists it through the fd);
- a file it deleted while open (it keeps writing numbered records to it and reads them all
  back through the same fd, its offset moving along);
- a log opened O_APPEND (a record appended each turn: it must land at the end, and the flag
  must stay);
- a data file it reads sequentially through one fd (the offset must not move or rewind), and
  made with mode 0640 (it must keep it);
- /dev/zero and /dev/urandom read from, /dev/null written to.

Prints "start pid=N", then "it=N records=N sum=HEX" every 100 turns (BAD if anything lost,
repeated or changed)."""
import fcntl
import hashlib
import os
import stat
import sys
import time

d = sys.argv[1]
for name in ("alpha", "beta", "gamma"):
    open(os.path.join(d, name), "w").close()
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
path = os.path.join(d, "scratch.bin")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.unlink(path)
log = os.open(os.path.join(d, "append.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
log_reader = os.open(os.path.join(d, "append.log"), os.O_RDONLY)
data_path = os.path.join(d, "data.bin")
with open(data_path, "wb") as f:
    f.write(b"".join(hashlib.sha256(b"d%d" % i).digest() for i in range(1, 200001)))
os.chmod(data_path, 0o640)
data_fd = os.open(data_path, os.O_RDONLY)
zero = os.open("/dev/zero", os.O_RDONLY)
rnd = os.open("/dev/urandom", os.O_RDONLY)
null = os.open("/dev/null", os.O_WRONLY)
print(f"start pid={os.getpid()}", flush=True)
n = 0
while True:
    n += 1
    os.write(fd, hashlib.sha256(b"%d" % n).digest())          # 32 bytes, at the offset
    record = b"%08d\n" % n
    os.write(log, record)
    chunk = os.read(data_fd, 32)
    if chunk != hashlib.sha256(b"d%d" % (n % 200000 or 200000)).digest():
        print(f"BAD it={n} the data file read something else at offset "
              f"{os.lseek(data_fd, 0, os.SEEK_CUR) - len(chunk)}", flush=True)
    if n % 200000 == 0:
        os.lseek(data_fd, 0, os.SEEK_SET)
    if os.read(zero, 16) != b"\0" * 16 or len(os.read(rnd, 16)) != 16 or \
            os.write(null, b"x" * 16) != 16:
        print(f"BAD it={n} a character device misbehaves", flush=True)
    if n % 100 == 0:
        if sorted(x for x in os.listdir(dfd) if x in ("alpha", "beta", "gamma")) != \
                ["alpha", "beta", "gamma"]:
            print("BAD the directory fd lists something else", flush=True)
        here = os.lseek(fd, 0, os.SEEK_CUR)
        data = os.pread(fd, here, 0)
        want = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(1, n + 1))
        if here != 32 * n or data != want:
            print(f"BAD the deleted file has {len(data)} bytes at offset {here}", flush=True)
        if not fcntl.fcntl(log, fcntl.F_GETFL) & os.O_APPEND:
            print("BAD the log lost O_APPEND", flush=True)
        size = os.fstat(log).st_size
        if size != 9 * n or os.pread(log_reader, 9, size - 9) != record:
            print(f"BAD the log has {size} bytes, not {9 * n}", flush=True)
        if stat.S_IMODE(os.fstat(data_fd).st_mode) != 0o640:
            print("BAD the data file's mode changed", flush=True)
        print(f"it={n} records={n} sum={hashlib.sha256(data).hexdigest()[:16]}", flush=True)
    time.sleep(0.0005)
