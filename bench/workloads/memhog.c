/* memhog SIZE_MIB PAGES_PER_MS — a process with a known memory size and dirty rate.
 *
 * Maps SIZE_MIB MiB of anonymous memory and writes every page once (all of it present), prints
 * `ready pid=<pid>` (line-buffered stdout), then forever: every millisecond (absolute
 * CLOCK_MONOTONIC deadlines) writes 8 bytes into PAGES_PER_MS pseudo-random pages (xorshift64),
 * keeping a running checksum of what it wrote. PAGES_PER_MS = 0 only sleeps (1 ms ticks).
 *
 * If it falls more than 10 ms behind (it was frozen, e.g. during a migration) it does not try to
 * catch up: the deadlines restart from now, so the dirty rate never bursts.
 *
 * SIGUSR1 prints `alive ticks=<n> writes=<n> sum=<hex>` (from the main loop, not the handler):
 * a cheap proof that a restored copy runs, takes signals and writes to its stdout.
 *
 * Env MEMHOG_ADDR=0x...: map at exactly that address (MAP_FIXED_NOREPLACE), so that two
 * memhogs share a layout (the copy_pages benchmark copies a range between two of them).
 *
 * Env MEMHOG_PROCS=P and MEMHOG_THREADS=T make it a process tree: the root forks P-1 children
 * (they die with it), each process maps SIZE_MIB/P MiB and dirties it with T threads, the
 * dirty rate split evenly over all P*T threads. `ready` is printed once the whole tree is.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define PAGE 4096UL
#define NSEC_PER_MS 1000000L

static volatile sig_atomic_t report_requested;
static volatile uint64_t checksum;      /* shared by the threads: racy, but only a witness */      /* volatile: the writes and the sum are never elided */

static void on_usr1(int sig) { (void)sig; report_requested = 1; }

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void add_ns(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static long behind_ns(const struct timespec *deadline, const struct timespec *now)
{
    return (now->tv_sec - deadline->tv_sec) * 1000000000L + (now->tv_nsec - deadline->tv_nsec);
}

static int parse_ul(const char *s, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

struct dirtier {
    unsigned char *buf;
    size_t npages;
    unsigned long rate;       /* pages per ms, this thread */
    uint64_t seed;
    int reporter;             /* the main thread of the root: answers SIGUSR1 */
};

static void *dirty_loop(void *arg)
{
    struct dirtier *d = arg;
    uint64_t ticks = 0, writes = 0;
    struct timespec deadline, now;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    for (;;) {
        for (unsigned long k = 0; k < d->rate; k++) {
            uint64_t x = xorshift64(&d->seed);
            size_t page = (size_t)(x % d->npages);
            size_t word = (size_t)(x >> 55);          /* 0..511: the 8-byte slot in the page */
            *(volatile uint64_t *)(d->buf + page * PAGE + word * 8) = x;
            checksum += x;
        }
        writes += d->rate;
        ticks++;
        if (d->reporter && report_requested) {
            report_requested = 0;
            printf("alive ticks=%llu writes=%llu sum=%016llx\n", (unsigned long long)ticks,
                   (unsigned long long)writes, (unsigned long long)checksum);
        }
        add_ns(&deadline, NSEC_PER_MS);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (behind_ns(&deadline, &now) > 10 * NSEC_PER_MS)
            deadline = now;                         /* we were stopped: no catch-up burst */
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline, NULL) == EINTR)
            ;
    }
    return NULL;
}

static unsigned long env_ul(const char *name, unsigned long dflt)
{
    const char *s = getenv(name);
    unsigned long v;
    return s && *s && !parse_ul(s, &v) && v ? v : dflt;
}

int main(int argc, char **argv)
{
    unsigned long size_mib, rate;
    if (argc != 3 || parse_ul(argv[1], &size_mib) || parse_ul(argv[2], &rate) || !size_mib) {
        fprintf(stderr, "usage: %s SIZE_MIB PAGES_PER_MS\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned long procs = env_ul("MEMHOG_PROCS", 1), threads = env_ul("MEMHOG_THREADS", 1);
    int is_root = 1, ready[2];
    if (procs > 1 && pipe(ready)) {
        perror("memhog: pipe");
        return 1;
    }
    pid_t root = getpid();
    for (unsigned long p = 1; p < procs && is_root; p++) {
        pid_t kid = fork();
        if (kid < 0) {
            perror("memhog: fork");
            return 1;
        }
        if (kid == 0) {
            is_root = 0;
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != root)
                _exit(1);
        }
    }

    size_t size = (size_mib << 20) / procs / PAGE * PAGE;
    size_t npages = size / PAGE;
    void *hint = NULL;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;
    const char *addr_env = getenv("MEMHOG_ADDR");
    if (addr_env && *addr_env) {
        unsigned long a;
        if (parse_ul(addr_env, &a) || a % PAGE) {
            fprintf(stderr, "memhog: bad MEMHOG_ADDR %s\n", addr_env);
            return 2;
        }
        hint = (void *)a;
        flags |= MAP_FIXED_NOREPLACE;
    }
    unsigned char *buf = mmap(hint, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (buf == MAP_FAILED || (hint && (void *)buf != hint)) {
        fprintf(stderr, "memhog: mmap %lu MiB: %s\n", size_mib, strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < npages; i++)          /* present, and not the shared zero page */
        *(uint64_t *)(buf + i * PAGE) = i + 1;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);

    unsigned long per_thread = rate / (procs * threads);
    if (rate && !per_thread)
        per_thread = 1;
    static struct dirtier d[64];
    if (threads > 64)
        threads = 64;
    for (unsigned long t = 0; t < threads; t++) {
        d[t] = (struct dirtier){buf, npages, per_thread,
                                0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid() ^ (t << 32),
                                is_root && t == 0};
        pthread_t th;
        if (t > 0 && pthread_create(&th, NULL, dirty_loop, &d[t])) {
            fprintf(stderr, "memhog: pthread_create failed\n");
            return 1;
        }
    }
    if (procs > 1) {
        if (!is_root) {
            if (write(ready[1], "r", 1) != 1)
                _exit(1);
        } else {
            char c;
            for (unsigned long p = 1; p < procs; p++)
                if (read(ready[0], &c, 1) != 1)
                    return 1;
        }
        close(ready[0]);
        close(ready[1]);
    }
    if (is_root)
        printf("ready pid=%d size_mib=%lu pages_per_ms=%lu addr=%p procs=%lu threads=%lu\n",
               (int)getpid(), size_mib, rate, (void *)buf, procs, threads);
    dirty_loop(&d[0]);
    return 0;
}
