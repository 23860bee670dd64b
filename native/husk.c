/* The husk: an empty, frozen shell that a stage daemon turns into a restored process.
 *
 * Built freestanding (no libc, static, no PIE) so that nothing of it needs to survive once the
 * daemon has unmapped its code and rebuilt the source's address space around the [vdso]. It
 * owns no resources the target could collide with: it closes every fd and blocks every signal.
 * PID in its arguments is the pid it stands for, so that `ps` says which process a husk will be.
 *
 *   prerestore-husk husk PID dies with its parent, blocks signals, closes its fds, writes "R" to
 *                            fd 3, closes it and waits in pause() until the daemon takes it over;
 *   prerestore-husk init PID pid 1 of a fresh pid namespace: starts the husk as PID inside it and
 *                            reaps children until the husk exits (a namespace dies with its init).
 */
#include <stdint.h>

#define SYS_write 1
#define SYS_close 3
#define SYS_rt_sigprocmask 14
#define SYS_pause 34
#define SYS_getppid 110
#define SYS_prctl 157
#define SYS_execve 59
#define SYS_exit_group 231
#define SYS_wait4 61
#define SYS_clone3 435
#define SYS_close_range 436
#define PR_SET_PDEATHSIG 1
#define PR_SET_NAME 15
#define SIGKILL 9
#define SIGCHLD 17
#define ECHILD 10

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    long r;
    register long r10 __asm__("r10") = d, r8 __asm__("r8") = e, r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(r)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}
#define sys(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

static long parse_long(const char *s)
{
    long v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    return v;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

struct clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};

static void husk(void)
{
    uint64_t all = ~0ULL;
    sys6(SYS_rt_sigprocmask, 0 /* SIG_BLOCK */, (long)&all, 0, 8, 0, 0);
    /* close everything but the readiness pipe, say ready, close that too: the daemon waits
     * for the pipe's EOF, so when it takes over, the fd table is empty and stays so */
    sys(SYS_close_range, 0, 2, 0);
    sys(SYS_close_range, 4, ~0U, 0);
    sys(SYS_write, 3, "R", 1);
    sys(SYS_close, 3, 0, 0);
    for (;;)
        sys(SYS_pause, 0, 0, 0);
}

static void init(char *self, char *pid_arg, long want)
{
    int tid = (int)want, status;
    sys(SYS_prctl, PR_SET_NAME, "prerestore-init", 0);   /* it outlives the husk stage */
    /* it outlives the command that made it too: it keeps none of its fds (a pipe on that
     * command's output would stay open as long as the restored tree runs), only the
     * readiness pipe, for the husk */
    sys(SYS_close_range, 0, 2, 0);
    sys(SYS_close_range, 4, ~0U, 0);
    struct clone_args a = {0};
    a.exit_signal = SIGCHLD;
    a.set_tid = (uint64_t)(uintptr_t)&tid;
    a.set_tid_size = 1;
    long child = sys(SYS_clone3, &a, sizeof a, 0);
    if (child < 0)
        sys(SYS_exit_group, 100, 0, 0);
    if (child == 0) {
        char *argv[] = {self, "husk", pid_arg, 0};
        char *envp[] = {0};
        sys(SYS_execve, self, argv, envp);
        sys(SYS_exit_group, 127, 0, 0);
    }
    sys(SYS_close, 3, 0, 0);
    for (;;) {
        long w = sys6(SYS_wait4, -1, (long)&status, 0x40000000 /* __WALL */, 0, 0, 0);
        if (w == child || w == -ECHILD)
            sys(SYS_exit_group, 0, 0, 0);
    }
}

__attribute__((used)) static void husk_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    sys(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0);
    if (argc >= 3 && streq(argv[1], "init"))
        init(argv[0], argv[2], parse_long(argv[2]));
    husk();
}

__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call husk_main\n"
        "  hlt\n");
