/* posixshm NAME: POSIX shared memory as PostgreSQL's dynamic shared memory uses it: a segment
 * made with shm_open (a file in /dev/shm), sized with ftruncate, mapped MAP_SHARED and its fd
 * closed; then two forked children map it too (one inherits the mapping, one opens it by name
 * and maps it again at another address). A token goes round parent -> child 1 -> child 2 ->
 * parent through the segment alone (no pipe), and at each turn the holder rewrites 64 KiB of it
 * from the turn number and the next one checks every byte: the three must keep sharing the very
 * same object, with its contents.
 * Prints "start pid=N", then "it=N sum=HEX" every 100 turns (BAD and exit if a byte is wrong,
 * or if the segment is no longer /dev/shm/NAME in this process's maps). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#define AREA (64 * 1024)
#define SIZE (AREA + 4096)

struct seg {
    volatile uint64_t turn;     /* whose turn: turn % 3 (0 parent, 1 child 1, 2 child 2) */
    uint64_t pad[511];
    unsigned char area[AREA];
};

static const char *name;

static uint64_t fill(struct seg *s, uint64_t n)
{
    uint64_t x = n * 0x9e3779b97f4a7c15ull + 1, sum = 0;
    for (int i = 0; i < AREA; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        memcpy(s->area + i, &x, 8);
        sum += x;
    }
    return sum;
}

static void check(struct seg *s, uint64_t n, const char *who)
{
    uint64_t x = n * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < AREA; i += 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (memcmp(s->area + i, &x, 8)) {
            printf("BAD %s turn %llu: byte %d of the segment differs\n", who,
                   (unsigned long long)n, i);
            exit(1);
        }
    }
}

static void check_mapped(struct seg *s, const char *who)
{
    char line[512], want[300];
    snprintf(want, sizeof want, "/dev/shm/%s\n", name + 1);
    FILE *f = fopen("/proc/self/maps", "r");
    int ok = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long lo = strtoul(line, NULL, 16);
        size_t n = strlen(line), w = strlen(want);
        if (lo == (unsigned long)s && n >= w && !strcmp(line + n - w, want) &&
            strstr(line, " rw-s "))
            ok = 1;
    }
    if (f)
        fclose(f);
    if (!ok) {
        printf("BAD %s: the segment at %p is not /dev/shm/%s mapped shared\n", who, (void *)s,
               name + 1);
        exit(1);
    }
}

static void play(struct seg *s, int me, const char *who)
{
    for (uint64_t n = me;; n += 3) {
        while (s->turn != n)
            usleep(200);
        if (n > 0)
            check(s, n - 1, who);
        uint64_t sum = fill(s, n);
        if (me == 0 && n > 0 && n % 300 == 0) {
            check_mapped(s, who);
            printf("it=%llu sum=%016llx\n", (unsigned long long)(n / 3),
                   (unsigned long long)sum);
        }
        __atomic_store_n(&s->turn, n + 1, __ATOMIC_RELEASE);
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2 || argv[1][0] != '/') {
        fprintf(stderr, "usage: posixshm /NAME\n");
        return 2;
    }
    name = argv[1];
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || ftruncate(fd, SIZE)) {
        perror("shm_open");
        return 1;
    }
    struct seg *s = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (s == MAP_FAILED)
        return 1;
    printf("start pid=%d\n", getpid());
    for (int c = 1; c <= 2; c++) {
        if (fork() == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            struct seg *mine = s;
            if (c == 2) {                   /* opened by name, mapped elsewhere */
                int cfd = shm_open(name, O_RDWR, 0);
                mine = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
                close(cfd);
                munmap(s, SIZE);
            }
            play(mine, c, c == 1 ? "child 1" : "child 2");
        }
    }
    play(s, 0, "parent");
}
