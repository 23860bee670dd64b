/* sigtrap: a zdtm-like self-checking workload for the action of SIGTRAP (which the restorer's
 * own traps would reset to the default: the kernel's force_sig does so to a blocked one).
 *
 * Mode "handler": a SIGTRAP handler (SA_SIGINFO | SA_RESTART | SA_NODEFER, mask SIGUSR2);
 * every iteration it executes int3 and raise(SIGTRAP), and checks that the handler ran for
 * each (a lost handler: the process dies of SIGTRAP), and that sigaction still reads the
 * same. Mode "ignored": SIGTRAP ignored; raise(SIGTRAP) every iteration, sigaction checked.
 * Mode "blocked": the handler installed and SIGTRAP blocked; raise(SIGTRAP) every iteration
 * and taken with sigtimedwait, sigaction and the mask checked. Every 2 ms; "it=N ok" every
 * 100 iterations, "BAD what" and exit at the first difference. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SA_RESTORER 0x04000000      /* set by glibc, not in its headers */

static volatile long trapped;

static void on_trap(int sig, siginfo_t *si, void *uc)
{
    (void)sig, (void)si, (void)uc;
    trapped++;
}

static struct sigaction want;

static int same_action(void)
{
    struct sigaction now;
    memset(&now, 0, sizeof now);       /* the kernel fills 64 bits of glibc's mask */
    if (sigaction(SIGTRAP, NULL, &now))
        return 0;
    if (now.sa_handler != want.sa_handler ||
        (now.sa_flags & ~SA_RESTORER) != (want.sa_flags & ~SA_RESTORER) ||
        memcmp(&now.sa_mask, &want.sa_mask, 8)) {     /* the kernel's 64 signals */
        printf("BAD SIGTRAP action %p flags %#x, want %p flags %#x\n", (void *)now.sa_handler,
               now.sa_flags, (void *)want.sa_handler, want.sa_flags);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "handler";
    setvbuf(stdout, NULL, _IOLBF, 0);
    memset(&want, 0, sizeof want);
    sigemptyset(&want.sa_mask);
    if (!strcmp(mode, "ignored")) {
        want.sa_handler = SIG_IGN;
    } else {
        want.sa_sigaction = on_trap;
        want.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
        sigaddset(&want.sa_mask, SIGUSR2);
    }
    if (sigaction(SIGTRAP, &want, NULL))
        return 2;
    sigset_t trap;
    sigemptyset(&trap);
    sigaddset(&trap, SIGTRAP);
    if (!strcmp(mode, "blocked"))
        sigprocmask(SIG_BLOCK, &trap, NULL);
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000}, zero = {0, 0};
    for (long it = 1;; it++) {
        if (!same_action())
            return 1;
        if (!strcmp(mode, "handler")) {
            long before = trapped;
            __asm__ volatile("int3");
            raise(SIGTRAP);
            if (trapped != before + 2) {
                printf("BAD SIGTRAP handled %ld times, want 2\n", trapped - before);
                return 1;
            }
        } else if (!strcmp(mode, "ignored")) {
            raise(SIGTRAP);
        } else {
            sigset_t now;
            sigprocmask(SIG_BLOCK, NULL, &now);
            if (!sigismember(&now, SIGTRAP)) {
                printf("BAD SIGTRAP is no longer blocked\n");
                return 1;
            }
            raise(SIGTRAP);
            if (sigtimedwait(&trap, NULL, &zero) != SIGTRAP || trapped) {
                printf("BAD a blocked SIGTRAP was not pending (or was handled)\n");
                return 1;
            }
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
