/* prerestore native layer: thin wrappers over ptrace, syscall injection, PAGEMAP_SCAN,
 * userfaultfd and cross-process copies. Every function returns >= 0 on success and -errno on
 * failure; see prerestore.h for the contract. Loops that touch every page live here so that
 * Python issues one call per batch, never one per page. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <elf.h>
#include <pthread.h>
#include <sched.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>

#include "prerestore.h"

/* ---- UAPI the installed headers are too old to have (linux/fs.h, 6.7+; userfaultfd.h 6.7+) */
struct pr_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
        category_mask, category_anyof_mask, return_mask;
};
#define PR_PAGEMAP_SCAN _IOWR('f', 16, struct pr_pm_scan_arg)
const uint64_t PR_PAGE_IS_WPALLOWED = 1 << 0, PR_PAGE_IS_WRITTEN = 1 << 1, PR_PAGE_IS_FILE = 1 << 2,
               PR_PAGE_IS_PRESENT = 1 << 3, PR_PAGE_IS_SWAPPED = 1 << 4,
               PR_PAGE_IS_PFNZERO = 1 << 5, PR_PAGE_IS_HUGE = 1 << 6;
const uint64_t PR_PM_SCAN_WP_MATCHING = 1 << 0, PR_PM_SCAN_CHECK_WPASYNC = 1 << 1;
const uint64_t PR_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13, PR_UFFD_FEATURE_WP_ASYNC = 1 << 15;
const uint64_t PR_UFFD_USER_MODE_ONLY = 1;

#ifndef PTRACE_GET_RSEQ_CONFIGURATION
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#define PR_CLONE_INTO_CGROUP 0x200000000ULL   /* linux/sched.h, 5.7+ */
#ifndef PR_TIMER_CREATE_RESTORE_IDS
#define PR_TIMER_CREATE_RESTORE_IDS 77        /* linux/prctl.h, 6.16+ */
#endif
const long PR_TIMER_RESTORE_IDS = PR_TIMER_CREATE_RESTORE_IDS;

/* linux/prctl.h 6.3+ (memory-deny-write-execute), 6.4+ (KSM for the whole process);
 * linux/membarrier.h 6.3+ (the registrations a process made) */
const long PR_SET_MDWE_ = 65, PR_GET_MDWE_ = 66, PR_SET_MEMORY_MERGE_ = 67,
           PR_GET_MEMORY_MERGE_ = 68, MEMBARRIER_GET_REGISTRATIONS = 1 << 9;

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* kernel-internal restart codes, visible to a tracer in rax of a task stopped in a syscall */
#define ERESTARTSYS 512
#define ERESTARTNOINTR 513
#define ERESTARTNOHAND 514
#define ERESTART_RESTARTBLOCK 516

#define ERR (-errno)
#define PAGE 4096UL
#define IOV_BATCH 1024
#define COPY_CHUNK (8UL << 20)
const long PR_CHUNK = COPY_CHUNK;

_Static_assert(sizeof(struct pr_regs) == sizeof(struct user_regs_struct), "regs layout");
_Static_assert(sizeof(struct pr_call) == 64, "batch table entry is 64 bytes");
_Static_assert(sizeof(struct pr_saved) <= PR_SAVED_SIZE, "saved context fits its slot");

/* ---- ptrace ---------------------------------------------------------------------------- */

int pr_seize(int pid, uint64_t options)
{
    return ptrace(PTRACE_SEIZE, pid, 0, (void *)options) ? ERR : 0;
}

int pr_interrupt(int pid)
{
    return ptrace(PTRACE_INTERRUPT, pid, 0, 0) ? ERR : 0;
}

/* Wait until the tracee sits in a ptrace stop we can work in (PTRACE_EVENT_STOP or a trap).
 *
 * Why the loop: PTRACE_INTERRUPT races with signals. If a signal is being delivered when we
 * interrupt, the tracee reports a signal-delivery-stop first. Suppressing it would lose the
 * signal, so we let it be delivered exactly as if we had not been there (the handler runs) and
 * interrupt again. *status gets the raw wait status of the stop we return in. */
int pr_wait_stop(int pid, int *status)
{
    for (;;) {
        int st;
        if (waitpid(pid, &st, __WALL) < 0)
            return ERR;
        if (!WIFSTOPPED(st)) {
            *status = st;
            return -ESRCH;
        }
        int sig = WSTOPSIG(st), event = st >> 16;
        if (event == PTRACE_EVENT_STOP || sig == SIGTRAP) {
            *status = st;
            return 0;
        }
        if (ptrace(PTRACE_CONT, pid, 0, (void *)(long)sig) || ptrace(PTRACE_INTERRUPT, pid, 0, 0))
            return ERR;
    }
}

int pr_detach(int pid, int sig)
{
    return ptrace(PTRACE_DETACH, pid, 0, (void *)(long)sig) ? ERR : 0;
}

int pr_get_regs(int pid, struct pr_regs *regs)
{
    return ptrace(PTRACE_GETREGS, pid, 0, regs) ? ERR : 0;
}

int pr_set_regs(int pid, const struct pr_regs *regs)
{
    return ptrace(PTRACE_SETREGS, pid, 0, regs) ? ERR : 0;
}

long pr_get_xstate(int pid, void *buf, size_t len)
{
    struct iovec iov = {buf, len};
    return ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, &iov) ? ERR : (long)iov.iov_len;
}

int pr_set_xstate(int pid, const void *buf, size_t len)
{
    struct iovec iov = {(void *)buf, len};
    return ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, &iov) ? ERR : 0;
}

int pr_get_sigmask(int pid, uint64_t *mask)
{
    return ptrace(PTRACE_GETSIGMASK, pid, sizeof *mask, mask) ? ERR : 0;
}

int pr_set_sigmask(int pid, uint64_t mask)
{
    return ptrace(PTRACE_SETSIGMASK, pid, sizeof mask, &mask) ? ERR : 0;
}

/* PTRACE_GET_RSEQ_CONFIGURATION returns the number of bytes written, not 0. */
int pr_get_rseq(int pid, struct pr_rseq_conf *conf)
{
    long r = ptrace(PTRACE_GET_RSEQ_CONFIGURATION, pid, sizeof *conf, conf);
    return r < 0 ? ERR : 0;
}

/* A seccomp filter of a stopped tracee, as it was installed: `index` counts from its oldest
 * filter (0). buf has room for PR_SECCOMP_MAX_INSNS instructions (8 bytes each, the kernel's
 * BPF_MAXINSNS); returns how many the filter has. The requests are Linux 4.4/4.16 UAPI, kept
 * here by number: <sys/ptrace.h> and <linux/ptrace.h> do not go together. */
#define PR_PTRACE_SECCOMP_GET_FILTER 0x420c
#define PR_PTRACE_SECCOMP_GET_METADATA 0x420d

int pr_seccomp_filter(int pid, uint64_t index, void *buf)
{
    long n = ptrace(PR_PTRACE_SECCOMP_GET_FILTER, pid, (void *)index, NULL);
    if (n < 0)
        return ERR;
    if (n > PR_SECCOMP_MAX_INSNS)
        return -E2BIG;
    n = ptrace(PR_PTRACE_SECCOMP_GET_FILTER, pid, (void *)index, buf);
    return n < 0 ? ERR : (int)n;
}

/* The flags that filter was installed with, as the kernel reports them (SECCOMP_FILTER_FLAG_LOG). */
int pr_seccomp_flags(int pid, uint64_t index, uint64_t *flags)
{
    struct { uint64_t filter_off, flags; } md = {index, 0};
    if (ptrace(PR_PTRACE_SECCOMP_GET_METADATA, pid, (void *)sizeof md, &md) < 0)
        return ERR;
    *flags = md.flags;
    return 0;
}

int pr_get_robust_list(int pid, uint64_t *head, uint64_t *len)
{
    size_t l = 0;
    void *h = NULL;
    if (syscall(SYS_get_robust_list, pid, &h, &l))
        return ERR;
    *head = (uint64_t)(uintptr_t)h;
    *len = l;
    return 0;
}

/* Copy up to `max` queued siginfos (128 bytes each) of the thread's private or the process'
 * shared queue, without dequeuing them. Returns how many. */
long pr_peek_siginfo(int pid, int shared, void *buf, long max)
{
    struct {
        uint64_t off;
        uint32_t flags;
        int32_t nr;
    } arg = {0, shared ? 1 : 0, (int32_t)max};
    long r = ptrace(0x4209 /* PTRACE_PEEKSIGINFO */, pid, &arg, buf);
    return r < 0 ? ERR : r;
}

/* ---- syscall injection ------------------------------------------------------------------- */

/* Find a `mov $imm32,%eax; syscall` sequence in [start, end) of the tracee (its vdso) and return
 * the address of the syscall instruction: a syscall we can run without writing code. */
long pr_find_syscall_insn(int pid, uint64_t start, uint64_t end, uint64_t *addr)
{
    size_t len = end - start;
    unsigned char *b = malloc(len);
    if (!b)
        return -ENOMEM;
    long r = pr_read_mem(pid, start, b, len);
    if (r == (long)len) {
        r = -ENOENT;
        for (size_t k = 5; k + 1 < len; k++)
            if (b[k] == 0x0f && b[k + 1] == 0x05 && b[k - 5] == 0xb8) {
                *addr = start + k;
                r = 0;
                break;
            }
    } else if (r >= 0)
        r = -EIO;
    free(b);
    return r;
}

/* The registers of a system call nr(args) made by the instruction at insn; orig_rax -1
 * keeps the kernel from applying syscall-restart logic to our call. */
static void set_call_regs(struct user_regs_struct *r, uint64_t insn, int64_t nr,
                          const uint64_t *args)
{
    r->rax = nr;
    r->orig_rax = -1;
    r->rdi = args[0], r->rsi = args[1], r->rdx = args[2], r->r10 = args[3], r->r8 = args[4],
    r->r9 = args[5];
    r->rip = insn;
}

/* Run one system call in a ptrace-stopped tracee by single-stepping over `insn`.
 * orig_rax = -1 keeps the kernel from applying syscall-restart logic to our call.
 * The caller saves and restores the tracee's registers around a series of calls. */
int pr_inject_syscall(int pid, uint64_t insn, int64_t nr, const uint64_t *args, int64_t *ret)
{
    struct user_regs_struct r;
    int st;
    if (ptrace(PTRACE_GETREGS, pid, 0, &r))
        return ERR;
    set_call_regs(&r, insn, nr, args);
    if (ptrace(PTRACE_SETREGS, pid, 0, &r) || ptrace(PTRACE_SINGLESTEP, pid, 0, 0))
        return ERR;
    if (waitpid(pid, &st, __WALL) < 0)
        return ERR;
    if (!WIFSTOPPED(st) || WSTOPSIG(st) != SIGTRAP)
        return -ECHILD;
    if (ptrace(PTRACE_GETREGS, pid, 0, &r))
        return ERR;
    *ret = (int64_t)r.rax;
    return 0;
}

/* The same without a trap: the call runs between its syscall-entry and syscall-exit stops
 * (PTRACE_SYSCALL), where pr_inject_syscall single-steps. Why: a trap (int3, a single step)
 * in a task that blocks or ignores SIGTRAP makes the kernel reset SIGTRAP's action to the
 * default (force_sig_info_to_task), so calls that must leave a restored SIGTRAP action as
 * set (the husk's last ones) cannot end in one. A syscall stop is a ptrace notification, not
 * a signal. The task is left in its syscall-exit stop. */
int pr_inject_syscall_quiet(int pid, uint64_t insn, int64_t nr, const uint64_t *args,
                            int64_t *ret)
{
    struct user_regs_struct r;
    int st;
    if (ptrace(PTRACE_GETREGS, pid, 0, &r))
        return ERR;
    set_call_regs(&r, insn, nr, args);
    if (ptrace(PTRACE_SETREGS, pid, 0, &r))
        return ERR;
    for (int stop = 0; stop < 2; stop++) {          /* entry, then exit */
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0))
            return ERR;
        if (waitpid(pid, &st, __WALL) < 0)
            return ERR;
        if (!WIFSTOPPED(st) || (WSTOPSIG(st) & 0x7f) != SIGTRAP || st >> 16)
            return -ECHILD;
    }
    if (ptrace(PTRACE_GETREGS, pid, 0, &r))
        return ERR;
    *ret = (int64_t)r.rax;
    return 0;
}

/* The batch runner: position-independent code copied into a scratch page of the tracee.
 * It walks a table of struct pr_call (rbx = table, left as it is; r15 walks it; r12 = count),
 * runs each system call, stores the result, and stops at the end or at the first error:
 *   r13 == 0 (husks): with int3;
 *   r13 != 0 (a source process): by sending itself SIGSTOP, then again and again.
 * Why a source never meets int3: if our tracer dies while the task sits in (or is on its way
 * to) a SIGTRAP stop, the kernel delivers the SIGTRAP and the task dies with it (issue: kill -9
 * of migrate killed the source). A SIGSTOP delivered without a tracer only stops it, durably:
 * the task never runs a user instruction of ours again, and whoever finds it restores the
 * registers saved in the struct pr_saved that rbp points at (`prerestore recover`).
 * One ptrace round trip runs the whole batch, instead of one (16-80 us) per call. */
__asm__(".pushsection .rodata\n"
        ".globl pr_runner_start\n"
        "pr_runner_start:\n"
        "   mov %rbx, %r15\n"
        "1: test %r12, %r12\n"
        "   jz 2f\n"
        "   mov 0(%r15), %rax\n"
        "   mov 8(%r15), %rdi\n"
        "   mov 16(%r15), %rsi\n"
        "   mov 24(%r15), %rdx\n"
        "   mov 32(%r15), %r10\n"
        "   mov 40(%r15), %r8\n"
        "   mov 48(%r15), %r9\n"
        "   syscall\n"
        "   mov %rax, 56(%r15)\n"
        "   cmp $-4095, %rax\n"
        "   jae 2f\n"
        "   add $64, %r15\n"
        "   dec %r12\n"
        "   jmp 1b\n"
        "2: test %r13, %r13\n"
        "   jz 4f\n"
        "3: mov $39, %eax\n"           /* getpid, gettid: our own ids in our namespace */
        "   syscall\n"
        "   mov %rax, %r14\n"
        "   mov $186, %eax\n"
        "   syscall\n"
        "   mov %rax, %rsi\n"
        "   mov %r14, %rdi\n"
        "   mov $19, %edx\n"
        "   mov $234, %eax\n"          /* tgkill(pid, tid, SIGSTOP) */
        "   syscall\n"
        ".globl pr_runner_parked\n"
        "pr_runner_parked:\n"
        "   jmp 3b\n"
        "4: int3\n"
        ".globl pr_runner_end\n"
        "pr_runner_end:\n"
        ".popsection\n");
extern const char pr_runner_start[], pr_runner_parked[], pr_runner_end[];

/* The thread starter, copied into the scratch area next to the runner: clone3 (its arguments
 * set by the caller), then the parent traps, and the new thread parks in pause() (all signals
 * are blocked in a husk) until its registers are replaced at resume. It never touches a stack. */
__asm__(".pushsection .rodata\n"
        ".globl pr_starter_start\n"
        "pr_starter_start:\n"
        "   syscall\n"
        "   test %rax, %rax\n"
        "   jz 1f\n"
        "   int3\n"
        "1: mov $34, %eax\n"
        "   syscall\n"
        "   jmp 1b\n"
        ".globl pr_starter_end\n"
        "pr_starter_end:\n"
        ".popsection\n");
extern const char pr_starter_start[], pr_starter_end[];

size_t pr_thread_starter(const void **code)
{
    *code = pr_starter_start;
    return pr_starter_end - pr_starter_start;
}

/* Create a thread (or, without CLONE_VM in the clone_args, a child process) in the stopped
 * tracee `pid` with the starter copied at `starter` and a struct clone_args at `args` (in the
 * tracee). The tracee must be traced with PTRACE_O_TRACECLONE (and PTRACE_O_TRACEFORK for a
 * process): the new task is then ours from its first instruction. Returns its
 * tid in our namespace in *child, stopped. Registers are the caller's to save and restore. */
int pr_clone_thread(int pid, uint64_t starter, uint64_t args, uint64_t args_size, int *child)
{
    struct user_regs_struct regs;
    int st;
    unsigned long msg = 0;
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs))
        return ERR;
    regs.rip = starter;
    regs.rax = SYS_clone3;
    regs.rdi = args;
    regs.rsi = args_size;
    regs.orig_rax = -1;
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs) || ptrace(PTRACE_CONT, pid, 0, 0))
        return ERR;
    *child = -1;
    for (;;) {
        if (waitpid(pid, &st, __WALL) < 0)
            return ERR;
        if (!WIFSTOPPED(st))
            return -ESRCH;
        if (st >> 8 == (SIGTRAP | (PTRACE_EVENT_CLONE << 8)) ||
            st >> 8 == (SIGTRAP | (PTRACE_EVENT_FORK << 8))) {
            if (ptrace(PTRACE_GETEVENTMSG, pid, 0, &msg))
                return ERR;
            *child = (int)msg;
            if (ptrace(PTRACE_CONT, pid, 0, 0))
                return ERR;
            continue;
        }
        if (WSTOPSIG(st) == SIGTRAP)
            break;
        return -ECHILD;
    }
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs))
        return ERR;
    if ((long)regs.rax < 0)
        return (int)regs.rax;
    if (*child < 0)
        return -ECHILD;
    /* the new thread reports its first stop (PTRACE_EVENT_STOP) to us */
    if (waitpid(*child, &st, __WALL) < 0)
        return ERR;
    return WIFSTOPPED(st) ? 0 : -ESRCH;
}

int pr_set_options(int pid, uint64_t options)
{
    return ptrace(PTRACE_SETOPTIONS, pid, 0, (void *)options) ? ERR : 0;
}

size_t pr_batch_runner(const void **code)
{
    *code = pr_runner_start;
    return pr_runner_end - pr_runner_start;
}

/* Start `n` calls in the tracee with the runner already copied to `runner`, and return at
 * once: the tracee runs them while we do other work; pr_finish_batch waits for the end.
 * `data` (call arguments that are buffers) is written to `data_addr` and the table to `table`
 * in the same process_vm_writev.
 *
 * park (a source process, see the runner): the task sits in a SIGSTOP delivery stop (parked)
 * and ends in one again, at the runner's parking loop: *held*. Its own registers and signal
 * mask (`saved`, as the caller knows them from before it first touched the task) are written at
 * saved_addr and rbp points there; then the registers are pointed at the runner, then every
 * signal is blocked (so that only our SIGSTOP stops it): in that order, a task left by a dead
 * tracer at any step either has its own registers and mask, or stops itself inside the runner
 * with them saved where rbp says. Giving them back (the mask first) is the caller's. */
int pr_start_batch(int pid, uint64_t runner, uint64_t table, struct pr_call *calls, long n,
                   const void *data, size_t data_len, uint64_t data_addr, int park,
                   uint64_t saved_addr, const struct pr_saved *saved)
{
    struct iovec l[3], r[3];
    int k = 0;
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs))
        return ERR;
    if (park) {
        l[k] = (struct iovec){(void *)saved, sizeof *saved};
        r[k++] = (struct iovec){(void *)saved_addr, sizeof *saved};
    }
    for (long i = 0; i < n; i++)
        calls[i].ret = -ENOEXEC;
    l[k] = (struct iovec){calls, n * sizeof *calls};
    r[k++] = (struct iovec){(void *)table, n * sizeof *calls};
    if (data_len) {
        l[k] = (struct iovec){(void *)data, data_len};
        r[k++] = (struct iovec){(void *)data_addr, data_len};
    }
    ssize_t want = n * sizeof *calls + data_len + (park ? sizeof *saved : 0);
    if (process_vm_writev(pid, l, k, r, k, 0) != want)
        return errno ? ERR : -EIO;
    regs.rip = runner;
    regs.rbx = table;
    regs.r12 = n;
    regs.r13 = park;
    if (park)
        regs.rbp = saved_addr;
    regs.orig_rax = -1;
    uint64_t all = ~0ULL;
    if (ptrace(PTRACE_SETREGS, pid, 0, &regs))
        return ERR;
    if (park && ptrace(PTRACE_SETSIGMASK, pid, (void *)8, &all))
        return ERR;
    if (ptrace(PTRACE_CONT, pid, 0, 0))   /* parked: 0 suppresses the SIGSTOP it stops in */
        return ERR;
    return 0;
}

/* Wait for a batch started by pr_start_batch. Results come back in calls[i].ret; *done is the
 * number of calls run (the last one failed if its ret is an error). A SIGSTOP that someone
 * else sent while a parked batch ran is taken (it cannot be told from ours otherwise) and
 * counted in *foreign_stops: the caller owes the task that stop. */
int pr_finish_batch(int pid, uint64_t runner, uint64_t table, struct pr_call *calls, long n,
                    int park, long *done, long *foreign_stops)
{
    int st;
    struct user_regs_struct regs;
    uint64_t parked = runner + (pr_runner_parked - pr_runner_start);
    for (;;) {
        if (waitpid(pid, &st, __WALL) < 0)
            return ERR;
        if (!WIFSTOPPED(st))
            return -ESRCH;
        if (ptrace(PTRACE_GETREGS, pid, 0, &regs))
            return ERR;
        if (!park) {
            if (WSTOPSIG(st) != SIGTRAP)
                return -ECHILD;
            break;
        }
        if (st >> 16 == 0 && WSTOPSIG(st) == SIGSTOP && regs.rip == parked)
            break;
        if (st >> 16 == 0 && WSTOPSIG(st) == SIGSTOP)
            (*foreign_stops)++;
        else if (st >> 16 == 0)
            return -ECHILD;             /* every other signal is blocked: not ours to judge */
        if (ptrace(PTRACE_CONT, pid, 0, 0))
            return ERR;
    }
    struct iovec l = {calls, n * sizeof *calls}, r = {(void *)table, n * sizeof *calls};
    if (process_vm_readv(pid, &l, 1, &r, 1, 0) != (ssize_t)(n * sizeof *calls))
        return errno ? ERR : -EIO;
    *done = n - (long)regs.r12 + (regs.r12 ? 1 : 0);
    return 0;
}

/* Both at once: one ptrace round trip for the whole batch. */
int pr_run_batch(int pid, uint64_t runner, uint64_t table, struct pr_call *calls, long n,
                 const void *data, size_t data_len, uint64_t data_addr, int park,
                 uint64_t saved_addr, const struct pr_saved *saved, long *done,
                 long *foreign_stops)
{
    int r = pr_start_batch(pid, runner, table, calls, n, data, data_len, data_addr, park,
                           saved_addr, saved);
    return r < 0 ? r : pr_finish_batch(pid, runner, table, calls, n, park, done, foreign_stops);
}

/* Park a task we SEIZEd: SIGSTOP it (thread-directed) and wait until it sits in that SIGSTOP's
 * delivery stop. Why not PTRACE_INTERRUPT: a task in an INTERRUPT stop runs on when its tracer
 * dies; a task in a SIGSTOP delivery stop then takes the SIGSTOP and stays stopped, whatever we
 * were doing to it (see the runner). Other signals met on the way are delivered as if we were
 * not there; a task already stopped (group stop) is let through to our SIGSTOP. */
int pr_park(int pid, int tgid)
{
    if (syscall(SYS_tgkill, tgid, pid, SIGSTOP))
        return ERR;
    return 0;
}

int pr_wait_parked(int pid)
{
    for (;;) {
        int st;
        if (waitpid(pid, &st, __WALL) < 0)
            return ERR;
        if (!WIFSTOPPED(st))
            return -ESRCH;
        int sig = WSTOPSIG(st), event = st >> 16;
        if (event == 0 && sig == SIGSTOP)
            return 0;
        /* a group stop (it was stopped already) or another signal on its way: go on to ours */
        if (ptrace(PTRACE_CONT, pid, 0, (void *)(long)(event ? 0 : sig)))
            return ERR;
    }
}

long pr_runner_parked_offset(void)
{
    return pr_runner_parked - pr_runner_start;
}

/* ---- memory -------------------------------------------------------------------------------- */

long pr_read_mem(int pid, uint64_t addr, void *buf, size_t len)
{
    struct iovec l = {buf, len}, r = {(void *)addr, len};
    ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
    return n < 0 ? ERR : n;
}

long pr_write_mem(int pid, uint64_t addr, const void *buf, size_t len)
{
    struct iovec l = {(void *)buf, len}, r = {(void *)addr, len};
    ssize_t n = process_vm_writev(pid, &l, 1, &r, 1, 0);
    return n < 0 ? ERR : n;
}

static int write_all(int fd, const char *p, size_t len)
{
    while (len) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return ERR;
        }
        p += w, len -= w;
    }
    return 0;
}

/* Move k iovecs between us and the tracee with process_vm_readv/writev; where the kernel stops
 * short (a page the tracee may not read or write: RELRO, text, PROT_NONE), finish that iovec
 * through /proc/PID/mem, which uses FOLL_FORCE, and go on with the next ones. *forced (if not
 * NULL) counts the bytes that needed /proc/PID/mem. */
static long vm_transfer(int pid, int mem_fd, struct iovec *l, struct iovec *r, int k, int write,
                        uint64_t *forced)
{
    int m = 0;
    while (m < k) {
        ssize_t done = write ? process_vm_writev(pid, l + m, k - m, r + m, k - m, 0)
                             : process_vm_readv(pid, l + m, k - m, r + m, k - m, 0);
        if (done < 0) {
            if (errno != EFAULT && errno != EPERM)
                return ERR;
            done = 0;
        }
        while (m < k && (size_t)done >= l[m].iov_len)   /* skip the iovecs fully moved */
            done -= l[m++].iov_len;
        if (m == k)
            break;
        size_t len = l[m].iov_len - done;                /* the one it stopped in */
        char *lp = (char *)l[m].iov_base + done;
        off_t rp = (off_t)((uint64_t)r[m].iov_base + done);
        ssize_t x = write ? pwrite(mem_fd, lp, len, rp) : pread(mem_fd, lp, len, rp);
        if (x != (ssize_t)len)
            return x < 0 ? ERR : -EIO;
        if (forced)
            *forced += len;
        m++;
    }
    return 0;
}

/* The copy buffers (two, for pipelined copies), kept with their pages faulted in across
 * calls: faulting 8 MiB of fresh pages each round would cost more than a small final round. */
static char *copy_buffer(int which)
{
    static char *bufs[2];
    if (!bufs[which]) {
        char *b = mmap(NULL, COPY_CHUNK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        bufs[which] = b == MAP_FAILED ? NULL : b;
    }
    return bufs[which];
}

struct copy_chunk {
    struct iovec l[IOV_BATCH], r[IOV_BATCH];
    int k;
    size_t fill;
    int full;
};

/* Fill `c` with the next chunk of ranges (from ranges[*i] at *off), read from the tracee into
 * buf. A running tracee may have unmapped part of a range since it was listed: the pages it no
 * longer has are zero-filled (counted in *skipped), page by page, so that every page it still
 * has is carried. (They are unmapped on the destination by the next round's layout.)
 * Dropping the whole iovec instead lost the readable pages next to an unmapped one. */
static void read_chunk(int pid, int mem_fd, const struct pr_range *ranges, long n, long *i,
                       uint64_t *off, char *buf, struct copy_chunk *c, uint64_t *skipped)
{
    c->k = 0;
    c->fill = 0;
    while (*i < n && c->k < IOV_BATCH && c->fill < COPY_CHUNK) {
        uint64_t len = ranges[*i].end - ranges[*i].start - *off;
        if (len > COPY_CHUNK - c->fill)
            len = COPY_CHUNK - c->fill;
        c->l[c->k] = (struct iovec){buf + c->fill, len};
        c->r[c->k++] = (struct iovec){(void *)(ranges[*i].start + *off), len};
        c->fill += len;
        *off += len;
        if (*off == ranges[*i].end - ranges[*i].start)
            (*i)++, *off = 0;
    }
    if (vm_transfer(pid, mem_fd, c->l, c->r, c->k, 0, NULL) >= 0)
        return;
    for (int m = 0; m < c->k; m++) {
        if (vm_transfer(pid, mem_fd, c->l + m, c->r + m, 1, 0, NULL) >= 0)
            continue;
        for (size_t o = 0; o < c->l[m].iov_len; o += PAGE) {
            struct iovec pl = {(char *)c->l[m].iov_base + o, PAGE},
                         pr = {(char *)c->r[m].iov_base + o, PAGE};
            if (vm_transfer(pid, mem_fd, &pl, &pr, 1, 0, NULL) < 0) {
                memset(pl.iov_base, 0, PAGE);
                *skipped += PAGE;
            }
        }
    }
}

/* Read ranges of the tracee's memory and append them, in order, to out_fd.
 * process_vm_readv does the bulk; a range it cannot read (a PROT_NONE or otherwise unreadable
 * page) is read through /proc/PID/mem, which uses FOLL_FORCE; a range a running tracee
 * unmapped meanwhile is written as zeros (the next round's layout drops it). */
/* Read the next chunk (at most PR_CHUNK bytes) of the packed ranges into `out`, resuming at
 * range *i, offset *off (both advanced). For senders that frame what they read: one call per
 * chunk, never per page. Returns the bytes read (0 when done); pages the running source
 * unmapped meanwhile read as zeros. */
long pr_read_pages(int pid, int mem_fd, const struct pr_range *ranges, long n, long *i,
                   uint64_t *off, char *out)
{
    static struct copy_chunk c;
    uint64_t skipped = 0;
    if (*i >= n)
        return 0;
    read_chunk(pid, mem_fd, ranges, n, i, off, out, &c, &skipped);
    return (long)c.fill;
}

long pr_dump_pages(int pid, int mem_fd, const struct pr_range *ranges, long n, int out_fd,
                   uint64_t *bytes)
{
    static struct copy_chunk c;
    char *buf = copy_buffer(0);
    uint64_t off = 0, skipped = 0;
    long i = 0, ret;
    if (!buf)
        return -ENOMEM;
    *bytes = 0;
    while (i < n) {
        read_chunk(pid, mem_fd, ranges, n, &i, &off, buf, &c, &skipped);
        if ((ret = write_all(out_fd, buf, c.fill)) < 0)
            return ret;
        *bytes += c.fill;
    }
    return 0;
}

/* Write ranges into the tracee, taking their contents in order from in_fd at in_offset.
 * Writable pages go through process_vm_writev; pages the tracee cannot write (RELRO, text)
 * make process_vm_writev stop short with EFAULT, and are written through /proc/PID/mem
 * (FOLL_FORCE), counted in *forced. */
long pr_load_pages(int pid, int mem_fd, int in_fd, uint64_t in_offset,
                   const struct pr_range *ranges, long n, uint64_t *bytes, uint64_t *forced)
{
    uint64_t total = 0;
    for (long i = 0; i < n; i++)
        total += ranges[i].end - ranges[i].start;
    *bytes = 0, *forced = 0;
    if (!total)
        return 0;
    uint64_t map_off = in_offset & ~(PAGE - 1), skew = in_offset - map_off;
    char *src = mmap(NULL, total + skew, PROT_READ, MAP_SHARED | MAP_POPULATE, in_fd, map_off);
    if (src == MAP_FAILED)
        return ERR;
    char *p = src + skew;
    long ret = 0, i = 0;
    while (i < n) {
        struct iovec l[IOV_BATCH], r[IOV_BATCH];
        int k = 0;
        char *q = p;
        for (long j = i; j < n && k < IOV_BATCH; j++, k++) {
            size_t len = ranges[j].end - ranges[j].start;
            l[k] = (struct iovec){q, len};
            r[k] = (struct iovec){(void *)ranges[j].start, len};
            q += len;
        }
        if ((ret = vm_transfer(pid, mem_fd, l, r, k, 1, forced)) < 0)
            goto out;
        size_t pos = 0;
        for (int m = 0; m < k; m++)
            pos += l[m].iov_len;
        *bytes += pos;
        p = q;
        i += k;
    }
out:
    munmap(src, total + skew);
    return ret;
}

/* ---- PAGEMAP_SCAN / userfaultfd -------------------------------------------------------------- */

/* One PAGEMAP_SCAN walk of [start, end) into out (cap regions). Returns regions written;
 * *walk_end tells where the kernel stopped (end when the walk is complete). */
long pr_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                     uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t return_mask,
                     struct pr_page_region *out, long cap, uint64_t *walk_end)
{
    struct pr_pm_scan_arg a = {.size = sizeof a, .flags = flags, .start = start, .end = end,
                               .vec = (uint64_t)(uintptr_t)out, .vec_len = (uint64_t)cap,
                               .category_inverted = inverted, .category_mask = mask,
                               .category_anyof_mask = anyof, .return_mask = return_mask};
    long r = ioctl(pagemap_fd, PR_PAGEMAP_SCAN, &a);
    if (r < 0)
        return ERR;
    *walk_end = a.walk_end;
    return r;
}

/* Scan several areas (sorted, one per VMA) into one output vector, resuming at area *area and
 * address *addr (0: the area's start) and updating both to where it stopped: *area == n_areas
 * once everything is walked. Stopping when `out` is full loses nothing, which matters with
 * PM_SCAN_WP_MATCHING: a walk that re-protected pages must never be redone. Returns the number
 * of regions written, or -errno (the failing area is then *area). */
long pr_scan_ranges(int pagemap_fd, const struct pr_range *areas, long n_areas, uint64_t flags,
                    uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t return_mask,
                    struct pr_page_region *out, long cap, long *area, uint64_t *addr)
{
    long got = 0;
    for (long i = *area; i < n_areas; i++) {
        uint64_t s = *addr > areas[i].start ? *addr : areas[i].start, walk_end = 0;
        long first = got;
        *area = i;
        while (s < areas[i].end) {
            if (got == cap) {
                *addr = s;
                return got;
            }
            long r = pr_pagemap_scan(pagemap_fd, s, areas[i].end, flags, inverted, mask, anyof,
                                     return_mask, out + got, cap - got, &walk_end);
            if (r < 0) {
                *addr = s;
                return r;
            }
            /* the kernel merges adjacent regions within one call, we merge the calls of one
             * area; never across areas: an area is one VMA, and a range that spans two VMAs of
             * different protection would make the whole copy take the slow /proc/PID/mem path */
            if (r && got > first && out[got - 1].end == out[got].start &&
                out[got - 1].categories == out[got].categories) {
                out[got - 1].end = out[got].end;
                memmove(out + got, out + got + 1, (r - 1) * sizeof *out);
                r--;
            }
            got += r;
            if (walk_end <= s)
                break;
            s = walk_end;
        }
        *addr = 0;
    }
    *area = n_areas;
    return got;
}

int pr_uffd_api(int uffd, uint64_t features, uint64_t *got)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(uffd, UFFDIO_API, &api))
        return ERR;
    *got = api.features;
    return 0;
}

/* Register [start, start+len) for write-protect tracking and write-protect it now. */
int pr_uffd_wp_range(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_register reg = {.range = {start, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        return ERR;
    struct uffdio_writeprotect wp = {.range = {start, len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) ? ERR : 0;
}

/* ---- processes ----------------------------------------------------------------------------- */

/* Split regions (start, end, categories) into packed ranges, merging neighbours: those whose
 * categories & mask == value into `yes`, the others into `no` (either may be NULL: dropped).
 * Both outputs need room for n ranges. Keeps per-range work out of Python. */
/* The index of the first of n packed ranges that is not page-aligned with start < end, or -1:
 * an image's ranges are checked before use, and a final image's can be many. */
long pr_check_ranges(const struct pr_range *r, long n)
{
    for (long i = 0; i < n; i++)
        if (r[i].start >= r[i].end || (r[i].start | r[i].end) & (PAGE - 1))
            return i;
    return -1;
}

void pr_split_regions(const struct pr_page_region *in, long n, uint64_t mask, uint64_t value,
                      struct pr_range *yes, long *n_yes, struct pr_range *no, long *n_no)
{
    *n_yes = *n_no = 0;
    for (long i = 0; i < n; i++) {
        int match = (in[i].categories & mask) == value;
        struct pr_range *out = match ? yes : no;
        long *k = match ? n_yes : n_no;
        if (!out)
            continue;
        if (*k && out[*k - 1].end == in[i].start)
            out[*k - 1].end = in[i].end;
        else
            out[(*k)++] = (struct pr_range){in[i].start, in[i].end};
    }
}

/* The bytes queued in a pipe, without taking them: tee(2) them into a pipe of our own and read
 * that. pipe_fd: a read end of it (O_NONBLOCK). Returns the number of bytes (at most cap), or
 * -errno. */
long pr_pipe_peek(int pipe_fd, char *buf, long cap)
{
    int tmp[2];
    if (pipe2(tmp, O_CLOEXEC | O_NONBLOCK))
        return ERR;
    long size = fcntl(pipe_fd, F_GETPIPE_SZ);
    if (size > 0 && fcntl(tmp[1], F_SETPIPE_SZ, size) < 0 && errno != EPERM) {
        long e = ERR;
        close(tmp[0]), close(tmp[1]);
        return e;
    }
    long got = tee(pipe_fd, tmp[1], (size_t)cap, SPLICE_F_NONBLOCK);
    long r = 0;
    if (got < 0)
        r = errno == EAGAIN ? 0 : ERR;      /* EAGAIN: empty */
    else {
        while (r < got) {
            ssize_t n = read(tmp[0], buf + r, (size_t)(got - r));
            if (n <= 0)
                break;
            r += n;
        }
    }
    close(tmp[0]), close(tmp[1]);
    return r;
}

/* Kernel objects remade by the restorer for an image, then handed to the husks. */
int pr_make_signalfd(uint64_t mask, int flags)
{
    long r = syscall(SYS_signalfd4, -1, &mask, 8, flags);
    return r < 0 ? ERR : (int)r;
}

int pr_make_timerfd(int clockid, int flags, int64_t value_s, int64_t value_ns,
                    int64_t interval_s, int64_t interval_ns, uint64_t ticks)
{
    int fd = (int)syscall(SYS_timerfd_create, clockid, flags);
    if (fd < 0)
        return ERR;
    struct {
        int64_t is, ins, vs, vns;
    } t = {interval_s, interval_ns, value_s, value_ns};
    if (syscall(SYS_timerfd_settime, fd, 0, &t, NULL) ||
        (ticks && ioctl(fd, 0x40085400 /* TFD_IOC_SET_TICKS */, &ticks))) {
        int e = ERR;
        close(fd);
        return e;
    }
    return fd;
}

int pr_make_epoll(int flags)
{
    long r = syscall(SYS_epoll_create1, flags);
    return r < 0 ? ERR : (int)r;
}

/* An inotify instance whose watches have exactly the given wds (ascending): inotify_add_watch
 * hands out increasing wds (idr_alloc_cyclic, starting at 1), so each number the source had no
 * watch for is taken by a watch on `spare` (a directory no real watch uses) removed at once.
 * The IN_IGNORED events those removals queue are read away with everything else queued, so the
 * instance starts empty. flags: IN_NONBLOCK, IN_CLOEXEC. On failure *failed is the index of the
 * watch that could not be added (-1: not a watch) or that got another wd (-EEXIST). */
int pr_make_inotify(int flags, const char *spare, const int *wds, const uint32_t *masks,
                    const char *const *paths, long n, long *failed)
{
    *failed = -1;
    int fd = inotify_init1(flags | IN_NONBLOCK);
    if (fd < 0)
        return ERR;
    int next = 1, e = 0;
    for (long i = 0; i < n && !e; i++) {
        while (next < wds[i] && !e) {
            int dummy = inotify_add_watch(fd, spare, IN_ATTRIB | IN_DONT_FOLLOW);
            if (dummy < 0 || inotify_rm_watch(fd, dummy) < 0)
                e = ERR;
            else
                next = dummy + 1;
        }
        if (e)
            break;
        int wd = inotify_add_watch(fd, paths[i], masks[i]);
        if (wd < 0)
            e = ERR;
        else if (wd != wds[i])
            e = -EEXIST;
        else
            next = wd + 1;
        if (e)
            *failed = i;
    }
    char buf[4096];
    while (!e && read(fd, buf, sizeof buf) > 0)
        ;
    if (!e && !(flags & IN_NONBLOCK) && fcntl(fd, F_SETFL, 0) < 0)
        e = ERR;
    if (e) {
        close(fd);
        return e;
    }
    return fd;
}

/* open_by_handle_at: a file handle (from fdinfo) back to an open file, through a directory
 * of a mount of its filesystem. Needs CAP_DAC_READ_SEARCH. */
int pr_open_by_handle(int mount_fd, int type, const void *handle, unsigned len, int flags)
{
    struct file_handle *fh = malloc(sizeof *fh + len);
    if (!fh)
        return -ENOMEM;
    fh->handle_bytes = len;
    fh->handle_type = type;
    memcpy(fh->f_handle, handle, len);
    int fd = open_by_handle_at(mount_fd, fh, flags);
    int r = fd < 0 ? ERR : fd;
    free(fh);
    return r;
}

/* Do fd1 of pid1 and fd2 of pid2 refer to the same open file description? 1 yes, 0 no. */
int pr_same_file(int pid1, int fd1, int pid2, int fd2)
{
    long r = syscall(SYS_kcmp, pid1, pid2, 0 /* KCMP_FILE */, fd1, fd2);
    return r < 0 ? ERR : r == 0;
}

/* kcmp of a resource two processes (or threads) may share as a whole, no index needed
 * (KCMP_FILES 2: the fd table, KCMP_FS 3: root, working directory and umask): 0 the same,
 * 1 or 2 ordered before or after, 3 different and unordered. */
int pr_kcmp(int pid1, int pid2, int type)
{
    long r = syscall(SYS_kcmp, pid1, pid2, type, 0, 0);
    return r < 0 ? ERR : (int)r;
}

/* Is the file at pid1's fd1 the one registered under target fd number tfd in the epoll at
 * pid2's efd? (kcmp KCMP_EPOLL_TFD, Linux 4.13; the kernel's struct kcmp_epoll_slot) */
int pr_is_epoll_target(int pid1, int fd1, int pid2, int efd, int tfd)
{
    struct { uint32_t efd, tfd, toff; } slot = {(uint32_t)efd, (uint32_t)tfd, 0};
    long r = syscall(SYS_kcmp, pid1, pid2, 7 /* KCMP_EPOLL_TFD */, fd1, &slot);
    if (r < 0 && (errno == EBADF || errno == ENOENT))
        return 0;                /* pid1 has no fd1, or nothing is registered under tfd */
    return r < 0 ? ERR : r == 0;
}

int pr_pidfd_open(int pid)
{
    long r = syscall(SYS_pidfd_open, pid, 0);
    return r < 0 ? ERR : (int)r;
}

int pr_pidfd_getfd(int pidfd, int fd)
{
    long r = syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    return r < 0 ? ERR : (int)r;
}

/* Move the calling thread into the namespace fd refers to (a network namespace is per thread:
 * the other threads stay where they are). */
int pr_setns(int fd, int nstype)
{
    long r = syscall(SYS_setns, fd, nstype);
    return r < 0 ? ERR : 0;
}

/* clone3 + execve, with chosen pids (set_tid, innermost namespace first) and optionally a new
 * pid namespace. keep_fd (if >= 0) becomes fd 3 of the child; the child's environment is empty.
 * The child leads a new session (and process group), without a controlling terminal: what it
 * becomes (a restored tree, or its namespace's init) must outlive the tool that spawned it, so
 * a signal to that tool's group or session (Ctrl-C, a terminal hangup, a service manager
 * stopping it) must not reach it.
 * cgroup_fd (if >= 0): the child is born in that cgroup v2 (CLONE_INTO_CGROUP), and so is
 * every process forked from it: no cgroup move later (one costs milliseconds).
 * Between clone3 and execve the child makes raw system calls only (it is a copy of a possibly
 * multi-threaded Python process). Returns the child's pid in our namespace. */
int pr_spawn(const char *path, char *const *argv, const int *set_tid, long set_tid_size,
             int new_pidns, int keep_fd, int cgroup_fd)
{
    struct clone_args args;
    pid_t tids[32];
    if (set_tid_size > 32)
        return -EINVAL;
    for (long i = 0; i < set_tid_size; i++)
        tids[i] = set_tid[i];
    memset(&args, 0, sizeof args);
    /* a new pid namespace comes with a new mount namespace (a copy of ours), where the tree
     * gets a /proc of its own pid namespace at the final step (husk.py: mount_proc) */
    args.flags = (new_pidns ? CLONE_NEWPID | CLONE_NEWNS : 0) |
                 (cgroup_fd >= 0 ? PR_CLONE_INTO_CGROUP : 0);
    args.cgroup = cgroup_fd >= 0 ? (uint64_t)cgroup_fd : 0;
    args.exit_signal = SIGCHLD;
    args.set_tid = set_tid_size ? (uint64_t)(uintptr_t)tids : 0;
    args.set_tid_size = set_tid_size;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0)
        return ERR;
    if (pid == 0) {
        static char *const envp[] = {NULL};
        if (keep_fd >= 0 && keep_fd != 3)
            syscall(SYS_dup2, keep_fd, 3);
        syscall(SYS_setsid);
        /* its /proc (a copy of ours) a slave: the proc of the new pid namespace mounted on
         * it at the final step (husk.py mount_proc_calls) must not propagate to ours */
        if (new_pidns && syscall(SYS_mount, NULL, "/proc", NULL, MS_REC | MS_SLAVE, NULL))
            syscall(SYS_exit_group, 126);
        syscall(SYS_execve, path, argv, envp);
        syscall(SYS_exit_group, 127);
    }
    return (int)pid;
}

/* struct sched_attr (uapi/linux/sched/types.h, SCHED_ATTR_SIZE_VER1): read and set from
 * outside, per thread (a tid), with no code run in the task. */
struct pr_sched_attr {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
    uint32_t util_min, util_max;
};

int pr_sched_get(int tid, struct pr_sched *out)
{
    struct pr_sched_attr a;
    memset(&a, 0, sizeof a);
    if (syscall(SYS_sched_getattr, tid, &a, sizeof a, 0))
        return ERR;
    out->policy = a.policy, out->flags = a.flags, out->nice = a.nice;
    out->priority = a.priority, out->runtime = a.runtime, out->deadline = a.deadline;
    out->period = a.period;
    return 0;
}

int pr_sched_set(int tid, const struct pr_sched *in)
{
    struct pr_sched_attr a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.policy = in->policy, a.flags = in->flags, a.nice = in->nice, a.priority = in->priority;
    a.runtime = in->runtime, a.deadline = in->deadline, a.period = in->period;
    return syscall(SYS_sched_setattr, tid, &a, 0) ? ERR : 0;
}

int pr_prlimit(int pid, int resource, const uint64_t *new_lim, uint64_t *old_lim)
{
    return syscall(SYS_prlimit64, pid, resource, new_lim, old_lim) ? ERR : 0;
}

/* Copy ranges from one process straight into another (same addresses), through bounce
 * buffers: for a destination on the same host, pages never go through a file.
 *
 * Large copies (round 0) are pipelined over two buffers: this thread reads chunk k+1 from the
 * source while a second thread writes chunk k into the destination, whose first-touch page
 * faults make writing the slow half. Small copies (the final round) stay on this thread. */
struct copy_pipe {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct copy_chunk chunk[2];
    int dst_pid, dst_mem_fd, done;
    long err;
    uint64_t forced;
};

static void *copy_writer(void *arg)
{
    struct copy_pipe *p = arg;
    for (int i = 0;; i ^= 1) {
        pthread_mutex_lock(&p->mu);
        while (!p->chunk[i].full && !p->done)
            pthread_cond_wait(&p->cv, &p->mu);
        if (!p->chunk[i].full) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        pthread_mutex_unlock(&p->mu);
        uint64_t forced = 0;
        long r = vm_transfer(p->dst_pid, p->dst_mem_fd, p->chunk[i].l, p->chunk[i].r,
                             p->chunk[i].k, 1, &forced);
        pthread_mutex_lock(&p->mu);
        p->forced += forced;
        if (r < 0 && !p->err)
            p->err = r;
        p->chunk[i].full = 0;
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
}

long pr_copy_pages(int src_pid, int src_mem_fd, int dst_pid, int dst_mem_fd,
                   const struct pr_range *ranges, long n, uint64_t *bytes, uint64_t *forced,
                   uint64_t *skipped)
{
    static struct copy_pipe p; /* large (iovec arrays): not on the stack */
    char *bufs[2] = {copy_buffer(0), NULL};
    uint64_t total = 0, off = 0;
    long i = 0;
    *bytes = 0, *forced = 0, *skipped = 0;
    if (!bufs[0])
        return -ENOMEM;
    for (long j = 0; j < n; j++)
        total += ranges[j].end - ranges[j].start;

    if (total <= 2 * COPY_CHUNK || !(bufs[1] = copy_buffer(1))) {
        while (i < n) {
            read_chunk(src_pid, src_mem_fd, ranges, n, &i, &off, bufs[0], &p.chunk[0], skipped);
            long r = vm_transfer(dst_pid, dst_mem_fd, p.chunk[0].l, p.chunk[0].r, p.chunk[0].k,
                                 1, forced);
            if (r < 0)
                return r;
            *bytes += p.chunk[0].fill;
        }
        return 0;
    }

    pthread_t writer;
    memset(&p, 0, sizeof p);
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.cv, NULL);
    p.dst_pid = dst_pid, p.dst_mem_fd = dst_mem_fd;
    if (pthread_create(&writer, NULL, copy_writer, &p))
        return -EAGAIN;
    for (int b = 0; i < n; b ^= 1) {
        pthread_mutex_lock(&p.mu);
        while (p.chunk[b].full && !p.err)
            pthread_cond_wait(&p.cv, &p.mu);
        long err = p.err;
        pthread_mutex_unlock(&p.mu);
        if (err)
            break;
        read_chunk(src_pid, src_mem_fd, ranges, n, &i, &off, bufs[b], &p.chunk[b], skipped);
        *bytes += p.chunk[b].fill;
        pthread_mutex_lock(&p.mu);
        p.chunk[b].full = 1;
        pthread_cond_broadcast(&p.cv);
        pthread_mutex_unlock(&p.mu);
    }
    pthread_mutex_lock(&p.mu);
    p.done = 1;
    pthread_cond_broadcast(&p.cv);
    pthread_mutex_unlock(&p.mu);
    pthread_join(writer, NULL);
    pthread_mutex_destroy(&p.mu);
    pthread_cond_destroy(&p.cv);
    *forced = p.forced;
    return p.err;
}

/* Make the kernel send `sig` to us when our parent exits; fails with -ESRCH if it already has
 * (our parent is no longer `parent`). */
int pr_set_pdeathsig(int sig, int parent)
{
    if (prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0))
        return ERR;
    return getppid() == parent ? 0 : -ESRCH;
}

/* ---- the fallback without userfaultfd WP_ASYNC / PAGEMAP_SCAN (Linux < 6.7) ----------------- */

#define PM_PRESENT (1ULL << 63)
#define PM_FILE (1ULL << 61)
#define PM_SWAP (1ULL << 62)
#define PM_PFN ((1ULL << 55) - 1)
#define PM_BATCH 4096 /* pagemap entries per pread */

/* The next (at most PM_BATCH) pagemap entries from `base` up to `end`; returns how many. */
static long read_pagemap(int pagemap_fd, uint64_t base, uint64_t end, uint64_t *pm)
{
    uint64_t n = (end - base) / PAGE;
    if (n > PM_BATCH)
        n = PM_BATCH;
    ssize_t r = pread(pagemap_fd, pm, n * 8, (off_t)(base / PAGE * 8));
    if (r != (ssize_t)(n * 8))
        return r < 0 ? ERR : -EIO;
    return (long)n;
}

/* A 64-bit hash of one page: two multiply-xorshift lanes over its 512 words. Changes that
 * collide in both lanes are what this fallback can miss; it says so when it is in use. */
static uint64_t page_hash(const uint64_t *w)
{
    uint64_t a = 0x243F6A8885A308D3ULL, b = 0x13198A2E03707344ULL;
    for (int i = 0; i < 512; i += 2) {
        a = (a ^ w[i]) * 0x9E3779B97F4A7C15ULL;
        a ^= a >> 29;
        b = (b ^ w[i + 1]) * 0xC2B2AE3D27D4EB4FULL;
        b ^= b >> 31;
    }
    uint64_t h = a ^ (b * 0x165667B19E3779F9ULL);
    return h ? h : 1; /* 0 means "not present" */
}

/* Walk pages [start, end) with /proc/PID/pagemap. For each page compute 0 if it is not
 * present (or is a page-cache page of a file mapping: its content is the file's), else the
 * hash of its content; compare with hashes[i] (when `compare`), store the new value, and append
 * the pages that differ to `out` as regions (categories: PR_PAGE_IS_PRESENT if present now).
 * Returns the number of regions, or -ENOSPC if `out` is too small (hashes then are partly
 * updated: callers size `out` for the worst case, one region per two pages). */
long pr_hash_scan(int pid, int mem_fd, int pagemap_fd, uint64_t start, uint64_t end,
                  uint64_t *hashes, uint8_t *suspect, int mode, struct pr_page_region *out,
                  long cap)
{
    /* mode 0: hash only (new area); 1: a pre-copy round; 2: the final round (frozen).
     * A page copied while the process runs may be copied later than it was hashed, so the
     * copy can hold newer content than the hash describes; if the page later returns to the
     * hashed content, no hash would tell. Such pages are "suspect" from then on, and the final
     * round, with the process frozen, resends them all. */
    int compare = mode != 0;
    static uint64_t pm[PM_BATCH];
    char *buf = copy_buffer(0);
    if (!buf)
        return -ENOMEM;
    long got = 0;
    for (uint64_t base = start; base < end;) {
        long got_pm = read_pagemap(pagemap_fd, base, end, pm);
        if (got_pm < 0)
            return got_pm;
        uint64_t n = (uint64_t)got_pm;
        /* read the present private pages of this batch in runs */
        for (uint64_t i = 0; i < n;) {
            int present = (pm[i] & PM_PRESENT) && !(pm[i] & PM_FILE);
            uint64_t j = i + 1;
            while (j < n && j - i < COPY_CHUNK / PAGE &&
                   (((pm[j] & PM_PRESENT) && !(pm[j] & PM_FILE)) == present))
                j++;
            if (present) {
                struct iovec l = {buf, (j - i) * PAGE}, rv = {(void *)(base + i * PAGE), (j - i) * PAGE};
                if (vm_transfer(pid, mem_fd, &l, &rv, 1, 0, NULL) < 0)
                    memset(buf, 0, (j - i) * PAGE);   /* gone meanwhile: differs, is resent */
            }
            for (uint64_t k = i; k < j; k++) {
                uint64_t idx = (base - start) / PAGE + k;
                uint64_t h = present ? page_hash((uint64_t *)(buf + (k - i) * PAGE)) : 0;
                int report = compare && (h != hashes[idx] || (mode == 2 && suspect[idx]));
                if (mode != 2 && (h != hashes[idx] || mode == 0) && h)
                    suspect[idx] = 1;
                if (report) {
                    uint64_t a = base + k * PAGE, cat = present ? PR_PAGE_IS_PRESENT : 0;
                    if (got && out[got - 1].end == a && out[got - 1].categories == cat)
                        out[got - 1].end += PAGE;
                    else {
                        if (got == cap)
                            return -ENOSPC;
                        out[got++] = (struct pr_page_region){a, a + PAGE, cat};
                    }
                }
                hashes[idx] = h;
            }
            i = j;
        }
        base += n * PAGE;
    }
    return got;
}

/* A forked child's pages against its parent's, for the pages of [start, end) the child would
 * inherit by fork: a page the two map to the same physical page (copy-on-write shared, or the
 * same page-cache page) is inherited as it is; a page the child has on its own, or that only
 * the child has, is to copy (`copy`); a page the child does not have is to drop (`drop`).
 * PFNs in pagemap need CAP_SYS_ADMIN. Returns 0, or -ENOSPC if an output is too small. */
long pr_pagemap_vs_parent(int child_pm_fd, int parent_pm_fd, uint64_t start, uint64_t end,
                          struct pr_range *copy, long *n_copy, struct pr_range *drop,
                          long *n_drop, long cap)
{
    static uint64_t pm[PM_BATCH], ppm[PM_BATCH];
    for (uint64_t base = start; base < end;) {
        long got_pm = read_pagemap(child_pm_fd, base, end, pm);
        if (got_pm < 0)
            return got_pm;
        long got_ppm = read_pagemap(parent_pm_fd, base, base + (uint64_t)got_pm * PAGE, ppm);
        if (got_ppm < 0)
            return got_ppm;
        for (long k = 0; k < got_pm; k++) {
            uint64_t a = base + (uint64_t)k * PAGE;
            struct pr_range *out;
            long *n;
            /* a swap entry of type 31 is a pte marker (a uffd-wp protected empty pte): no data */
            int swapped = (pm[k] & PM_SWAP) && (pm[k] & 0x1f) != 0x1f;
            if (!(pm[k] & PM_PRESENT) && !swapped) {
                out = drop, n = n_drop;
            } else if ((pm[k] & PM_PRESENT) && (ppm[k] & PM_PRESENT) && (pm[k] & PM_PFN) &&
                       (pm[k] & PM_PFN) == (ppm[k] & PM_PFN)) {
                continue;
            } else {
                out = copy, n = n_copy;
            }
            if (*n && out[*n - 1].end == a)
                out[*n - 1].end += PAGE;
            else {
                if (*n == cap)
                    return -ENOSPC;
                out[(*n)++] = (struct pr_range){a, a + PAGE};
            }
        }
        base += (uint64_t)got_pm * PAGE;
    }
    return 0;
}

static void append_range(struct pr_range *out, long *n, uint64_t a, uint64_t b)
{
    if (*n && out[*n - 1].end == a)
        out[*n - 1].end = b;
    else
        out[(*n)++] = (struct pr_range){a, b};
}

/* Split ranges (sorted) into pages that hold data (present, or swapped out: not a uffd-wp
 * marker) and pages that do not, from /proc/PID/pagemap. For the written pages of a round:
 * a handful of preads where PAGEMAP_SCAN asking for PRESENT takes its slow path per range.
 * Outputs need room for one range per two pages plus one per input range. */
long pr_split_present(int pagemap_fd, const struct pr_range *in, long n, struct pr_range *yes,
                      long *n_yes, struct pr_range *no, long *n_no)
{
    static uint64_t pm[PM_BATCH];
    *n_yes = *n_no = 0;
    for (long i = 0; i < n; i++) {
        for (uint64_t base = in[i].start; base < in[i].end;) {
            long got = read_pagemap(pagemap_fd, base, in[i].end, pm);
            if (got < 0)
                return got;
            for (long k = 0; k < got; k++) {
                uint64_t a = base + (uint64_t)k * PAGE;
                int swapped = (pm[k] & PM_SWAP) && (pm[k] & 0x1f) != 0x1f;
                if ((pm[k] & PM_PRESENT) || swapped)
                    append_range(yes, n_yes, a, a + PAGE);
                else
                    append_range(no, n_no, a, a + PAGE);
            }
            base += (uint64_t)got * PAGE;
        }
    }
    return 0;
}

/* Present private pages of [start, end) from /proc/PID/pagemap, as regions (PAGEMAP_SCAN's
 * PRESENT && !FILE, for kernels without PAGEMAP_SCAN). Returns the count or -ENOSPC. */
long pr_pagemap_present(int pagemap_fd, uint64_t start, uint64_t end,
                        struct pr_page_region *out, long cap)
{
    static uint64_t pm[PM_BATCH];
    long got = 0;
    for (uint64_t base = start; base < end;) {
        long got_pm = read_pagemap(pagemap_fd, base, end, pm);
        if (got_pm < 0)
            return got_pm;
        uint64_t n = (uint64_t)got_pm;
        for (uint64_t k = 0; k < n; k++) {
            if (!(pm[k] & PM_PRESENT) || (pm[k] & PM_FILE))
                continue;
            uint64_t a = base + k * PAGE;
            if (got && out[got - 1].end == a)
                out[got - 1].end += PAGE;
            else {
                if (got == cap)
                    return -ENOSPC;
                out[got++] = (struct pr_page_region){a, a + PAGE, PR_PAGE_IS_PRESENT};
            }
        }
        base += n * PAGE;
    }
    return got;
}
