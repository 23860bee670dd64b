/* sysvshm: a zdtm-like self-checking workload for System V shared memory. Run as root.
 *
 * Usage: sysvshm own|host
 *   own   unshare(CLONE_NEWIPC) first: the tree has an IPC namespace of its own (a container),
 *         and its segments have keys; one stays attached by nobody, with content in it.
 *   host  the host's namespace: every segment is IPC_PRIVATE and removed (IPC_RMID) once
 *         attached, so that none outlives the test.
 *
 * A parent and a forked child share segment A (3 pages + 100 bytes, mode 0640, owner changed
 * to 1234:2345 with IPC_SET): each bumps its own counter in it every millisecond and checks
 * the other's never goes back, and a pattern page stays intact. Segment B is removed while
 * both have it attached (SHM_DEST, its key reads IPC_PRIVATE); the child mirrors its counter
 * into it. Segment D is made by uid 4242 gid 4343 (cuid, cgid) and attached by the child only,
 * its middle page made read-only (three pieces of one attachment). With own, segment C holds a
 * pattern and is attached by nobody; it is looked at every 50 iterations. Segment E is made
 * and attached by the parent at iteration 300 and removed at 600 (during the rounds).
 * Segment F, filled by the parent, which detached it, stays attached by the child, which
 * never touches it there: no process has a page of it mapped.
 * Every iteration the parent checks through the ids it holds (shmctl IPC_STAT) each segment's
 * key, mode, owner, creator and size, and by key that shmget finds the same ids; it prints
 * "it=N ok" every 100 iterations, or "BAD what" and exits. */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define SIZE_A (3 * PAGE + 100)
#define SIZE_B 200
#define SIZE_C (2 * PAGE)
#define SIZE_D (3 * PAGE)
#define KEY_A 0x5eed000a
#define KEY_C 0x5eed000c
#define KEY_D 0x5eed000d
#define KEY_F 0x5eed000f
#define SIZE_F (2 * PAGE)

struct shared {
    volatile uint64_t parent, child;
};

static int own;
static int id_a, id_b, id_c = -1, id_d, id_e, id_f;
static unsigned char *e;

static void bad(const char *what)
{
    printf("BAD %s\n", what);
    fflush(stdout);
    exit(1);
}

static int make(key_t key, size_t size, int mode)
{
    int id = shmget(own ? key : IPC_PRIVATE, size, IPC_CREAT | IPC_EXCL | mode);
    if (id < 0) {
        perror("shmget");
        exit(2);
    }
    return id;
}

static void check(int id, key_t key, int mode, uid_t uid, gid_t gid, uid_t cuid, gid_t cgid,
                  size_t size, int removed, const char *name)
{
    struct shmid_ds ds;
    char what[128];
    if (shmctl(id, IPC_STAT, &ds) != 0) {
        snprintf(what, sizeof what, "segment %s: shmctl(IPC_STAT, %d) failed", name, id);
        bad(what);
    }
    int dest = (ds.shm_perm.mode & SHM_DEST) != 0;
    key_t want = removed || !own ? IPC_PRIVATE : key;
    if (ds.shm_perm.__key != want || (ds.shm_perm.mode & 0777) != mode ||
        ds.shm_perm.uid != uid || ds.shm_perm.gid != gid || ds.shm_perm.cuid != cuid ||
        ds.shm_perm.cgid != cgid || ds.shm_segsz != size || dest != removed) {
        snprintf(what, sizeof what, "segment %s (id %d): key %x mode %o uid %u gid %u cuid %u "
                 "cgid %u size %zu dest %d", name, id, ds.shm_perm.__key, ds.shm_perm.mode,
                 ds.shm_perm.uid, ds.shm_perm.gid, ds.shm_perm.cuid, ds.shm_perm.cgid,
                 (size_t)ds.shm_segsz, dest);
        bad(what);
    }
    if (own && !removed && shmget(key, 0, 0) != id) {
        snprintf(what, sizeof what, "segment %s: shmget(key %x) is not id %d", name, key, id);
        bad(what);
    }
}

static void fill(unsigned char *p, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 7 + seed);
}

static int intact(const unsigned char *p, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(i * 7 + seed))
            return 0;
    return 1;
}

static void tick(void)
{
    struct timespec ts = {0, 1000 * 1000};
    nanosleep(&ts, NULL);
}

int main(int argc, char **argv)
{
    own = argc > 1 && strcmp(argv[1], "own") == 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("start pid=%d\n", getpid());
    if (own && unshare(CLONE_NEWIPC) != 0) {
        perror("unshare(CLONE_NEWIPC)");
        return 2;
    }
    id_a = make(KEY_A, SIZE_A, 0640);
    struct shmid_ds ds;
    shmctl(id_a, IPC_STAT, &ds);
    ds.shm_perm.uid = 1234;
    ds.shm_perm.gid = 2345;
    if (shmctl(id_a, IPC_SET, &ds) != 0) {
        perror("shmctl(IPC_SET)");
        return 2;
    }
    unsigned char *a = shmat(id_a, NULL, 0);
    id_b = make(0, SIZE_B, 0600);
    struct shared *b = shmat(id_b, NULL, 0);
    if (a == (void *)-1 || b == (void *)-1) {
        perror("shmat");
        return 2;
    }
    fill(a + PAGE, PAGE, 1);
    shmctl(id_b, IPC_RMID, NULL);           /* removed while attached */
    if (!own)
        shmctl(id_a, IPC_RMID, NULL);
    /* D: made as uid 4242 gid 4343 (the thread's effective ids, raw calls) */
    syscall(SYS_setresgid, -1, 4343, -1);
    syscall(SYS_setresuid, -1, 4242, -1);
    id_d = make(KEY_D, SIZE_D, 0666);
    syscall(SYS_setresuid, -1, 0, -1);
    syscall(SYS_setresgid, -1, 0, -1);
    if (own) {
        id_c = make(KEY_C, SIZE_C, 0644);
        unsigned char *c = shmat(id_c, NULL, 0);
        fill(c + PAGE, PAGE, 3);
        shmdt(c);
    }
    /* F: filled by the parent, which detaches it; the child keeps it attached without ever
     * touching it there (no page of it is mapped in any process) and looks at it through a
     * second attachment for a moment every 50 iterations */
    id_f = make(KEY_F, SIZE_F, 0600);
    unsigned char *f = shmat(id_f, NULL, 0);
    fill(f, SIZE_F, 11);
    shmdt(f);
    struct shared *sa = (struct shared *)a;
    pid_t child = fork();
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        unsigned char *d = shmat(id_d, NULL, 0);
        if (d == (void *)-1) {
            perror("shmat D");
            return 2;
        }
        if (!own)
            shmctl(id_d, IPC_RMID, NULL);
        fill(d, SIZE_D, 5);
        mprotect(d + PAGE, PAGE, PROT_READ);
        if (shmat(id_f, NULL, 0) == (void *)-1) {
            perror("shmat F");
            return 2;
        }
        if (!own)
            shmctl(id_f, IPC_RMID, NULL);
        uint64_t mine = 0, seen = 0;
        for (;;) {
            if (sa->child != mine || b->child != mine)
                bad("child: its counter changed");
            if (sa->parent < seen)
                bad("child: the parent's counter went back");
            seen = sa->parent;
            if (!intact(d, SIZE_D, 5))
                bad("child: segment D changed");
            if (mine % 50 == 0) {
                unsigned char *look = shmat(id_f, NULL, SHM_RDONLY);
                if (look == (void *)-1 || !intact(look, SIZE_F, 11))
                    bad("child: segment F changed");
                shmdt(look);
            }
            mine++;
            sa->child = mine;
            b->child = mine;
            tick();
        }
    }
    while (sa->child == 0)                  /* the child has attached D (and removed it) */
        tick();
    uint64_t seen = 0;
    for (uint64_t it = 1;; it++) {
        if (sa->parent != it - 1)
            bad("parent: its counter changed");
        sa->parent = it;
        if (sa->child < seen || b->child < seen)
            bad("parent: the child's counter went back");
        seen = sa->child;
        if (!intact(a + PAGE, PAGE, 1))
            bad("segment A's pattern page changed");
        check(id_a, KEY_A, 0640, 1234, 2345, 0, 0, SIZE_A, !own, "A");
        check(id_b, 0, 0600, 0, 0, 0, 0, SIZE_B, 1, "B");
        check(id_d, KEY_D, 0666, 4242, 4343, 4242, 4343, SIZE_D, !own, "D");
        if (own && it % 50 == 0) {
            check(id_c, KEY_C, 0644, 0, 0, 0, 0, SIZE_C, 0, "C");
            shmctl(id_c, IPC_STAT, &ds);
            if (ds.shm_nattch != 0)
                bad("segment C is attached");
            unsigned char *c = shmat(id_c, NULL, SHM_RDONLY);
            if (c == (void *)-1 || !intact(c + PAGE, PAGE, 3) || c[0] != 0)
                bad("segment C's content changed");
            shmdt(c);
        }
        /* E: made at iteration 300 and gone at 600, likely between two rounds */
        if (it == 300) {
            id_e = make(0, PAGE, 0600);
            e = shmat(id_e, NULL, 0);
            if (e == (void *)-1)
                bad("shmat E");
            if (!own)
                shmctl(id_e, IPC_RMID, NULL);
            fill(e, PAGE, 9);
        }
        if (it > 300 && it <= 600 && !intact(e, PAGE, 9))
            bad("segment E changed");
        if (it == 600) {
            shmdt(e);
            if (own)
                shmctl(id_e, IPC_RMID, NULL);
        }
        if (it % 100 == 0)
            printf("it=%llu ok\n", (unsigned long long)it);
        tick();
    }
}
