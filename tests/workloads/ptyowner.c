/* ptyowner: a zdtm-like self-checking workload for a pty slave's owner, group and mode, as
 * a program that hands a terminal to a user sets them (`script`, sshd: chown and chmod of
 * /dev/pts/N). Opens a pair, gives the slave owner 1234, group 5 and mode 0640, and every
 * 2 ms checks them (fstat of its slave fd) and that a byte written to the master is read
 * from the slave; "it=N ok" every 100, or "BAD what" and exit at the first difference. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || unlockpt(master))
        return 2;
    int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
    if (slave < 0 || fchown(slave, 1234, 5) || fchmod(slave, 0640))
        return 2;
    struct termios t;
    tcgetattr(slave, &t);
    cfmakeraw(&t);
    tcsetattr(slave, TCSANOW, &t);
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        struct stat st;
        if (fstat(slave, &st) || st.st_uid != 1234 || st.st_gid != 5 ||
            (st.st_mode & 07777) != 0640) {
            printf("BAD slave owner %u group %u mode %o\n", st.st_uid, st.st_gid,
                   st.st_mode & 07777);
            return 1;
        }
        char c = (char)it, got = 0;
        if (write(master, &c, 1) != 1 || read(slave, &got, 1) != 1 || got != c) {
            printf("BAD pty byte\n");
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
