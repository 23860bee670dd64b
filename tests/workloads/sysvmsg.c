/* sysvmsg: a zdtm-like self-checking workload for System V message queues. Run as root.
 * It makes an IPC namespace of its own first (unshare(CLONE_NEWIPC), as a container).
 *
 * Queue Q (a key, mode 0640, made by uid 4242 gid 4343, owner changed to 1234:2345 and its
 * capacity to 9000 bytes with IPC_SET) holds 5 messages that wait all along, of types 1..5
 * and sizes 0, 1, 100, 1000 and 3000 bytes, each a pattern of its type. A forked child
 * sends a message of type 100 with a sequence number every millisecond; the parent receives
 * them (waiting in msgrcv for type 100) and checks the numbers follow one another. Every
 * iteration the parent checks through the id it holds (msgctl IPC_STAT) the queue's key,
 * mode, owner, creator and capacity, and that msgget finds it by its key; every 100 it takes
 * each waiting message by its type, checks it and queues it again. Prints "it=N ok" every
 * 100 iterations, or "BAD what" and exits. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KEY_Q 0x5eed0201
#define SEQ_TYPE 100

static const size_t sizes[5] = {0, 1, 100, 1000, 3000};

struct msg {
    long type;
    unsigned char text[4000];
};

static void bad(const char *what)
{
    printf("BAD %s\n", what);
    fflush(stdout);
    exit(1);
}

static void fill(struct msg *m, long type, size_t n)
{
    m->type = type;
    for (size_t i = 0; i < n; i++)
        m->text[i] = (unsigned char)(i * 13 + type);
}

static void send(int q, struct msg *m, size_t n)
{
    while (msgsnd(q, m, n, 0) != 0) {
        if (errno == EINTR)
            continue;
        perror("msgsnd");
        exit(2);
    }
}

static ssize_t take(int q, struct msg *m, long type, int flags)
{
    ssize_t n;
    while ((n = msgrcv(q, m, sizeof m->text, type, flags)) < 0 && errno == EINTR)
        ;
    return n;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("start pid=%d\n", getpid());
    if (unshare(CLONE_NEWIPC) != 0) {
        perror("unshare(CLONE_NEWIPC)");
        return 2;
    }
    syscall(SYS_setresgid, -1, 4343, -1);
    syscall(SYS_setresuid, -1, 4242, -1);
    int q = msgget(KEY_Q, IPC_CREAT | IPC_EXCL | 0640);
    syscall(SYS_setresuid, -1, 0, -1);
    syscall(SYS_setresgid, -1, 0, -1);
    struct msqid_ds ds;
    if (q < 0 || msgctl(q, IPC_STAT, &ds) != 0) {
        perror("msgget");
        return 2;
    }
    ds.msg_perm.uid = 1234;
    ds.msg_perm.gid = 2345;
    ds.msg_qbytes = 9000;
    if (msgctl(q, IPC_SET, &ds) != 0) {
        perror("IPC_SET");
        return 2;
    }
    static struct msg m;
    for (int i = 0; i < 5; i++) {
        fill(&m, i + 1, sizes[i]);
        send(q, &m, sizes[i]);
    }
    pid_t child = fork();
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        static struct msg s;
        struct timespec ts = {0, 1000 * 1000};
        for (uint64_t seq = 1;; seq++) {
            s.type = SEQ_TYPE;
            memcpy(s.text, &seq, sizeof seq);
            send(q, &s, sizeof seq);
            nanosleep(&ts, NULL);
        }
    }
    char what[160];
    for (uint64_t it = 1;; it++) {
        ssize_t n = take(q, &m, SEQ_TYPE, 0);
        uint64_t seq;
        memcpy(&seq, m.text, sizeof seq);
        if (n != sizeof seq || seq != it) {
            snprintf(what, sizeof what, "message %llu: size %zd sequence %llu",
                     (unsigned long long)it, n, (unsigned long long)seq);
            bad(what);
        }
        if (msgctl(q, IPC_STAT, &ds) != 0)
            bad("msgctl(IPC_STAT) failed");
        if (ds.msg_perm.__key != KEY_Q || (ds.msg_perm.mode & 0777) != 0640 ||
            ds.msg_perm.uid != 1234 || ds.msg_perm.gid != 2345 || ds.msg_perm.cuid != 4242 ||
            ds.msg_perm.cgid != 4343 || ds.msg_qbytes != 9000 || ds.msg_qnum < 5) {
            snprintf(what, sizeof what, "queue: key %x mode %o uid %u gid %u cuid %u cgid %u "
                     "qbytes %lu qnum %lu", ds.msg_perm.__key, ds.msg_perm.mode,
                     ds.msg_perm.uid, ds.msg_perm.gid, ds.msg_perm.cuid, ds.msg_perm.cgid,
                     (unsigned long)ds.msg_qbytes, (unsigned long)ds.msg_qnum);
            bad(what);
        }
        if (msgget(KEY_Q, 0) != q)
            bad("msgget(KEY_Q) is not Q");
        if (it % 100 == 0) {
            for (int i = 0; i < 5; i++) {
                static struct msg want;
                fill(&want, i + 1, sizes[i]);
                n = take(q, &m, i + 1, IPC_NOWAIT);
                if (n != (ssize_t)sizes[i] || memcmp(m.text, want.text, sizes[i]) != 0) {
                    snprintf(what, sizeof what, "waiting message of type %d: size %zd", i + 1, n);
                    bad(what);
                }
                send(q, &m, sizes[i]);
            }
            printf("it=%llu ok\n", (unsigned long long)it);
        }
    }
}
