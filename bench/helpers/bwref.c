/* bwref [SIZE_MIB [REPS]] — reference memory bandwidths of this machine, as one JSON object.
 *
 *   memcpy               memcpy of SIZE MiB between two present buffers in this process
 *   vm_readv_faulted     process_vm_readv of SIZE MiB out of present pages of a child
 *   vm_writev_faulted    process_vm_writev of SIZE MiB into present pages of a child
 *   vm_writev_fresh      process_vm_writev of SIZE MiB into a never-touched anonymous mapping
 *                        of a child (every page is faulted in by the write)
 *
 * The process_vm_* copies go through an 8 MiB local buffer in 8 MiB calls, like the engine's
 * page copy (native/prerestore.c, COPY_CHUNK). Each number is the best of REPS runs, in bytes
 * per second; the mean is also given. The memcpy buffers get one untimed pass first. A fresh
 * mapping is used once: the child maps REPS of them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (8UL << 20)
#define MAXREPS 16

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *map_anon(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static void touch(unsigned char *p, size_t size, unsigned char v)
{
    for (size_t i = 0; i < size; i += 4096)
        p[i] = v;
}

/* Move size bytes between our buf (CHUNK bytes, reused) and remote [addr, addr+size). */
static int vm_copy(pid_t pid, int write, unsigned char *buf, uint64_t addr, size_t size)
{
    for (size_t off = 0; off < size; off += CHUNK) {
        size_t len = size - off < CHUNK ? size - off : CHUNK;
        struct iovec l = {buf, len}, r = {(void *)(uintptr_t)(addr + off), len};
        ssize_t n = write ? process_vm_writev(pid, &l, 1, &r, 1, 0)
                          : process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n != (ssize_t)len)
            return -1;
    }
    return 0;
}

struct result { double best, sum; int n; };

static void record(struct result *r, size_t bytes, double secs)
{
    double bw = bytes / secs;
    if (bw > r->best)
        r->best = bw;
    r->sum += bw;
    r->n++;
}

static void print_result(const char *name, const struct result *r, int last)
{
    printf("  \"%s\": {\"best_Bps\": %.0f, \"mean_Bps\": %.0f, \"runs\": %d}%s\n", name, r->best,
           r->n ? r->sum / r->n : 0.0, r->n, last ? "" : ",");
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 256;
    int reps = argc > 2 ? atoi(argv[2]) : 3;
    if (!mib || reps < 1 || reps > MAXREPS) {
        fprintf(stderr, "usage: %s [SIZE_MIB [REPS<=%d]]\n", argv[0], MAXREPS);
        return 2;
    }
    size_t size = mib << 20;

    /* memcpy */
    struct result cpy = {0};
    unsigned char *a = map_anon(size), *b = map_anon(size);
    touch(a, size, 1);
    touch(b, size, 2);
    memcpy(b, a, size);             /* warm-up, untimed */
    for (int i = 0; i < reps; i++) {
        double t0 = now_s();
        memcpy(b, a, size);
        record(&cpy, size, now_s() - t0);
    }
    munmap(a, size);
    munmap(b, size);

    /* a child with one present mapping and `reps` fresh ones; it tells us where, then waits */
    int up[2], down[2];
    if (pipe(up) || pipe(down)) {
        perror("pipe");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        close(up[0]);
        close(down[1]);
        uint64_t addrs[1 + MAXREPS];
        unsigned char *faulted = map_anon(size);
        touch(faulted, size, 3);
        addrs[0] = (uintptr_t)faulted;
        for (int i = 0; i < reps; i++)
            addrs[1 + i] = (uintptr_t)map_anon(size);
        if (write(up[1], addrs, sizeof addrs) != (ssize_t)sizeof addrs)
            _exit(1);
        char c;
        while (read(down[0], &c, 1) < 0 && errno == EINTR)
            ;
        _exit(0);
    }
    close(up[1]);
    close(down[0]);
    uint64_t addrs[1 + MAXREPS];
    if (read(up[0], addrs, sizeof addrs) != (ssize_t)sizeof addrs) {
        fprintf(stderr, "bwref: child did not report its mappings\n");
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        return 1;
    }
    unsigned char *buf = map_anon(CHUNK);
    touch(buf, CHUNK, 4);
    struct result rd = {0}, wr = {0}, fresh = {0};
    int err = 0;
    for (int i = 0; i < reps && !err; i++) {
        double t0 = now_s();
        err |= vm_copy(child, 0, buf, addrs[0], size);
        double t1 = now_s();
        err |= vm_copy(child, 1, buf, addrs[0], size);
        double t2 = now_s();
        err |= vm_copy(child, 1, buf, addrs[1 + i], size);
        double t3 = now_s();
        record(&rd, size, t1 - t0);
        record(&wr, size, t2 - t1);
        record(&fresh, size, t3 - t2);
    }
    int saved = errno;
    close(down[1]);                 /* EOF: the child exits */
    waitpid(child, NULL, 0);
    if (err) {
        fprintf(stderr, "bwref: process_vm_readv/writev: %s\n", strerror(saved));
        return 1;
    }

    printf("{\n  \"size_bytes\": %zu,\n  \"chunk_bytes\": %lu,\n", size, CHUNK);
    print_result("memcpy", &cpy, 0);
    print_result("vm_readv_faulted", &rd, 0);
    print_result("vm_writev_faulted", &wr, 0);
    print_result("vm_writev_fresh", &fresh, 1);
    printf("}\n");
    return 0;
}
