/* suspend: waits in sigsuspend() with a temporary mask; prints the mask it has after each
 * wakeup. A restorer that took sigsuspend's temporary mask for the process's own would leave
 * SIGUSR2 unblocked after the first wakeup.
 * Prints "start pid=N", then for each SIGUSR2: "woke usr2_blocked=1 usr1_blocked=0 n=K". */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static volatile sig_atomic_t n;
static void on_usr2(int sig) { (void)sig; n++; }

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t own, during;
    sigemptyset(&own);
    sigaddset(&own, SIGUSR2);               /* normally SIGUSR2 is blocked */
    sigprocmask(SIG_SETMASK, &own, NULL);
    sigemptyset(&during);
    sigaddset(&during, SIGUSR1);            /* while waiting: SIGUSR2 open, SIGUSR1 blocked */
    printf("start pid=%d\n", getpid());
    for (;;) {
        sigsuspend(&during);
        sigset_t now;
        sigprocmask(SIG_SETMASK, NULL, &now);
        printf("woke usr2_blocked=%d usr1_blocked=%d n=%d\n", sigismember(&now, SIGUSR2),
               sigismember(&now, SIGUSR1), (int)n);
    }
}
