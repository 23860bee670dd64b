/* prerestore native layer: the C surface seen by cffi.
 *
 * This file is read by cffi's cdef parser, so it holds declarations only (no #include, no macros).
 * Conventions:
 *   - every function returns 0 (or a count) on success and -errno on failure; nothing here prints,
 *     allocates on behalf of the caller or keeps hidden state;
 *   - addresses in another process are uint64_t; ranges are half-open [start, end) in bytes;
 *   - the caller owns every buffer it passes in.
 */

/* x86-64 struct user_regs_struct, field for field. */
struct pr_regs {
    uint64_t r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax,
             rip, cs, eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs;
};

/* PTRACE_GET_RSEQ_CONFIGURATION result. */
struct pr_rseq_conf {
    uint64_t rseq_abi_pointer;
    uint32_t rseq_abi_size, signature, flags, pad;
};

/* One system call of an injected batch; `ret` is written back. 64 bytes, the layout the
 * in-tracee batch runner reads. */
struct pr_call {
    int64_t nr;
    uint64_t args[6];
    int64_t ret;
};

/* What a parked batch saves in the tracee (where rbp then points) before it points the task at
 * the runner: enough for anyone to put the task back as it was. */
struct pr_saved {
    uint64_t magic, runner, sigmask, scratch;   /* scratch: our scratch area's address, or 0 */
    struct pr_regs regs;
};
#define PR_SAVED_SIZE 256
#define PR_SAVED_MAGIC 0x5052534156454431

/* A thread's scheduling (struct sched_attr, less its size and utilization clamps). */
struct pr_sched {
    uint32_t policy, priority;
    int32_t nice;
    uint32_t pad;
    uint64_t flags, runtime, deadline, period;
};

/* A half-open address range. */
struct pr_range {
    uint64_t start, end;
};

/* One region as returned by PAGEMAP_SCAN. */
struct pr_page_region {
    uint64_t start, end, categories;
};

/* ---- ptrace ---------------------------------------------------------------------------- */
int pr_seize(int pid, uint64_t options);
int pr_interrupt(int pid);
int pr_wait_stop(int pid, int *status);
int pr_detach(int pid, int sig);
int pr_get_regs(int pid, struct pr_regs *regs);
int pr_set_regs(int pid, const struct pr_regs *regs);
long pr_get_xstate(int pid, void *buf, size_t len);
int pr_set_xstate(int pid, const void *buf, size_t len);
int pr_get_sigmask(int pid, uint64_t *mask);
int pr_set_sigmask(int pid, uint64_t mask);
int pr_get_rseq(int pid, struct pr_rseq_conf *conf);
#define PR_SECCOMP_MAX_INSNS 4096
int pr_seccomp_filter(int pid, uint64_t index, void *buf);
int pr_seccomp_flags(int pid, uint64_t index, uint64_t *flags);
int pr_get_robust_list(int pid, uint64_t *head, uint64_t *len);
long pr_peek_siginfo(int pid, int shared, void *buf, long max);

/* ---- syscall injection ------------------------------------------------------------------- */
long pr_find_syscall_insn(int pid, uint64_t start, uint64_t end, uint64_t *addr);
int pr_inject_syscall(int pid, uint64_t insn, int64_t nr, const uint64_t *args, int64_t *ret);
int pr_inject_syscall_quiet(int pid, uint64_t insn, int64_t nr, const uint64_t *args,
                            int64_t *ret);
size_t pr_batch_runner(const void **code);
size_t pr_thread_starter(const void **code);
int pr_clone_thread(int pid, uint64_t starter, uint64_t args, uint64_t args_size, int *child);
int pr_set_options(int pid, uint64_t options);
int pr_start_batch(int pid, uint64_t runner, uint64_t table, struct pr_call *calls, long n,
                   const void *data, size_t data_len, uint64_t data_addr, int park,
                   uint64_t saved_addr, const struct pr_saved *saved);
int pr_finish_batch(int pid, uint64_t runner, uint64_t table, struct pr_call *calls, long n,
                    int park, long *done, long *foreign_stops);
int pr_run_batch(int pid, uint64_t runner, uint64_t table, struct pr_call *calls, long n,
                 const void *data, size_t data_len, uint64_t data_addr, int park,
                 uint64_t saved_addr, const struct pr_saved *saved, long *done,
                 long *foreign_stops);
int pr_park(int pid, int tgid);
int pr_wait_parked(int pid);
long pr_runner_parked_offset(void);

/* ---- memory -------------------------------------------------------------------------------- */
long pr_read_mem(int pid, uint64_t addr, void *buf, size_t len);
long pr_write_mem(int pid, uint64_t addr, const void *buf, size_t len);
extern const long PR_CHUNK;
extern const long PR_SET_MDWE_, PR_GET_MDWE_, PR_SET_MEMORY_MERGE_, PR_GET_MEMORY_MERGE_,
    MEMBARRIER_GET_REGISTRATIONS;
extern const long PR_TIMER_RESTORE_IDS;   /* prctl: timer_create takes the id it is given */     /* the most pr_read_pages reads in one call */
long pr_read_pages(int pid, int mem_fd, const struct pr_range *ranges, long n, long *i,
                   uint64_t *off, char *out);
long pr_dump_pages(int pid, int mem_fd, const struct pr_range *ranges, long n, int out_fd,
                   uint64_t *bytes);
long pr_load_pages(int pid, int mem_fd, int in_fd, uint64_t in_offset,
                   const struct pr_range *ranges, long n, uint64_t *bytes, uint64_t *forced);
long pr_copy_pages(int src_pid, int src_mem_fd, int dst_pid, int dst_mem_fd,
                   const struct pr_range *ranges, long n, uint64_t *bytes, uint64_t *forced,
                   uint64_t *skipped);

/* ---- page tables: PAGEMAP_SCAN and userfaultfd WP_ASYNC ------------------------------------ */
long pr_pagemap_scan(int pagemap_fd, uint64_t start, uint64_t end, uint64_t flags,
                     uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t return_mask,
                     struct pr_page_region *out, long cap, uint64_t *walk_end);
long pr_scan_ranges(int pagemap_fd, const struct pr_range *areas, long n_areas, uint64_t flags,
                    uint64_t inverted, uint64_t mask, uint64_t anyof, uint64_t return_mask,
                    struct pr_page_region *out, long cap, long *area, uint64_t *addr);
int pr_uffd_api(int uffd, uint64_t features, uint64_t *got);
long pr_hash_scan(int pid, int mem_fd, int pagemap_fd, uint64_t start, uint64_t end,
                  uint64_t *hashes, uint8_t *suspect, int mode, struct pr_page_region *out,
                  long cap);
long pr_pagemap_vs_parent(int child_pm_fd, int parent_pm_fd, uint64_t start, uint64_t end,
                          struct pr_range *copy, long *n_copy, struct pr_range *drop,
                          long *n_drop, long cap);
long pr_split_present(int pagemap_fd, const struct pr_range *in, long n, struct pr_range *yes,
                      long *n_yes, struct pr_range *no, long *n_no);
long pr_pagemap_present(int pagemap_fd, uint64_t start, uint64_t end,
                        struct pr_page_region *out, long cap);
int pr_uffd_wp_range(int uffd, uint64_t start, uint64_t len);

long pr_check_ranges(const struct pr_range *r, long n);

/* ---- processes ----------------------------------------------------------------------------- */
void pr_split_regions(const struct pr_page_region *in, long n, uint64_t mask, uint64_t value,
                      struct pr_range *yes, long *n_yes, struct pr_range *no, long *n_no);
long pr_pipe_peek(int pipe_fd, char *buf, long cap);
int pr_make_signalfd(uint64_t mask, int flags);
int pr_make_timerfd(int clockid, int flags, int64_t value_s, int64_t value_ns,
                    int64_t interval_s, int64_t interval_ns, uint64_t ticks);
int pr_make_epoll(int flags);
int pr_make_inotify(int flags, const char *spare, const int *wds, const uint32_t *masks,
                    const char *const *paths, long n, long *failed);
int pr_open_by_handle(int mount_fd, int type, const void *handle, unsigned len, int flags);
int pr_same_file(int pid1, int fd1, int pid2, int fd2);
int pr_kcmp(int pid1, int pid2, int type);
int pr_is_epoll_target(int pid1, int fd1, int pid2, int efd, int tfd);
int pr_pidfd_open(int pid);
int pr_pidfd_getfd(int pidfd, int fd);
int pr_setns(int fd, int nstype);
int pr_spawn(const char *path, char *const *argv, const int *set_tid, long set_tid_size,
             int new_pidns, int keep_fd, int cgroup_fd);
int pr_set_pdeathsig(int sig, int parent);
int pr_prlimit(int pid, int resource, const uint64_t *new_lim, uint64_t *old_lim);
int pr_sched_get(int tid, struct pr_sched *out);
int pr_sched_set(int tid, const struct pr_sched *in);

/* UAPI numbers the system headers may not have yet, read from C so Python never copies them. */
extern const uint64_t PR_PAGE_IS_WPALLOWED, PR_PAGE_IS_WRITTEN, PR_PAGE_IS_FILE,
    PR_PAGE_IS_PRESENT, PR_PAGE_IS_SWAPPED, PR_PAGE_IS_PFNZERO, PR_PAGE_IS_HUGE,
    PR_PM_SCAN_WP_MATCHING, PR_PM_SCAN_CHECK_WPASYNC, PR_UFFD_FEATURE_WP_ASYNC,
    PR_UFFD_FEATURE_WP_UNPOPULATED, PR_UFFD_USER_MODE_ONLY;
