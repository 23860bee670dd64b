/* prctlattrs: a zdtm-like self-checking workload for process and thread attributes set with
 * prctl and membarrier, as root.
 *
 * Sets up: securebits NOROOT | KEEP_CAPS | NO_CAP_AMBIENT_RAISE (every thread inherits
 * them); the main thread's machine-check kill policy early; a thread with rdtsc raising
 * SIGSEGV (PR_SET_TSC) and the late policy; a thread left at the defaults; KSM for all its
 * memory (PR_SET_MEMORY_MERGE); memory-deny-write-execute (PR_SET_MDWE); membarrier
 * registrations GLOBAL_EXPEDITED, PRIVATE_EXPEDITED and PRIVATE_EXPEDITED_RSEQ; its audit
 * login uid 4242. Each thread checks its own every 1 ms; the main thread the process's
 * every 2 ms (the expedited membarriers must succeed, an mprotect adding PROT_EXEC must be
 * refused); "it=N ok" every 100, or "BAD what" and exit at the first difference. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/capability.h>

#define SECBITS (1 | 1 << 4 | 1 << 6)   /* NOROOT, KEEP_CAPS, NO_CAP_AMBIENT_RAISE */
#define PR_SET_MDWE 65
#define PR_GET_MDWE 66
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#define MB_GLOBAL_EXPEDITED_REG 4
#define MB_PRIVATE_EXPEDITED 8
#define MB_PRIVATE_EXPEDITED_REG 16
#define MB_RSEQ 128
#define MB_RSEQ_REG 256
#define MB_GET_REGISTRATIONS 512
#define LOGINUID 4242

struct want {
    const char *who;
    int tsc;                /* PR_TSC_ENABLE 1, PR_TSC_SIGSEGV 2 */
    int mce;                /* PR_MCE_KILL_GET: late 0, early 1, default 2 */
};

static volatile int bad;
static pthread_barrier_t ready;

static void nap(long us)
{
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

static long membarrier(int cmd)
{
    return syscall(SYS_membarrier, cmd, 0, 0);
}

static void set_self(const struct want *w)
{
    if (w->tsc == PR_TSC_SIGSEGV && prctl(PR_SET_TSC, PR_TSC_SIGSEGV))
        exit(2);
    if (w->mce != 2 && prctl(PR_MCE_KILL, PR_MCE_KILL_SET, w->mce, 0, 0))
        exit(2);
}

static int check_self(const struct want *w)
{
    int tsc = 0;
    prctl(PR_GET_TSC, &tsc);
    int mce = prctl(PR_MCE_KILL_GET, 0, 0, 0, 0);
    int secbits = prctl(PR_GET_SECUREBITS);
    if (tsc != w->tsc || mce != w->mce || secbits != SECBITS) {
        printf("BAD %s: tsc %d mce %d securebits %#x, want %d %d %#x\n", w->who, tsc, mce,
               secbits, w->tsc, w->mce, SECBITS);
        return 0;
    }
    return 1;
}

static void *thread(void *arg)
{
    struct want *w = arg;
    set_self(w);
    pthread_barrier_wait(&ready);
    for (;;) {
        if (!check_self(w))
            bad = 1;
        nap(1000);
    }
    return NULL;
}

static int loginuid(void)
{
    char buf[32] = {0};
    FILE *f = fopen("/proc/self/loginuid", "r");
    if (!f || !fgets(buf, sizeof buf, f))
        return -1;
    fclose(f);
    return (int)strtoul(buf, NULL, 10);
}

/* Mode "nosetpcap": securebits NO_CAP_AMBIENT_RAISE, then CAP_SETPCAP dropped from the
 * effective set: a restore could not set them again (refused); it only prints the lines. */
static int nosetpcap(void)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    if (prctl(PR_SET_SECUREBITS, 1 << 6) || syscall(SYS_capget, &h, d))
        return 2;
    d[0].effective &= ~(1u << CAP_SETPCAP);
    if (syscall(SYS_capset, &h, d))
        return 2;
    printf("start pid=%d\n", getpid());
    for (long it = 1;; it++) {
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nap(2000);
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc > 1 && !strcmp(argv[1], "nosetpcap"))
        return nosetpcap();
    FILE *f = fopen("/proc/self/loginuid", "w");
    if (!f || fprintf(f, "%d", LOGINUID) < 0 || fclose(f)) {
        perror("loginuid");
        return 2;
    }
    if (prctl(PR_SET_SECUREBITS, SECBITS) || prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) ||
        membarrier(MB_GLOBAL_EXPEDITED_REG) || membarrier(MB_PRIVATE_EXPEDITED_REG) ||
        membarrier(MB_RSEQ_REG)) {
        perror("securebits/memory merge/membarrier");
        return 2;
    }
    static struct want wants[3] = {{"main", PR_TSC_ENABLE, 1}, {"tsc-thread", PR_TSC_SIGSEGV, 0},
                                   {"plain-thread", PR_TSC_ENABLE, 2}};
    pthread_barrier_init(&ready, NULL, 3);
    pthread_t t;
    for (int i = 1; i < 3; i++)
        pthread_create(&t, NULL, thread, &wants[i]);
    set_self(&wants[0]);
    pthread_barrier_wait(&ready);
    if (prctl(PR_SET_MDWE, 1, 0, 0, 0)) {          /* PR_MDWE_REFUSE_EXEC_GAIN */
        perror("mdwe");
        return 2;
    }
    char *rw = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (rw == MAP_FAILED)
        return 2;
    printf("start pid=%d\n", getpid());
    for (long it = 1;; it++) {
        if (bad || !check_self(&wants[0]))
            return 1;
        long regs = membarrier(MB_GET_REGISTRATIONS);
        if (regs != (MB_GLOBAL_EXPEDITED_REG | MB_PRIVATE_EXPEDITED_REG | MB_RSEQ_REG) ||
            membarrier(MB_PRIVATE_EXPEDITED) || membarrier(MB_RSEQ)) {
            printf("BAD membarrier registrations %#lx (%s)\n", regs, strerror(errno));
            return 1;
        }
        if (prctl(PR_GET_MDWE, 0, 0, 0, 0) != 1 || !mprotect(rw, 4096, PROT_READ | PROT_EXEC)) {
            printf("BAD memory-deny-write-execute %d\n", prctl(PR_GET_MDWE, 0, 0, 0, 0));
            return 1;
        }
        if (prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) != 1) {
            printf("BAD memory merge\n");
            return 1;
        }
        if (loginuid() != LOGINUID) {
            printf("BAD loginuid %d\n", loginuid());
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nap(2000);
    }
}
