/* A small-packet UDP sender for the data-plane bench: sendmmsg in batches of
 * 64 on a connected socket, for a fixed time. iperf3 tops out near 160 kpps
 * on this kind of machine; this reaches several times that, so the gateway,
 * not the sender, is what gets measured.
 *
 *   udpblast DST_IPv4 PORT SECONDS PAYLOAD_BYTES [PPS]  -> prints packets sent
 *
 * With PPS, batches are paced to that many packets per second (0: flat out). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) { fprintf(stderr, "usage: udpblast DST PORT SECONDS PAYLOAD [PPS]\n"); return 2; }
    double pps = argc == 6 ? atof(argv[5]) : 0;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1) { fprintf(stderr, "bad address\n"); return 2; }
    double seconds = atof(argv[3]);
    size_t len = (size_t)atoi(argv[4]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) { perror("socket"); return 1; }
    static char payload[1500];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = len;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long long sent = 0;
    for (;;) {
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) sent += n;
        clock_gettime(CLOCK_MONOTONIC, &t);
        double elapsed = (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9;
        if (elapsed >= seconds) break;
        if (pps > 0 && sent / pps > elapsed) {  /* ahead of the rate: sleep until the schedule catches up */
            double wait = sent / pps - elapsed;
            struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    printf("%llu\n", sent);
    return 0;
}
