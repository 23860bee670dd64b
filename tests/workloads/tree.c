/* tree: a self-checking process-tree workload for prerestore: several processes joined by
 * pipes, process groups, signals and shared memory, so what the root prints does not depend
 * on scheduling. Every process checks on every iteration that getpid(), getppid() (children
 * only: the restored root gets a new parent), getsid(0) and getpgid(0) are what they were at
 * start; streams carry sequence numbers and checksums, so a lost, duplicated or altered byte
 * is caught. Any problem makes the root print a line containing "BAD" (children print their
 * own "BAD" line too and report it to the root) and the it= lines then end in "st=BAD".
 *
 * Usage: tree fork3|session|shm|churn [sleep|busy]      (default: sleep)
 *   fork3    root -> 2 children -> 2 grandchildren each (7 processes). Each parent/child
 *            pair has a down pipe and an up pipe; every iteration the parent sends a block
 *            (24-byte header + 64..512 bytes, all derived from the iteration and the child's
 *            place in the tree) and reads the answer of 2 iterations earlier (pipelined, so
 *            answers, and often blocks, sit in the pipes). An answer carries the child's
 *            running state: its previous state, the block, and (middle level) its
 *            grandchildren's answers folded in.
 *   session  the root is a session leader (calls setsid() when it is not one; when it cannot,
 *            because it leads a process group, it forks: the parent only waits and forwards
 *            SIGTERM/SIGINT/SIGUSR1, and the new root's pid is the one in "start pid=").
 *            4 children in one process group of their own (led by child 0); every 50
 *            iterations the root sends SIGUSR2 to the group, and each child, which keeps
 *            SIGUSR2 blocked and takes it with sigtimedwait, must have exactly as many as sent.
 *            Lockstep: each iteration the root sends each child a block and waits for all the
 *            answers.
 *   shm      the root produces records (sequence number, iteration, length, checksum) into a ring
 *            buffer (C11 atomics) in a 4 MiB MAP_SHARED|MAP_ANONYMOUS region; one child consumes and
 *            checks them and publishes its count and running sum in a 4 MiB memfd mapped
 *            MAP_SHARED in both (the fd stays open in both). The memfd's first MiB holds a
 *            fixed pattern, and the root filled 16 MiB of private anonymous memory before
 *            forking (copy-on-write shared, only read afterwards): every 100 iterations both
 *            processes checksum the pattern (through the mapping and, with pread, through the
 *            fd) and the private memory.
 *   churn    one long-lived child with a pipe stream (as fork3, answers 1 iteration late);
 *            every 20 iterations a short-lived child that exits with a status derived from the
 *            iteration (after ~2 ms in sleep mode) and is reaped 10 iterations later with
 *            waitpid(pid), so it is a zombie in between; and a child that exits with status 42
 *            at start (already a zombie at "start pid=") and is reaped at iteration 1000.
 * sleep: ~0.5 ms nanosleep per iteration (root, and fork3/churn stream children);
 * busy: a fixed amount of computation instead.
 *
 * Env: ITERS  the whole tree exits (status 0, or 1 after any BAD) after that many iterations
 *             (default: run forever). SIGTERM or SIGINT to the root: the same, at once.
 *
 * Output, all whole lines, each written with one write():
 *   pids <pid> <pid> ...         once, the tree's processes other than the root (not the
 *                                short-lived churn children), just before:
 *   start pid=<root pid>         once the whole tree is set up
 *   it=<N> ...                   every 100 iterations; depends only on N (and the mode):
 *     fork3    it=N fold=<hex16> c0=<hex16> c1=<hex16> st=ok
 *     session  it=N signals=<n> counts=<sum of the children's counts> fold=<hex16> st=ok
 *     shm      it=N records=<n> sum=<hex16> cow=<hex16> memfd=<hex16> st=ok
 *     churn    it=N forks=<n> reaped=<n> status=<hex16> stream=<hex16> st=ok
 *   zombie status=42             churn, once, at iteration 1000 (when the start zombie is reaped)
 *   SIGUSR1 count=<n>            when the root got SIGUSR1
 *   BAD <who> pid=<pid>: <what>  on any broken invariant
 * Children die with their parent (PR_SET_PDEATHSIG SIGKILL, armed once, right after fork).
 *
 * Build: cc -O2 -Wall -Wextra -o tree tree.c */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REPORT_EVERY 100
#define PACE_NS 500000L          /* per iteration, sleep mode */
#define STALL_SECONDS 15         /* a parent waiting this long (running) for a child: BAD */
#define MAX_KIDS 8

enum { M_FORK3, M_SESSION, M_SHM, M_CHURN };
static const char *const mode_names[] = {"fork3", "session", "shm", "churn"};
static int mode, busy;
static uint64_t iters;                   /* 0: forever */
static pid_t root_pid;
static volatile sig_atomic_t usr1_count, stop_req;

/* ---------------------------------------------------------------- deterministic data */

static uint64_t mix64(uint64_t x)        /* splitmix64 */
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

#define FNV_OFFSET 0xcbf29ce484222325ULL
static uint64_t fnv_update(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001B3ULL;
    return h;
}
static uint64_t fnv(const void *p, size_t n) { return fnv_update(FNV_OFFSET, p, n); }

static void gen(uint64_t seed, uint8_t *buf, size_t n)   /* n pseudo-random bytes from seed */
{
    uint64_t w = 0;
    for (size_t i = 0; i < n; i++) {
        if (i % 8 == 0)
            w = mix64(seed + i);
        buf[i] = (uint8_t)(w >> (8 * (i % 8)));
    }
}

/* ---------------------------------------------------------------- output and problems */

static int write_full(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t m = write(fd, p, n);
        if (m < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += m, n -= (size_t)m;
    }
    return 0;
}

/* one whole line, one write(): processes share stdout, and stdio is never used */
__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1, buf[n - 1] = '\n';
    write_full(1, buf, (size_t)n);
}

enum {
    B_PID = 1 << 0, B_PPID = 1 << 1, B_SID = 1 << 2, B_PGID = 1 << 3, B_STREAM = 1 << 4,
    B_DATA = 1 << 5, B_SIGNAL = 1 << 6, B_SHM = 1 << 7, B_COW = 1 << 8, B_EXIT = 1 << 9,
    B_STALL = 1 << 10, B_SYS = 1 << 11,
};
static const char *const bit_names[] = {
    "pid changed", "ppid changed", "sid changed", "pgid changed",
    "stream lost/duplicated/reordered", "data checksum", "signal count", "shared memory",
    "private (cow) memory", "child exit status", "stalled", "syscall failed",
};

static void bits_str(unsigned bits, char *out, size_t n)
{
    size_t len = 0;
    out[0] = 0;
    for (unsigned i = 0; i < sizeof bit_names / sizeof bit_names[0] && len < n; i++)
        if (bits & (1u << i))
            len += (size_t)snprintf(out + len, n - len, "%s%s", len ? ", " : "", bit_names[i]);
}

static char my_name[48] = "root";
static unsigned my_bad;          /* every problem this process saw (the root: the whole tree's) */

/* record problems; print a BAD line for the ones not printed yet */
__attribute__((format(printf, 2, 3))) static void flag_bad(unsigned bits, const char *fmt, ...)
{
    unsigned fresh = bits & ~my_bad;
    my_bad |= bits;
    if (!fresh)
        return;
    char what[400], detail[300] = "";
    bits_str(fresh, what, sizeof what);
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(detail, sizeof detail, fmt, ap);
        va_end(ap);
    }
    say("BAD %s pid=%d: %s%s%s%s\n", my_name, (int)getpid(), what, *detail ? " (" : "", detail,
        *detail ? ")" : "");
}

/* ---------------------------------------------------------------- identity invariants */

static struct { pid_t pid, ppid, sid, pgid; } id0;   /* ppid 0: not checked (the root) */

static void id_record(pid_t ppid, pid_t sid, pid_t pgid)
{
    id0.pid = getpid(), id0.ppid = ppid, id0.sid = sid, id0.pgid = pgid;
    if (getsid(0) != sid || getpgid(0) != pgid || (ppid && getppid() != ppid))
        flag_bad(B_SID | B_PGID, "at start: sid=%d pgid=%d ppid=%d, want %d %d %d",
                 (int)getsid(0), (int)getpgid(0), (int)getppid(), (int)sid, (int)pgid, (int)ppid);
}

static unsigned id_check(void)         /* glibc does not cache getpid(): these are syscalls */
{
    unsigned b = 0;
    if (getpid() != id0.pid)
        b |= B_PID;
    if (id0.ppid && getppid() != id0.ppid)
        b |= B_PPID;
    if (getsid(0) != id0.sid)
        b |= B_SID;
    if (getpgid(0) != id0.pgid)
        b |= B_PGID;
    if (b)
        flag_bad(b, "pid=%d ppid=%d sid=%d pgid=%d, at start %d %d %d %d", (int)getpid(),
                 (int)getppid(), (int)getsid(0), (int)getpgid(0), (int)id0.pid, (int)id0.ppid,
                 (int)id0.sid, (int)id0.pgid);
    return b;
}

/* ---------------------------------------------------------------- processes */

static pid_t my_kids[MAX_KIDS + 2];      /* this process's unreaped children, for abort_tree() */
static int n_my_kids;

static void forget_kid(pid_t p)
{
    for (int i = 0; i < n_my_kids; i++)
        if (my_kids[i] == p)
            my_kids[i] = my_kids[--n_my_kids];
}

/* something broke so that this process cannot go on: kill and reap its children (theirs die
 * by PDEATHSIG) and exit */
static void abort_tree(void)
{
    for (int i = 0; i < n_my_kids; i++)
        kill(my_kids[i], SIGKILL);
    for (int i = 0; i < n_my_kids; i++)
        while (waitpid(my_kids[i], NULL, 0) < 0 && errno == EINTR)
            ;
    _exit(1);
}

static pid_t expected_ppid;

/* fork; in the child: die with the parent (armed here once, never again), and check the
 * parent did not die before that */
static pid_t fork_child(void)
{
    pid_t parent = getpid();
    pid_t p = fork();
    if (p < 0) {
        flag_bad(B_SYS, "fork: %s", strerror(errno));
        abort_tree();
    }
    if (p > 0) {
        my_kids[n_my_kids++] = p;
        return p;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(1);
    expected_ppid = parent;
    n_my_kids = 0;
    my_bad = 0;
    signal(SIGTERM, SIG_IGN);            /* the tree stops when the root says so */
    signal(SIGINT, SIG_IGN);
    return 0;
}

static int close_range_(unsigned lo, unsigned hi)
{
#ifdef SYS_close_range
    return (int)syscall(SYS_close_range, lo, hi, 0);
#else
    (void)lo, (void)hi;
    return -1;
#endif
}

/* close every fd but 0, 1, 2 and keep[] (ascending) */
static void close_others(const int *keep, int n)
{
    unsigned lo = 3;
    for (int i = 0; i <= n; i++) {
        if (i < n && keep[i] < 3)
            continue;
        unsigned hi = i < n ? (unsigned)keep[i] : ~0u;
        if (hi > lo && close_range_(lo, hi - 1) != 0)
            for (unsigned fd = lo; fd < hi && fd < 4096; fd++)
                close((int)fd);
        if (i < n)
            lo = (unsigned)keep[i] + 1;
    }
}

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }
static void close_all_but(int a, int b, int c)       /* -1: none */
{
    int keep[3], n = 0;
    if (a >= 0) keep[n++] = a;
    if (b >= 0) keep[n++] = b;
    if (c >= 0) keep[n++] = c;
    qsort(keep, (size_t)n, sizeof keep[0], cmp_int);
    close_others(keep, n);
}

/* wait for child p (blocking) and check it exited with `want` */
static int reap(pid_t p, const char *who, int want)
{
    int st;
    while (waitpid(p, &st, 0) < 0) {
        if (errno != EINTR) {
            flag_bad(B_EXIT, "waitpid %s (%d): %s", who, (int)p, strerror(errno));
            return -1;
        }
    }
    forget_kid(p);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != want) {
        if (WIFSIGNALED(st))
            flag_bad(B_EXIT, "%s (%d) killed by signal %d", who, (int)p, WTERMSIG(st));
        else
            flag_bad(B_EXIT, "%s (%d) exit status %d, want %d", who, (int)p, WEXITSTATUS(st), want);
        return -1;
    }
    return WEXITSTATUS(st);
}

static void busy_work(long ns)            /* a fixed amount of computation, roughly ns long */
{
    static volatile uint64_t sink;
    uint64_t x = sink;
    for (long i = 0; i < ns / 4; i++)
        x = mix64(x);
    sink = x;
}

static void pace(long ns)
{
    if (busy) {
        busy_work(ns);
        return;
    }
    struct timespec ts = {0, ns};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void nap(void)                     /* the short sleep of a polling wait */
{
    struct timespec ts = {0, 100000};
    nanosleep(&ts, NULL);
}
#define STALL_NAPS (STALL_SECONDS * 10000L)   /* naps only count while running: not frozen */

/* ---------------------------------------------------------------- pipe streams */

/* read exactly n bytes: 1 done, 0 EOF before any byte, -1 EOF within, -2 error, -3 stalled.
 * timeout: 0 = wait forever (a child reading from its parent, which has PDEATHSIG to end it),
 * else STALL_SECONDS of 1 s polls that saw nothing */
static int read_full(int fd, void *buf, size_t n, int timeout)
{
    size_t got = 0;
    int idle = 0;
    while (got < n) {
        if (timeout) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            int r = poll(&p, 1, 1000);
            if (r < 0 && errno != EINTR)
                return -2;
            if (r == 0 && ++idle >= STALL_SECONDS)
                return -3;
            if (r <= 0)
                continue;
        }
        ssize_t m = read(fd, (char *)buf + got, n - got);
        if (m < 0) {
            if (errno == EINTR)
                continue;
            return -2;
        }
        if (m == 0)
            return got ? -1 : 0;
        got += (size_t)m;
    }
    return 1;
}

static const char *read_err(int r)
{
    return r == 0 ? "EOF" : r == -1 ? "EOF inside a message" : r == -3 ? "nothing for 15 s" : strerror(errno);
}

#define MAX_PAYLOAD 512
#define DOWN_MAGIC 0x444f574eu
#define UP_MAGIC 0x55502121u
#define READY_MAGIC 0x52454459u

struct down_hdr { uint32_t magic, seq, len, arg; uint64_t csum; };           /* parent->child */
struct up_hdr { uint32_t magic, seq, len, bad; uint64_t csum, state, aux; }; /* child->parent */

/* what the parent knows of one child and the pipes to it */
struct link {
    pid_t pid;
    int path;                  /* place in the tree: fork3 children 0,1, grandchildren 2..5 */
    char name[32];
    int down, up;              /* our ends: we write down, we read up */
    uint64_t state, aux;       /* from its latest answer */
    unsigned bad_seen;         /* the problems it reported so far */
};

static uint32_t down_len(uint32_t seq, int path)
{
    return 64 + (uint32_t)(mix64(((uint64_t)path << 32) ^ seq ^ 0xD0D0) % 449);   /* 64..512 */
}
static uint64_t down_seed(uint32_t seq, int path)
{
    return mix64(((uint64_t)path << 40) ^ ((uint64_t)seq << 8) ^ 0xABCDEFULL);
}
static uint32_t up_len(uint64_t state) { return 16 + (uint32_t)(state % 241); }        /* 16..256 */
static uint64_t up_seed(uint64_t state, uint32_t seq) { return mix64(state ^ ((uint64_t)seq << 32)); }

/* each message is one write() of at most PIPE_BUF bytes: atomic */
static int send_down(struct link *l, uint32_t seq, uint32_t arg)
{
    struct { struct down_hdr h; uint8_t data[MAX_PAYLOAD]; } m;
    m.h = (struct down_hdr){DOWN_MAGIC, seq, down_len(seq, l->path), arg, 0};
    gen(down_seed(seq, l->path), m.data, m.h.len);
    m.h.csum = fnv(m.data, m.h.len);
    if (write_full(l->down, &m, sizeof m.h + m.h.len) == 0)
        return 0;
    flag_bad(B_STREAM, "write to %s: %s", l->name, strerror(errno));
    return -1;
}

/* the child side: 1 got block `seq` (its checksum in *digest), 0 clean EOF, -1 broken stream */
static int recv_down(int fd, uint32_t seq, int path, uint32_t *arg, uint64_t *digest)
{
    struct { struct down_hdr h; uint8_t data[MAX_PAYLOAD]; } m;
    uint8_t want[MAX_PAYLOAD];
    int r = read_full(fd, &m.h, sizeof m.h, 0);
    if (r == 0)
        return 0;
    if (r < 0) {
        flag_bad(B_STREAM, "reading block %u: %s", seq, read_err(r));
        return -1;
    }
    if (m.h.magic != DOWN_MAGIC || m.h.seq != seq || m.h.len != down_len(seq, path)) {
        flag_bad(B_STREAM, "want block %u len %u, got magic %08x seq %u len %u", seq,
                 down_len(seq, path), m.h.magic, m.h.seq, m.h.len);
        return -1;
    }
    if ((r = read_full(fd, m.data, m.h.len, 0)) != 1) {
        flag_bad(B_STREAM, "reading block %u: %s", seq, read_err(r));
        return -1;
    }
    gen(down_seed(seq, path), want, m.h.len);
    *digest = fnv(m.data, m.h.len);
    if (*digest != m.h.csum || memcmp(want, m.data, m.h.len))
        flag_bad(B_DATA, "block %u", seq);
    *arg = m.h.arg;
    return 1;
}

static int send_up(int fd, uint32_t seq, uint64_t state, uint64_t aux, unsigned bad)
{
    struct { struct up_hdr h; uint8_t data[256]; } m;
    m.h = (struct up_hdr){UP_MAGIC, seq, up_len(state), bad, 0, state, aux};
    gen(up_seed(state, seq), m.data, m.h.len);
    m.h.csum = fnv(m.data, m.h.len);
    if (write_full(fd, &m, sizeof m.h + m.h.len) == 0)
        return 0;
    if (errno == EPIPE && getppid() != expected_ppid)
        _exit(0);       /* the parent was killed (the reference run ends so): nobody to tell */
    flag_bad(B_STREAM, "write to parent: %s", strerror(errno));
    return -1;
}

/* the parent side: 0 got answer `seq` into l->state/aux, -1 broken stream */
static int recv_up(struct link *l, uint32_t seq)
{
    struct { struct up_hdr h; uint8_t data[256]; } m;
    uint8_t want[256];
    int r = read_full(l->up, &m.h, sizeof m.h, 1);
    if (r != 1) {
        flag_bad(r == -3 ? B_STALL : B_STREAM, "answer %u of %s (%d): %s", seq, l->name,
                 (int)l->pid, read_err(r));
        return -1;
    }
    if (m.h.magic != UP_MAGIC || m.h.seq != seq || m.h.len != up_len(m.h.state)) {
        flag_bad(B_STREAM, "want answer %u of %s, got magic %08x seq %u len %u", seq, l->name,
                 m.h.magic, m.h.seq, m.h.len);
        return -1;
    }
    if ((r = read_full(l->up, m.data, m.h.len, 1)) != 1) {
        flag_bad(B_STREAM, "answer %u of %s: %s", seq, l->name, read_err(r));
        return -1;
    }
    gen(up_seed(m.h.state, seq), want, m.h.len);
    if (fnv(m.data, m.h.len) != m.h.csum || memcmp(want, m.data, m.h.len))
        flag_bad(B_DATA, "answer %u of %s", seq, l->name);
    unsigned fresh = m.h.bad & ~l->bad_seen;
    l->bad_seen |= m.h.bad;
    if (fresh) {
        char what[400];
        bits_str(fresh, what, sizeof what);
        my_bad |= fresh;
        say("BAD %s pid=%d: reported by %s (%d): %s\n", my_name, (int)getpid(), l->name,
            (int)l->pid, what);
    }
    l->state = m.h.state, l->aux = m.h.aux;
    return 0;
}

/* after the last answer: the stream must end exactly there */
static int expect_eof(struct link *l)
{
    char c;
    int r = read_full(l->up, &c, 1, 1);
    if (r == 0)
        return 0;
    flag_bad(r == 1 ? B_STREAM : B_STALL, "after the last answer of %s: %s", l->name,
             r == 1 ? "more bytes" : read_err(r));
    return -1;
}

/* "ready": the pids of the child's subtree, sent once it is all set up */
static int send_ready(int fd, const pid_t *pids, uint32_t n)
{
    struct { struct up_hdr h; pid_t pids[MAX_KIDS]; } m;
    m.h = (struct up_hdr){READY_MAGIC, 0, n, 0, 0, 0, 0};
    memcpy(m.pids, pids, n * sizeof *pids);
    m.h.csum = fnv(m.pids, n * sizeof *pids);
    return write_full(fd, &m, sizeof m.h + n * sizeof *pids);
}

static int recv_ready(struct link *l, pid_t *pids, uint32_t *n)   /* appends to pids[*n] */
{
    struct up_hdr h;
    int r = read_full(l->up, &h, sizeof h, 1);
    if (r == 1 && (h.magic != READY_MAGIC || h.len == 0 || h.len > MAX_KIDS))
        r = -4;
    if (r == 1)
        r = read_full(l->up, pids + *n, h.len * sizeof *pids, 1);
    if (r != 1 || fnv(pids + *n, h.len * sizeof *pids) != h.csum || pids[*n] != l->pid) {
        flag_bad(B_STREAM, "no ready message from %s (%d)", l->name, (int)l->pid);
        return -1;
    }
    *n += h.len;
    return 0;
}

typedef void (*child_main)(int down, int up, int path);

/* pipes and fork; the child closes every fd but its two ends and runs fn */
static void spawn(struct link *l, int path, const char *name, child_main fn)
{
    int d[2], u[2];
    if (pipe(d) || pipe(u)) {
        flag_bad(B_SYS, "pipe: %s", strerror(errno));
        abort_tree();
    }
    memset(l, 0, sizeof *l);
    l->path = path;
    snprintf(l->name, sizeof l->name, "%s", name);
    l->pid = fork_child();
    if (l->pid == 0) {
        close_all_but(d[0], u[1], -1);
        snprintf(my_name, sizeof my_name, "%s", name);
        fn(d[0], u[1], path);
        _exit(0);
    }
    close(d[0]), close(u[1]);
    l->down = d[1], l->up = u[0];
}

/* ---------------------------------------------------------------- the stream child */

static unsigned usr2_seen;               /* session children: SIGUSR2 taken so far */

/* session children: take SIGUSR2 (kept blocked) until `expected` arrived, and any extra */
static unsigned take_group_signals(uint32_t expected)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    int idle = 0;
    while (usr2_seen < expected) {
        struct timespec ts = {1, 0};
        int r = sigtimedwait(&s, NULL, &ts);
        if (r == SIGUSR2)
            usr2_seen++;
        else if (r < 0 && errno == EAGAIN && ++idle >= STALL_SECONDS) {
            flag_bad(B_SIGNAL, "SIGUSR2 %u never came", usr2_seen + 1);
            break;
        }
    }
    struct timespec zero = {0, 0};
    while (sigtimedwait(&s, NULL, &zero) == SIGUSR2)
        usr2_seen++;
    return usr2_seen;
}

/* A child of a stream: for k = 1, 2, ...: read block k from the parent, send block k to each
 * of its own children and read their answers k-lag, fold all of it into its state and answer
 * block k. When the parent closes the stream: take its children's last answers, check their
 * streams end there, reap them, exit (status 1 after any problem). */
static void stream_child(int down, int up, int path, struct link *kids, int nkids, int lag,
                         long pace_ns)
{
    uint64_t state = mix64(0x5EED0000ULL + (uint64_t)path);
    uint32_t k;
    for (k = 1;; k++) {
        uint32_t arg = 0;
        uint64_t digest = 0, aux = 0;
        int r = recv_down(down, k, path, &arg, &digest);
        if (r == 0)
            break;
        if (r < 0)
            abort_tree();
        id_check();
        if (mode == M_SESSION && (aux = take_group_signals(arg)) != arg)
            flag_bad(B_SIGNAL, "have %llu SIGUSR2, %u were sent", (unsigned long long)aux, arg);
        for (int i = 0; i < nkids; i++)
            if (send_down(&kids[i], k, 0))
                abort_tree();
        state = mix64(state ^ digest ^ ((uint64_t)k << 20) ^ (uint64_t)path);
        if (k > (uint32_t)lag)
            for (int i = 0; i < nkids; i++) {
                if (recv_up(&kids[i], k - (uint32_t)lag))
                    abort_tree();
                state = mix64(state + kids[i].state * (uint64_t)(i + 1));
            }
        if (send_up(up, k, state, aux, my_bad))       /* my_bad includes the kids' reports */
            abort_tree();
        if (pace_ns)
            pace(pace_ns);
    }
    uint32_t last = k - 1;
    for (int i = 0; i < nkids; i++)
        close(kids[i].down);
    for (uint32_t j = last > (uint32_t)lag ? last - (uint32_t)lag + 1 : 1; j <= last; j++)
        for (int i = 0; i < nkids; i++)
            if (recv_up(&kids[i], j))
                abort_tree();
    for (int i = 0; i < nkids; i++) {
        expect_eof(&kids[i]);
        reap(kids[i].pid, kids[i].name, 0);
    }
    _exit(my_bad ? 1 : 0);
}

/* ---------------------------------------------------------------- root side of streams */

static struct link kids[MAX_KIDS];
static int nkids;
static uint64_t stream_fold;
static pid_t tree_pids[4 * MAX_KIDS];
static uint32_t n_tree_pids;

static void root_collect_ready(void)
{
    for (int i = 0; i < nkids; i++)
        if (recv_ready(&kids[i], tree_pids, &n_tree_pids))
            abort_tree();
}

/* iteration k: block k to each child, then their answers k-lag (folded into stream_fold) */
static void root_stream_step(uint32_t k, int lag, uint32_t arg)
{
    for (int i = 0; i < nkids; i++)
        if (send_down(&kids[i], k, arg))
            abort_tree();
    if (k <= (uint32_t)lag)
        return;
    for (int i = 0; i < nkids; i++) {
        if (recv_up(&kids[i], k - (uint32_t)lag))
            abort_tree();
        stream_fold = mix64(stream_fold ^ (kids[i].state + (uint64_t)i));
    }
}

/* end of the streams after iteration `last`: close them, take and check the last answers,
 * check nothing follows, reap the children */
static void root_stream_finish(uint32_t last, int lag)
{
    for (int i = 0; i < nkids; i++)
        close(kids[i].down);
    for (uint32_t j = last > (uint32_t)lag ? last - (uint32_t)lag + 1 : 1; j <= last; j++)
        for (int i = 0; i < nkids; i++)
            if (recv_up(&kids[i], j))
                abort_tree();
    for (int i = 0; i < nkids; i++) {
        expect_eof(&kids[i]);
        reap(kids[i].pid, kids[i].name, 0);
        close(kids[i].up);
    }
}

static const char *st_word(void) { return my_bad ? "BAD" : "ok"; }

/* ---------------------------------------------------------------- fork3 */

#define F3_LAG 2

static void fork3_leaf(int down, int up, int path)
{
    id_record(expected_ppid, getsid(0), getpgid(0));
    pid_t self = getpid();
    if (send_ready(up, &self, 1))
        _exit(1);
    stream_child(down, up, path, NULL, 0, F3_LAG, PACE_NS);
}

static void fork3_middle(int down, int up, int path)
{
    id_record(expected_ppid, getsid(0), getpgid(0));
    struct link gk[2];
    pid_t pids[1 + 2 * MAX_KIDS] = {getpid()};
    uint32_t n = 1;
    for (int g = 0; g < 2; g++) {
        char name[32];
        snprintf(name, sizeof name, "grandchild %d.%d", path, g);
        spawn(&gk[g], 2 + 2 * path + g, name, fork3_leaf);
    }
    for (int g = 0; g < 2; g++)
        if (recv_ready(&gk[g], pids, &n))
            abort_tree();
    if (send_ready(up, pids, n))
        abort_tree();
    stream_child(down, up, path, gk, 2, F3_LAG, PACE_NS);
}

static void fork3_setup(void)
{
    nkids = 2;
    for (int c = 0; c < 2; c++) {
        char name[32];
        snprintf(name, sizeof name, "child %d", c);
        spawn(&kids[c], c, name, fork3_middle);
    }
    root_collect_ready();
}

static void fork3_step(uint32_t k) { root_stream_step(k, F3_LAG, 0); }

static void fork3_report(uint32_t k)
{
    say("it=%u fold=%016llx c0=%016llx c1=%016llx st=%s\n", k, (unsigned long long)stream_fold,
        (unsigned long long)kids[0].state, (unsigned long long)kids[1].state, st_word());
}

static void fork3_finish(uint32_t last) { root_stream_finish(last, F3_LAG); }

/* ---------------------------------------------------------------- session */

#define SESSION_KIDS 4
#define SIGNAL_EVERY 50
static pid_t group;                      /* the children's process group (child 0's pid) */
static uint32_t signals_sent;

static void session_child(int down, int up, int path)
{
    pid_t pg = path == 0 ? getpid() : group;
    if (setpgid(0, pg) < 0)
        flag_bad(B_PGID, "setpgid(0, %d): %s", (int)pg, strerror(errno));
    signal(SIGUSR2, SIG_DFL);            /* still blocked (inherited): taken by sigtimedwait */
    id_record(expected_ppid, root_pid, pg);
    pid_t self = getpid();
    if (send_ready(up, &self, 1))
        _exit(1);
    stream_child(down, up, path, NULL, 0, 0, 0);
}

static void become_session_leader(void)
{
    if (getsid(0) == getpid() || setsid() >= 0)
        return;
    /* a process group leader cannot setsid(): go on in a child, this process only waits */
    pid_t p = fork();
    if (p < 0) {
        say("BAD root: fork: %s\n", strerror(errno));
        exit(1);
    }
    if (p == 0) {
        setsid();
        return;
    }
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        siginfo_t si;
        int s = sigwaitinfo(&all, &si);
        if (s == SIGTERM || s == SIGINT || s == SIGUSR1)
            kill(p, s);
        else if (s == SIGCHLD) {
            int st;
            if (waitpid(p, &st, WNOHANG) == p)
                _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 1);
        }
    }
}

static void session_setup(void)
{
    become_session_leader();
    root_pid = getpid();
    sigset_t s;                          /* blocked for good (the root is not in the group) */
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    sigprocmask(SIG_BLOCK, &s, NULL);
    nkids = SESSION_KIDS;
    for (int c = 0; c < SESSION_KIDS; c++) {
        char name[32];
        snprintf(name, sizeof name, "session child %d", c);
        spawn(&kids[c], c, name, session_child);
        if (c == 0)
            group = kids[0].pid;
        /* as shells do: the parent sets it too, so it holds whoever runs first */
        if (setpgid(kids[c].pid, group) < 0 && errno != EACCES)
            flag_bad(B_PGID, "setpgid(%d, %d): %s", (int)kids[c].pid, (int)group, strerror(errno));
    }
    root_collect_ready();
}

/* lockstep: every child has answered block k-1 before the signal of block k is sent, so the
 * count each answer carries is exact */
static void session_step(uint32_t k)
{
    if (k % SIGNAL_EVERY == 0) {
        if (kill(-group, SIGUSR2) < 0)
            flag_bad(B_SIGNAL, "kill(-%d, SIGUSR2): %s", (int)group, strerror(errno));
        signals_sent++;
    }
    root_stream_step(k, 0, signals_sent);
    for (int i = 0; i < nkids; i++)
        if (kids[i].aux != signals_sent)
            flag_bad(B_SIGNAL, "%s has %llu SIGUSR2, %u were sent", kids[i].name,
                     (unsigned long long)kids[i].aux, signals_sent);
}

static void session_report(uint32_t k)
{
    uint64_t counts = 0;
    for (int i = 0; i < nkids; i++)
        counts += kids[i].aux;
    say("it=%u signals=%u counts=%llu fold=%016llx st=%s\n", k, signals_sent,
        (unsigned long long)counts, (unsigned long long)stream_fold, st_word());
}

static void session_finish(uint32_t last) { root_stream_finish(last, 0); }

/* ---------------------------------------------------------------- shm */

#define SHM_SIZE (4UL << 20)
#define PATTERN_SIZE (1UL << 20)
#define STATS_OFFSET (2UL << 20)
#define COW_SIZE (16UL << 20)
#define SLOT_SIZE 256
#define SLOT_DATA 224
#define NSLOTS ((SHM_SIZE - 4096) / SLOT_SIZE)

struct rec { uint64_t seq; uint32_t iter, len; uint64_t csum, pad; uint8_t data[SLOT_DATA]; };
_Static_assert(sizeof(struct rec) == SLOT_SIZE, "slot size");

struct ring {                            /* at the start of the anonymous shared region */
    _Atomic uint64_t head;               /* records produced (written by the root) */
    char pad1[56];
    _Atomic uint64_t tail;               /* records consumed (written by the consumer) */
    char pad2[56];
    _Atomic uint32_t ready, stop;
};
struct stats {                           /* in the memfd, written by the consumer */
    _Atomic uint64_t consumed, sum;
    _Atomic uint32_t bad, check_req, check_done, pad;   /* check_req: written by the root */
    _Atomic uint64_t cow_sum, map_sum, fd_sum;
};

static struct ring *ring;
static struct rec *slots;
static struct stats *stats;
static uint8_t *memfd_map;
static int memfd = -1;
static uint64_t *cow;
static uint64_t want_cow, want_pattern;
static uint64_t produced, consumer_bad_seen;
static pid_t consumer;

static uint32_t rec_len(uint64_t seq) { return 16 + (uint32_t)(mix64(seq ^ 0x7EC0) % (SLOT_DATA - 15)); }
static uint64_t rec_seed(uint64_t seq) { return mix64(seq ^ 0xDA7A0000ULL); }
static uint32_t recs_in(uint32_t k) { return 1 + (uint32_t)(mix64(k ^ 0x4EC00ULL) % 16); }

static uint64_t cow_checksum(void)
{
    uint64_t h = FNV_OFFSET;
    for (size_t i = 0; i < COW_SIZE / 8; i++)
        h = (h ^ cow[i]) * 0x100000001B3ULL;
    return h;
}

static uint64_t fd_checksum(void)        /* the pattern read through the memfd, not the mapping */
{
    static uint8_t buf[64 << 10];
    uint64_t h = FNV_OFFSET;
    for (off_t off = 0; off < (off_t)PATTERN_SIZE; off += sizeof buf) {
        size_t got = 0;
        while (got < sizeof buf) {
            ssize_t m = pread(memfd, buf + got, sizeof buf - got, off + (off_t)got);
            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0)
                return 0;
            got += (size_t)m;
        }
        h = fnv_update(h, buf, sizeof buf);
    }
    return h;
}

/* checksums of the private memory, the pattern through the mapping, through the fd */
static unsigned check_regions(uint64_t *c, uint64_t *m, uint64_t *f)
{
    unsigned bad = 0;
    *c = cow_checksum(), *m = fnv(memfd_map, PATTERN_SIZE), *f = fd_checksum();
    if (*c != want_cow)
        bad |= B_COW;
    if (*m != want_pattern || *f != want_pattern)
        bad |= B_SHM;
    if (bad)
        flag_bad(bad, "cow %016llx want %016llx; pattern map %016llx fd %016llx want %016llx",
                 (unsigned long long)*c, (unsigned long long)want_cow, (unsigned long long)*m,
                 (unsigned long long)*f, (unsigned long long)want_pattern);
    return bad;
}

static void shm_consumer(void)
{
    id_record(expected_ppid, getsid(0), getpgid(0));
    uint64_t tail = 0, sum = 0;
    uint32_t rec_k = 1, rec_left = recs_in(1);   /* the iteration the next record belongs to */
    uint8_t want[SLOT_DATA];
    atomic_store(&ring->ready, 1);
    for (;;) {
        id_check();
        uint64_t head = atomic_load_explicit(&ring->head, memory_order_acquire);
        int did = tail < head;
        for (; tail < head; tail++) {
            struct rec *r = &slots[tail % NSLOTS];
            if (r->seq != tail || r->len != rec_len(tail) || r->iter != rec_k) {
                flag_bad(B_STREAM, "record %llu: seq %llu len %u iteration %u (want %u)",
                         (unsigned long long)tail, (unsigned long long)r->seq, r->len, r->iter, rec_k);
                continue;
            }
            if (--rec_left == 0)
                rec_left = recs_in(++rec_k);
            gen(rec_seed(tail), want, r->len);
            if (r->csum != (fnv(r->data, r->len) ^ tail) || memcmp(want, r->data, r->len))
                flag_bad(B_DATA, "record %llu", (unsigned long long)tail);
            sum = mix64(sum ^ r->csum);
        }
        if (did) {
            atomic_store_explicit(&stats->sum, sum, memory_order_relaxed);
            atomic_store_explicit(&stats->consumed, tail, memory_order_release);
            atomic_store_explicit(&ring->tail, tail, memory_order_release);
        }
        uint32_t req = atomic_load_explicit(&stats->check_req, memory_order_acquire);
        if (req != atomic_load_explicit(&stats->check_done, memory_order_relaxed)) {
            uint64_t c, m, f;
            check_regions(&c, &m, &f);
            atomic_store(&stats->cow_sum, c);
            atomic_store(&stats->map_sum, m);
            atomic_store(&stats->fd_sum, f);
            atomic_store_explicit(&stats->check_done, req, memory_order_release);
        }
        if (my_bad)
            atomic_fetch_or(&stats->bad, my_bad);
        if (!did) {
            if (atomic_load(&ring->stop) && tail == atomic_load(&ring->head))
                break;
            pace(100000);
        }
    }
    _exit(my_bad ? 1 : 0);
}

static void *map_or_die(size_t len, int flags, int fd)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED) {
        say("BAD root: mmap: %s\n", strerror(errno));
        exit(1);
    }
    return p;
}

static void shm_setup(void)
{
    /* private memory, filled once, then only read by both processes */
    cow = map_or_die(COW_SIZE, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    for (size_t i = 0; i < COW_SIZE / 8; i++)
        cow[i] = mix64(i ^ 0xC0C0C0C0ULL);
    want_cow = cow_checksum();

    ring = map_or_die(SHM_SIZE, MAP_SHARED | MAP_ANONYMOUS, -1);
    slots = (struct rec *)((char *)ring + 4096);

    memfd = memfd_create("tree-shm", 0);
    if (memfd < 0 || ftruncate(memfd, SHM_SIZE) < 0) {
        say("BAD root: memfd: %s\n", strerror(errno));
        exit(1);
    }
    memfd_map = map_or_die(SHM_SIZE, MAP_SHARED, memfd);
    gen(0x9A77E27ULL, memfd_map, PATTERN_SIZE);
    want_pattern = fnv(memfd_map, PATTERN_SIZE);
    stats = (struct stats *)(memfd_map + STATS_OFFSET);

    consumer = fork_child();
    if (consumer == 0) {
        close_all_but(memfd, -1, -1);
        snprintf(my_name, sizeof my_name, "consumer");
        shm_consumer();
    }
    for (long n = 0; !atomic_load(&ring->ready); n++) {
        if (n > STALL_NAPS || waitpid(consumer, NULL, WNOHANG) == consumer) {
            flag_bad(B_STALL, "consumer did not start");
            abort_tree();
        }
        nap();
    }
    tree_pids[n_tree_pids++] = consumer;
}

static void shm_consumer_alive(void)
{
    int st;
    if (waitpid(consumer, &st, WNOHANG) == consumer) {
        forget_kid(consumer);
        flag_bad(B_EXIT, "consumer (%d) ended (status %#x)", (int)consumer, st);
        abort_tree();
    }
}

static void shm_consumer_bad(void)
{
    unsigned b = atomic_load(&stats->bad), fresh = b & ~(unsigned)consumer_bad_seen;
    if (fresh) {
        char what[400];
        consumer_bad_seen |= b;
        my_bad |= fresh;
        bits_str(fresh, what, sizeof what);
        say("BAD root pid=%d: reported by consumer (%d): %s\n", (int)getpid(), (int)consumer, what);
    }
}

static void shm_step(uint32_t k)
{
    shm_consumer_alive();
    for (uint32_t i = 0, n = recs_in(k); i < n; i++, produced++) {
        for (long w = 0; produced - atomic_load_explicit(&ring->tail, memory_order_acquire) >= NSLOTS; w++) {
            if (w > STALL_NAPS) {
                flag_bad(B_STALL, "ring full: the consumer takes nothing");
                abort_tree();
            }
            nap();
        }
        struct rec *r = &slots[produced % NSLOTS];
        r->seq = produced, r->iter = k, r->len = rec_len(produced);
        gen(rec_seed(produced), r->data, r->len);
        r->csum = fnv(r->data, r->len) ^ produced;
        atomic_store_explicit(&ring->head, produced + 1, memory_order_release);
    }
    shm_consumer_bad();
}

/* wait until the consumer has taken everything produced (and, if check, its region check
 * for iteration k is done) */
static void shm_wait_consumer(uint32_t check)
{
    for (long w = 0;; w++) {
        if (atomic_load_explicit(&stats->consumed, memory_order_acquire) == produced &&
            (!check || atomic_load_explicit(&stats->check_done, memory_order_acquire) == check))
            return;
        if (w > STALL_NAPS) {
            flag_bad(B_STALL, "consumer at record %llu of %llu (shared memory not shared?)",
                     (unsigned long long)atomic_load(&stats->consumed), (unsigned long long)produced);
            abort_tree();
        }
        if (w % 1000 == 999)
            shm_consumer_alive();
        nap();
    }
}

static void shm_report(uint32_t k)
{
    atomic_store_explicit(&stats->check_req, k, memory_order_release);
    uint64_t c, m, f;
    check_regions(&c, &m, &f);            /* the root's own view */
    shm_wait_consumer(k);
    shm_consumer_bad();
    uint64_t cc = atomic_load(&stats->cow_sum), cm = atomic_load(&stats->map_sum);
    if (cc != c || cm != m || atomic_load(&stats->fd_sum) != f)
        flag_bad(cc != c ? B_COW : B_SHM, "the consumer's checksums differ from the root's");
    say("it=%u records=%llu sum=%016llx cow=%016llx memfd=%016llx st=%s\n", k,
        (unsigned long long)produced, (unsigned long long)atomic_load(&stats->sum),
        (unsigned long long)cc, (unsigned long long)cm, st_word());
}

static void shm_finish(uint32_t last)
{
    (void)last;
    shm_wait_consumer(0);
    atomic_store(&ring->stop, 1);
    reap(consumer, "consumer", 0);
    shm_consumer_bad();
}

/* ---------------------------------------------------------------- churn */

#define CHURN_LAG 1
#define CHURN_EVERY 20
#define CHURN_REAP_AFTER 10
#define ZOMBIE_STATUS 42
#define ZOMBIE_REAP_AT 1000

static pid_t zombie;
static pid_t churn_pid;                  /* the short-lived child not reaped yet, or 0 */
static uint32_t churn_k, churn_forks, churn_reaped;
static uint64_t churn_fold;

static int churn_status(uint32_t k)
{
    uint64_t h = k;
    for (int i = 0; i < 5000; i++)
        h = mix64(h);
    return (int)(h & 0x7f);
}

static void churn_leaf(int down, int up, int path)
{
    id_record(expected_ppid, getsid(0), getpgid(0));
    pid_t self = getpid();
    if (send_ready(up, &self, 1))
        _exit(1);
    stream_child(down, up, path, NULL, 0, CHURN_LAG, PACE_NS);
}

static void churn_setup(void)
{
    nkids = 1;
    spawn(&kids[0], 0, "long-lived child", churn_leaf);
    root_collect_ready();
    zombie = fork_child();
    if (zombie == 0)
        _exit(ZOMBIE_STATUS);
    siginfo_t si;                        /* wait until it is a zombie, without reaping it */
    while (waitid(P_PID, (id_t)zombie, &si, WEXITED | WNOWAIT) < 0 && errno == EINTR)
        ;
    tree_pids[n_tree_pids++] = zombie;
}

static void churn_reap(void)
{
    char who[48];
    snprintf(who, sizeof who, "churn child of iteration %u", churn_k);
    int st = reap(churn_pid, who, churn_status(churn_k));
    churn_fold = mix64(churn_fold ^ ((uint64_t)(st & 0xff) << 32) ^ churn_k);
    churn_reaped++;
    churn_pid = 0;
}

static void reap_zombie(int print)
{
    if (reap(zombie, "the start zombie", ZOMBIE_STATUS) == ZOMBIE_STATUS && print)
        say("zombie status=%d\n", ZOMBIE_STATUS);
    zombie = 0;
}

static void churn_step(uint32_t k)
{
    root_stream_step(k, CHURN_LAG, 0);
    if (k % CHURN_EVERY == 0) {
        pid_t p = fork_child();
        if (p == 0) {
            close_all_but(-1, -1, -1);
            snprintf(my_name, sizeof my_name, "churn child of iteration %u", k);
            id_record(expected_ppid, id0.sid, id0.pgid);
            int status = churn_status(k);
            if (!busy) {
                struct timespec ts = {0, 2000000};
                nanosleep(&ts, NULL);
            }
            _exit(id_check() || my_bad ? 200 : status);
        }
        churn_pid = p, churn_k = k;
        churn_forks++;
    }
    if (churn_pid && k == churn_k + CHURN_REAP_AFTER)
        churn_reap();
    if (k == ZOMBIE_REAP_AT)
        reap_zombie(1);
}

static void churn_report(uint32_t k)
{
    say("it=%u forks=%u reaped=%u status=%016llx stream=%016llx st=%s\n", k, churn_forks,
        churn_reaped, (unsigned long long)churn_fold, (unsigned long long)stream_fold, st_word());
}

static void churn_finish(uint32_t last)
{
    root_stream_finish(last, CHURN_LAG);
    if (churn_pid)
        churn_reap();
    if (zombie)
        reap_zombie(0);
}

/* ---------------------------------------------------------------- main */

static void on_usr1(int s) { (void)s; usr1_count++; }
static void on_stop(int s) { (void)s; stop_req = 1; }

static const struct {
    void (*setup)(void), (*step)(uint32_t), (*report)(uint32_t), (*finish)(uint32_t);
} modes[] = {
    [M_FORK3] = {fork3_setup, fork3_step, fork3_report, fork3_finish},
    [M_SESSION] = {session_setup, session_step, session_report, session_finish},
    [M_SHM] = {shm_setup, shm_step, shm_report, shm_finish},
    [M_CHURN] = {churn_setup, churn_step, churn_report, churn_finish},
};

int main(int argc, char **argv)
{
    mode = -1;
    for (int i = 0; argc >= 2 && i < 4; i++)
        if (!strcmp(argv[1], mode_names[i]))
            mode = i;
    if (mode < 0 || argc > 3 || (argc == 3 && strcmp(argv[2], "sleep") && strcmp(argv[2], "busy"))) {
        static const char usage[] = "usage: tree fork3|session|shm|churn [sleep|busy]  (env ITERS)\n";
        write_full(2, usage, sizeof usage - 1);
        return 2;
    }
    busy = argc == 3 && !strcmp(argv[2], "busy");
    const char *s = getenv("ITERS");
    if (s && *s)
        iters = strtoull(s, NULL, 10);

    struct sigaction sa = {0};
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = on_usr1;             /* children inherit it: harmless there */
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);            /* a dead reader shows as EPIPE */

    root_pid = getpid();
    modes[mode].setup();                 /* session: may set root_pid anew */
    id_record(0, getsid(0), getpgid(0)); /* the root's parent is not checked: it changes */
    if (mode == M_SESSION && (id0.sid != root_pid || id0.pgid != root_pid))
        flag_bad(B_SID, "not a session leader");

    char line[512];
    int len = snprintf(line, sizeof line, "pids");
    for (uint32_t i = 0; i < n_tree_pids; i++)
        len += snprintf(line + len, sizeof line - (size_t)len, " %d", (int)tree_pids[i]);
    say("%s\n", line);
    say("start pid=%d\n", (int)getpid());

    int seen = 0;
    uint32_t k;
    for (k = 1; (!iters || k <= iters) && !stop_req; k++) {
        id_check();
        modes[mode].step(k);
        if (k % REPORT_EVERY == 0)
            modes[mode].report(k);
        if (usr1_count != seen) {
            seen = usr1_count;
            say("SIGUSR1 count=%d\n", seen);
        }
        pace(PACE_NS);
    }
    modes[mode].finish(k - 1);
    return my_bad ? 1 : 0;
}
