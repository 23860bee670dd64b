/* procattrs: a zdtm-like self-checking workload for attributes a process sets on itself
 * with prctl: each thread's name (PR_SET_NAME) and timer slack (PR_SET_TIMERSLACK), names of
 * anonymous memory (PR_SET_VMA_ANON_NAME: [anon:NAME] in maps).
 *
 * Sets up: the main thread named "pa-main" with slack 123456 ns; a thread "pa-worker-one"
 * with slack 777 ns; a thread "pa-two" with the default slack; 16 anonymous pages of which
 * pages 0-3 are named "alpha" and 8-11 "beta", and 4 pages named "gamma-gamma" whole (if
 * the kernel can name them: CONFIG_ANON_VMA_NAME).
 * Each thread checks its own name and slack every 1 ms (prctl: no /proc/PID of a tid, which
 * a restore into a pid namespace of its own would not see), the main thread the names in
 * /proc/self/maps and the memory's content every 2 ms; "it=N ok" every 100, or "BAD what"
 * and exit at the first difference. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif

struct want {
    const char *name;
    unsigned long slack;        /* 0: whatever it started with */
};

static volatile int bad;
static pthread_barrier_t ready;

static void nap(long us)
{
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, NULL);
}

static void set_self(struct want *w)
{
    if (prctl(PR_SET_NAME, w->name))
        exit(2);
    if (w->slack && prctl(PR_SET_TIMERSLACK, w->slack))
        exit(2);
    else if (!w->slack)
        w->slack = (unsigned long)prctl(PR_GET_TIMERSLACK);
}

static int check_self(const struct want *w)
{
    char name[16] = {0};
    prctl(PR_GET_NAME, name);
    unsigned long slack = (unsigned long)prctl(PR_GET_TIMERSLACK);
    if (strcmp(name, w->name) || slack != w->slack) {
        printf("BAD thread %s: name %s slack %lu, want %lu\n", w->name, name, slack, w->slack);
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

static char *area, *gamma_area;

/* is there a maps line for [start, end) named name? */
static int named(FILE *maps, void *start, void *end, const char *name)
{
    char line[512], want[128];
    snprintf(want, sizeof want, "%lx-%lx ", (unsigned long)start, (unsigned long)end);
    rewind(maps);
    while (fgets(line, sizeof line, maps)) {
        if (strncmp(line, want, strlen(want)))
            continue;
        char label[128];
        snprintf(label, sizeof label, "[anon:%s]\n", name);
        size_t n = strlen(line), m = strlen(label);
        if (n >= m && !strcmp(line + n - m, label))
            return 1;
        printf("BAD maps line %s", line);
        return 0;
    }
    printf("BAD no maps line %s[anon:%s]\n", want, name);
    return 0;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    long page = sysconf(_SC_PAGESIZE);
    area = mmap(NULL, 16 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gamma_area = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (area == MAP_FAILED || gamma_area == MAP_FAILED)
        return 2;
    for (long i = 0; i < 16 * page; i++)
        area[i] = (char)(i * 7);
    memset(gamma_area, 0x5a, 4 * page);
    /* a kernel without CONFIG_ANON_VMA_NAME says EINVAL: then there are no names to check */
    int names = !prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, area, 4 * page, "alpha");
    if (names && (prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, area + 8 * page, 4 * page, "beta") ||
                  prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, gamma_area, 4 * page,
                        "gamma-gamma"))) {
        perror("PR_SET_VMA_ANON_NAME");
        return 2;
    }
    if (!names)
        printf("no anonymous memory names on this kernel (CONFIG_ANON_VMA_NAME)\n");
    static struct want wants[3] = {{"pa-main", 123456}, {"pa-worker-one", 777}, {"pa-two", 0}};
    pthread_barrier_init(&ready, NULL, 3);
    pthread_t t;
    for (int i = 1; i < 3; i++)
        pthread_create(&t, NULL, thread, &wants[i]);
    set_self(&wants[0]);
    pthread_barrier_wait(&ready);
    printf("start pid=%d\n", getpid());
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps)
        return 2;
    for (long it = 1;; it++) {
        if (bad || !check_self(&wants[0]))
            return 1;
        setvbuf(maps, NULL, _IONBF, 0);
        if (names && (!named(maps, area, area + 4 * page, "alpha") ||
                      !named(maps, area + 8 * page, area + 12 * page, "beta") ||
                      !named(maps, gamma_area, gamma_area + 4 * page, "gamma-gamma")))
            return 1;
        for (long i = 0; i < 16 * page; i += 511)
            if (area[i] != (char)(i * 7)) {
                printf("BAD byte %ld\n", i);
                return 1;
            }
        if (gamma_area[4 * page - 1] != 0x5a) {
            printf("BAD gamma\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nap(2000);
    }
}
