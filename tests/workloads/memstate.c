/* memstate MODE: a zdtm-like self-checking workload for the state of memory mappings.
 *
 * Each MODE sets one kind of state up, then every 2 ms checks it (reading its own
 * /proc/self/smaps and using the memory), prints "it=N ok" every 100 checks (deterministic:
 * an unmigrated run prints the same) or "BAD what" and exits at the first difference.
 *
 *   many      20000 small distinct areas (one page each, protections alternating so that the
 *             kernel cannot merge them), each holding its own number, and 4000 one-page
 *             mappings of one file (in DIR)
 *   novdso    [vdso] and [vvar] unmapped by the program itself (no glibc call that goes
 *             through the vdso from then on: clock_gettime is the raw system call)
 *   madvise   areas with MADV_DONTDUMP (dd), MADV_DONTFORK (dc), MADV_WIPEONFORK (wf),
 *             MADV_HUGEPAGE (hg), MADV_NOHUGEPAGE (nh), MADV_MERGEABLE (mg) if the kernel
 *             has KSM, MAP_NORESERVE (nr); wiping and not forking are also checked in a child
 *   mayshare  a file opened O_RDWR and mapped MAP_SHARED, PROT_READ: each check raises it to
 *             PROT_WRITE, writes, and lowers it again; a private mapping of a file opened
 *             read-only raised to PROT_WRITE likewise (copy-on-write)
 *   mlock     mlock (lo) and mlock2(MLOCK_ONFAULT) (lf) areas
 *   mlockall  mlockall(MCL_CURRENT | MCL_FUTURE): a page mapped in each check must be locked
 *   mlockall-onfault  the same with MCL_ONFAULT: locked as it is faulted in (lf)
 *   droppable a MAP_DROPPABLE area (Linux 6.11+)
 *   deleted   mappings of a deleted file (private and shared)
 *   shmem     MAP_SHARED mappings of a memfd and of /dev/zero
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif

#define PAGE 4096
#define MANY 20000

static const char *mode;
static char *smaps;                 /* the last read of /proc/self/smaps */
static size_t smaps_cap;

/* Read into a buffer mapped once (smaps_cap bytes, see main): a buffer that grows while it
 * is read (realloc moving it with mremap) changes the very list being read, and a reader may
 * then see areas twice or miss some. */
static void read_smaps(void)
{
    int fd = open("/proc/self/smaps", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        printf("BAD open smaps: %s\n", strerror(errno));
        exit(1);
    }
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, smaps + len, smaps_cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            printf("BAD read smaps: %s\n", strerror(errno));
            exit(1);
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (len + 1 >= smaps_cap) {
            printf("BAD smaps longer than %zu bytes\n", smaps_cap);
            exit(1);
        }
    }
    smaps[len] = 0;
    close(fd);
}

/* The VmFlags of the area holding addr in the last smaps read, as " f1 f2 ... " (a space
 * before and after each flag), or NULL if no area holds it. */
static const char *flags_of(const void *addr, char *out, size_t size)
{
    uintptr_t a = (uintptr_t)addr;
    int inside = 0;
    for (char *line = smaps; *line;) {
        char *end = strchr(line, '\n');
        if (!end)
            end = line + strlen(line);
        char *dash = memchr(line, '-', (size_t)(end - line));
        char *space = memchr(line, ' ', (size_t)(end - line));
        if (dash && space && dash < space && !memchr(line, ':', (size_t)(space - line))) {
            uintptr_t s = strtoul(line, NULL, 16), e = strtoul(dash + 1, NULL, 16);
            inside = s <= a && a < e;
        }
        else if (inside && !strncmp(line, "VmFlags:", 8)) {
            snprintf(out, size, "%.*s ", (int)(end - line - 8), line + 8);
            return out;
        }
        line = *end ? end + 1 : end;
    }
    return NULL;
}

/* addr's area must have every flag in `want` and none in `not` (space-separated). */
static int check_flags(const char *what, const void *addr, const char *want, const char *not)
{
    char have[512], flag[8];
    /* A read of a long smaps (30000 areas) now and then lists areas twice or misses some
     * (seen on Linux 6.18 with nothing changing the areas): read it again before saying so. */
    for (int again = 0; again < 5 && !flags_of(addr, have, sizeof have); again++)
        read_smaps();
    if (!flags_of(addr, have, sizeof have)) {
        printf("BAD %s: no area at %p (in %zu bytes of smaps)\n", what, addr, strlen(smaps));
        return 0;
    }
    for (int pass = 0; pass < 2; pass++) {
        const char *p = pass ? not : want;
        int n;
        while (p && sscanf(p, "%7s%n", flag + 1, &n) == 1) {
            flag[0] = ' ';
            size_t l = strlen(flag);
            flag[l] = ' ';
            flag[l + 1] = 0;
            if ((strstr(have, flag) != NULL) == pass) {
                printf("BAD %s: VmFlags%s%s %s\n", what, have, pass ? "has" : "lacks", flag);
                return 0;
            }
            p += n;
        }
    }
    return 1;
}

static void *map(size_t len, int prot, int flags)
{
    void *p = mmap(NULL, len, prot, flags | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        printf("mmap: %s\n", strerror(errno));
        exit(2);
    }
    return p;
}

static void fail(const char *what)
{
    printf("%s: %s\n", what, strerror(errno));
    exit(2);
}

/* ---- many -------------------------------------------------------------------------------- */
static unsigned char *many;

#define MANY_FILE 4000
static unsigned char *many_file[MANY_FILE];

static void many_setup(const char *dir)
{
    /* file mappings too: each is opened by its path in the husk's batch */
    char path[4096];
    snprintf(path, sizeof path, "%s/memstate-many-mappings-of-one-file-with-a-name-long-"
             "enough-that-their-paths-overflow-one-batch.bin", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || pwrite(fd, "many", 4, 0) != 4)
        fail("many file");
    for (int i = 0; i < MANY_FILE; i++) {
        /* all at offset 0: neighbours cannot merge */
        many_file[i] = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
        if (many_file[i] == MAP_FAILED)
            fail("mmap file");
    }
    close(fd);
    many = map((size_t)MANY * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    for (int i = 0; i < MANY; i++)
        *(uint32_t *)(many + (size_t)i * PAGE) = 0x5eed0000u + (uint32_t)i;
    for (int i = 1; i < MANY; i += 2)
        if (mprotect(many + (size_t)i * PAGE, PAGE, PROT_READ))
            fail("mprotect");
}

static int many_check(long it)
{
    for (int i = 0; i < MANY; i++)
        if (*(uint32_t *)(many + (size_t)i * PAGE) != 0x5eed0000u + (uint32_t)i) {
            printf("BAD page %d holds %#x\n", i, *(uint32_t *)(many + (size_t)i * PAGE));
            return 0;
        }
    for (int i = 0; i < MANY_FILE; i++)
        if (memcmp(many_file[i], "many", 4)) {
            printf("BAD file mapping %d holds %.4s\n", i, many_file[i]);
            return 0;
        }
    if (it % 100 == 0) {               /* smaps of 24000 areas is long: now and then */
        read_smaps();
        for (int i = 0; i < MANY; i += 997)
            if (!check_flags("one page of many", many + (size_t)i * PAGE,
                             i % 2 ? "rd" : "rd wr", i % 2 ? "wr" : NULL))
                return 0;
    }
    return 1;
}

/* ---- novdso ------------------------------------------------------------------------------ */
static void novdso_setup(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long s[8], e[8];
    int n = 0;
    while (f && fgets(line, sizeof line, f) && n < 8)
        if (strstr(line, "[vdso]") || strstr(line, "[vvar"))
            if (sscanf(line, "%lx-%lx", &s[n], &e[n]) == 2)
                n++;
    fclose(f);
    if (!n) {
        printf("no vdso to unmap\n");
        exit(2);
    }
    for (int i = 0; i < n; i++)
        if (munmap((void *)s[i], e[i] - s[i]))
            fail("munmap vdso");
}

static int novdso_check(void)
{
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    static char buf[1 << 16];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    if (strstr(buf, "[vdso]") || strstr(buf, "[vvar")) {
        printf("BAD a vdso is mapped again\n");
        return 0;
    }
    struct timespec ts;
    if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts)) {
        printf("BAD clock_gettime\n");
        return 0;
    }
    return 1;
}

/* ---- madvise ----------------------------------------------------------------------------- */
struct advised {
    const char *name, *flag;
    int advice;
    unsigned char *at;
};
static struct advised advised[] = {
    {"MADV_DONTDUMP", "dd", MADV_DONTDUMP, NULL},
    {"MADV_DONTFORK", "dc", MADV_DONTFORK, NULL},
    {"MADV_WIPEONFORK", "wf", MADV_WIPEONFORK, NULL},
    {"MADV_HUGEPAGE", "hg", MADV_HUGEPAGE, NULL},
    {"MADV_NOHUGEPAGE", "nh", MADV_NOHUGEPAGE, NULL},
    {"MADV_MERGEABLE", "mg", MADV_MERGEABLE, NULL},
};
#define NADVISED (sizeof advised / sizeof advised[0])
static unsigned char *noreserve;
static int have_ksm;

static void madvise_setup(void)
{
    have_ksm = access("/sys/kernel/mm/ksm/run", F_OK) == 0;
    for (size_t i = 0; i < NADVISED; i++) {
        /* a guard page on each side: no neighbour to merge with */
        unsigned char *p = map(4 * PAGE, PROT_NONE, MAP_PRIVATE);
        advised[i].at = p + PAGE;
        if (mprotect(advised[i].at, 2 * PAGE, PROT_READ | PROT_WRITE))
            fail("mprotect");
        if (advised[i].advice == MADV_MERGEABLE && !have_ksm)
            continue;
        if (madvise(advised[i].at, 2 * PAGE, advised[i].advice))
            fail(advised[i].name);
        memset(advised[i].at, 0x40 + (int)i, 2 * PAGE);
    }
    noreserve = map(2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE);
    noreserve[0] = 1;
}

static int madvise_check(long it)
{
    read_smaps();
    for (size_t i = 0; i < NADVISED; i++) {
        if (advised[i].advice == MADV_MERGEABLE && !have_ksm)
            continue;
        if (!check_flags(advised[i].name, advised[i].at, advised[i].flag, NULL))
            return 0;
        if (advised[i].at[PAGE + 7] != 0x40 + i) {
            printf("BAD %s area lost its content\n", advised[i].name);
            return 0;
        }
    }
    if (!check_flags("MAP_NORESERVE", noreserve, "nr", NULL))
        return 0;
    if (it % 100 == 0) {
        /* what the flags mean: a child has no DONTFORK area and zeros in a WIPEONFORK one */
        pid_t pid = fork();
        if (pid == 0) {
            if (mincore(advised[1].at, PAGE, (unsigned char[1]){0}) != -1 || errno != ENOMEM)
                _exit(3);
            _exit(advised[2].at[9] == 0 ? 0 : 4);
        }
        int status;
        if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) ||
            WEXITSTATUS(status)) {
            printf("BAD fork: DONTFORK/WIPEONFORK not obeyed (status %d)\n", status);
            return 0;
        }
    }
    return 1;
}

/* ---- mayshare ---------------------------------------------------------------------------- */
static unsigned char *shared_ro, *private_ro;

static void mayshare_setup(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/memstate-shared.bin", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, 2 * PAGE))
        fail("shared file");
    shared_ro = mmap(NULL, 2 * PAGE, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    snprintf(path, sizeof path, "%s/memstate-private.bin", dir);
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, 2 * PAGE))
        fail("private file");
    close(fd);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    private_ro = mmap(NULL, 2 * PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (shared_ro == MAP_FAILED || private_ro == MAP_FAILED)
        fail("mmap");
}

static int raise_and_write(const char *what, unsigned char *p, long it)
{
    if (mprotect(p, 2 * PAGE, PROT_READ | PROT_WRITE)) {
        printf("BAD %s: mprotect(PROT_WRITE): %s\n", what, strerror(errno));
        return 0;
    }
    if (p[5] != (unsigned char)(it - 1)) {
        printf("BAD %s holds %d, not %d\n", what, p[5], (unsigned char)(it - 1));
        return 0;
    }
    p[5] = (unsigned char)it;
    if (mprotect(p, 2 * PAGE, PROT_READ)) {
        printf("BAD %s: mprotect(PROT_READ): %s\n", what, strerror(errno));
        return 0;
    }
    return 1;
}

static int mayshare_check(long it)
{
    read_smaps();
    if (!check_flags("shared mapping of a read-write file", shared_ro, "rd mr mw me ms", "wr") ||
        !check_flags("private file mapping", private_ro, "rd mr mw me", "wr ms"))
        return 0;
    return raise_and_write("shared mapping", shared_ro, it) &&
        raise_and_write("private mapping", private_ro, it);
}

/* ---- mlock, mlockall --------------------------------------------------------------------- */
static unsigned char *locked, *onfault;

static void mlock_setup(void)
{
    locked = map(4 * PAGE, PROT_NONE, MAP_PRIVATE) + PAGE;
    onfault = map(4 * PAGE, PROT_NONE, MAP_PRIVATE) + PAGE;
    if (mprotect(locked, 2 * PAGE, PROT_READ | PROT_WRITE) ||
        mprotect(onfault, 2 * PAGE, PROT_READ | PROT_WRITE))
        fail("mprotect");
    if (mlock(locked, 2 * PAGE))
        fail("mlock");
    if (syscall(SYS_mlock2, onfault, 2 * PAGE, MLOCK_ONFAULT))
        fail("mlock2");
    locked[1] = onfault[1] = 7;
}

static int mlock_check(void)
{
    read_smaps();
    return check_flags("mlock", locked, "lo", "lf") &&
        check_flags("mlock2(MLOCK_ONFAULT)", onfault, "lo lf", NULL) &&
        check_flags("not locked", locked - PAGE, NULL, "lo lf");
}

static int mlockall_check(void)
{
    void *p = map(PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    int onfault = !strcmp(mode, "mlockall-onfault");
    read_smaps();
    int ok = check_flags("mlockall(MCL_CURRENT): the stack", &p, onfault ? "lo lf" : "lo",
                         onfault ? NULL : "lf") &&
        check_flags("mlockall(MCL_FUTURE): a new page", p, onfault ? "lo lf" : "lo",
                    onfault ? NULL : "lf");
    munmap(p, PAGE);
    return ok;
}

/* ---- droppable --------------------------------------------------------------------------- */
static unsigned char *droppable;

static void droppable_setup(void)
{
    droppable = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_DROPPABLE | MAP_ANONYMOUS,
                     -1, 0);
    if (droppable == MAP_FAILED)
        fail("mmap(MAP_DROPPABLE)");
}

static int droppable_check(void)
{
    read_smaps();
    return check_flags("MAP_DROPPABLE", droppable, "dp", NULL);
}

/* ---- deleted, shmem ---------------------------------------------------------------------- */
static unsigned char *areas[2];
static const char *area_names[2];

static void deleted_setup(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/memstate-deleted.bin", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, 4 * PAGE))
        fail("deleted file");
    if (pwrite(fd, "deleted file", 12, PAGE) != 12)
        fail("pwrite");
    areas[0] = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    areas[1] = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 2 * PAGE);
    area_names[0] = "deleted file (private)";
    area_names[1] = "deleted file (shared)";
    close(fd);
    unlink(path);
    if (areas[0] == MAP_FAILED || areas[1] == MAP_FAILED)
        fail("mmap");
    areas[0][0] = 1;               /* one page of its own, one still the file's */
}

static void shmem_setup(void)
{
    int fd = memfd_create("memstate", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 2 * PAGE))
        fail("memfd");
    areas[0] = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    fd = open("/dev/zero", O_RDWR | O_CLOEXEC);
    areas[1] = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    area_names[0] = "memfd";
    area_names[1] = "/dev/zero (shared)";
    if (areas[0] == MAP_FAILED || areas[1] == MAP_FAILED)
        fail("mmap");
}

static int areas_check(long it)
{
    if (!strcmp(mode, "deleted") && memcmp(areas[0] + PAGE, "deleted file", 12)) {
        printf("BAD private mapping of the deleted file lost its content\n");
        return 0;
    }
    unsigned char want = (unsigned char)(it - 1);
    for (int i = 0; i < 2; i++) {
        if (areas[i][PAGE + 100] != want) {
            printf("BAD %s holds %d, not %d\n", area_names[i], areas[i][PAGE + 100], want);
            return 0;
        }
        areas[i][PAGE + 100] = (unsigned char)it;
    }
    return 1;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    mode = argc > 1 ? argv[1] : "";
    const char *dir = argc > 2 ? argv[2] : "/tmp";
    smaps_cap = strcmp(mode, "many") ? 1 << 20 : 40 << 20;
    smaps = mmap(NULL, smaps_cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (smaps == MAP_FAILED)
        fail("mmap smaps buffer");
    if (!strcmp(mode, "many"))
        many_setup(dir);
    else if (!strcmp(mode, "novdso"))
        novdso_setup();
    else if (!strcmp(mode, "madvise"))
        madvise_setup();
    else if (!strcmp(mode, "mayshare"))
        mayshare_setup(dir);
    else if (!strcmp(mode, "mlock"))
        mlock_setup();
    else if (!strcmp(mode, "mlockall")) {
        if (mlockall(MCL_CURRENT | MCL_FUTURE))
            fail("mlockall");
    } else if (!strcmp(mode, "mlockall-onfault")) {
        if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT))
            fail("mlockall");
    } else if (!strcmp(mode, "droppable"))
        droppable_setup();
    else if (!strcmp(mode, "deleted"))
        deleted_setup(dir);
    else if (!strcmp(mode, "shmem"))
        shmem_setup();
    else {
        printf("usage: memstate many|novdso|madvise|mayshare|mlock|mlockall|mlockall-onfault"
               "|droppable|deleted"
               "|shmem"
               " [DIR]\n");
        return 2;
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        int ok;
        if (!strcmp(mode, "many"))
            ok = many_check(it);
        else if (!strcmp(mode, "novdso"))
            ok = novdso_check();
        else if (!strcmp(mode, "madvise"))
            ok = madvise_check(it);
        else if (!strcmp(mode, "mayshare"))
            ok = mayshare_check(it);
        else if (!strcmp(mode, "mlock"))
            ok = mlock_check();
        else if (!strncmp(mode, "mlockall", 8))
            ok = mlockall_check();
        else if (!strcmp(mode, "droppable"))
            ok = droppable_check();
        else
            ok = areas_check(it);
        if (!ok)
            return 1;
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
