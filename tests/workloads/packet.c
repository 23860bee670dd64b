/* packet: a zdtm-like self-checking workload for a packet socket (AF_PACKET).
 *
 * A SOCK_DGRAM packet socket bound to the loopback interface for one unused ethertype
 * (0x88b5, IEEE "local experimental"); with the argument "ring", a PACKET_RX_RING mapped
 * into memory too. Every 2 ms it checks the socket's type, protocol and binding; every 100
 * checks it prints "it=N ok", or "BAD what" and exits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROTO 0x88b5

static void die(const char *what)
{
    printf("BAD setup %s: %s\n", what, strerror(errno));
    exit(2);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    int s = socket(AF_PACKET, SOCK_DGRAM, htons(PROTO));
    if (s < 0)
        die("socket");
    struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_protocol = htons(PROTO),
                            .sll_ifindex = (int)if_nametoindex("lo")};
    if (bind(s, (struct sockaddr *)&a, sizeof a))
        die("bind");
    if (argc > 1 && !strcmp(argv[1], "ring")) {
        struct tpacket_req req = {.tp_block_size = 4096, .tp_block_nr = 4,
                                  .tp_frame_size = 2048, .tp_frame_nr = 8};
        if (setsockopt(s, SOL_PACKET, PACKET_RX_RING, &req, sizeof req))
            die("PACKET_RX_RING");
        if (mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, s, 0) == MAP_FAILED)
            die("mmap ring");
    }
    printf("start pid=%d\n", getpid());
    struct timespec ts = {0, 2 * 1000 * 1000};
    for (long it = 1;; it++) {
        int type = 0;
        socklen_t len = sizeof type;
        struct sockaddr_ll got = {0};
        socklen_t glen = sizeof got;
        if (getsockopt(s, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_DGRAM ||
            getsockname(s, (struct sockaddr *)&got, &glen) || got.sll_family != AF_PACKET ||
            got.sll_protocol != htons(PROTO) || got.sll_ifindex != a.sll_ifindex) {
            printf("BAD packet socket: type %d family %d proto %#x ifindex %d\n", type,
                   got.sll_family, ntohs(got.sll_protocol), got.sll_ifindex);
            return 1;
        }
        if (it % 100 == 0)
            printf("it=%ld ok\n", it);
        nanosleep(&ts, NULL);
    }
}
