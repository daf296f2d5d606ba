/* nfnetlink_queue over a raw netlink socket: message building and parsing.
 *
 * Structures and constants are the kernel's (linux/netlink.h,
 * linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h); the
 * protocol is described in net/netfilter/nfnetlink_queue.c. Multi-byte
 * fields inside nfqueue attributes are big-endian; netlink headers are host
 * order.
 */
#ifndef TOLLGATE_NFQ_NETLINK_H
#define TOLLGATE_NFQ_NETLINK_H

#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define TG_NLA_ALIGN(len) (((len) + NLA_ALIGNTO - 1) & ~(NLA_ALIGNTO - 1))

/* Append one attribute to the message at buf (whose nlmsg_len is current). */
static inline void tg_nla_put(struct nlmsghdr *nlh, uint16_t type, const void *data, uint16_t len) {
    struct nlattr *nla = (struct nlattr *)((char *)nlh + NLMSG_ALIGN(nlh->nlmsg_len));
    nla->nla_type = type;
    nla->nla_len = NLA_HDRLEN + len;
    if (len) memcpy((char *)nla + NLA_HDRLEN, data, len);
    nlh->nlmsg_len = NLMSG_ALIGN(nlh->nlmsg_len) + TG_NLA_ALIGN(nla->nla_len);
}

/* Start an nfqueue message of type msg for queue num at buf. */
static inline struct nlmsghdr *tg_nfq_hdr(void *buf, uint16_t msg, uint16_t queue, uint16_t flags, uint32_t seq) {
    struct nlmsghdr *nlh = (struct nlmsghdr *)buf;
    struct nfgenmsg *nfg;
    nlh->nlmsg_len = NLMSG_LENGTH(sizeof(struct nfgenmsg));
    nlh->nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | msg;
    nlh->nlmsg_flags = NLM_F_REQUEST | flags;
    nlh->nlmsg_seq = seq;
    nlh->nlmsg_pid = 0;
    nfg = (struct nfgenmsg *)NLMSG_DATA(nlh);
    nfg->nfgen_family = AF_UNSPEC;
    nfg->version = NFNETLINK_V0;
    nfg->res_id = htons(queue);
    return nlh;
}

/* Send one message and wait for its ACK; returns 0 or -errno. */
static int tg_nl_request(int fd, struct nlmsghdr *nlh) {
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    char reply[4096];
    if (sendto(fd, nlh, nlh->nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) return -errno;
    for (;;) {
        ssize_t n = recv(fd, reply, sizeof reply, 0);
        if (n < 0) return errno == EINTR ? -EINTR : -errno;
        for (struct nlmsghdr *h = (struct nlmsghdr *)reply; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == nlh->nlmsg_seq) {
                struct nlmsgerr *err = (struct nlmsgerr *)NLMSG_DATA(h);
                return err->error;  /* 0 = ACK */
            }
        }
    }
}

static int tg_nfq_cmd(int fd, uint16_t queue, uint8_t cmd, uint32_t seq) {
    char buf[128] __attribute__((aligned(4)));
    struct nfqnl_msg_config_cmd c = {.command = cmd, .pf = 0};
    struct nlmsghdr *nlh = tg_nfq_hdr(buf, NFQNL_MSG_CONFIG, queue, NLM_F_ACK, seq);
    tg_nla_put(nlh, NFQA_CFG_CMD, &c, sizeof c);
    return tg_nl_request(fd, nlh);
}

/* Copy mode, queue length and flags in one config message. */
static int tg_nfq_params(int fd, uint16_t queue, uint32_t copy_range, uint32_t maxlen, uint32_t flags,
                         uint32_t seq) {
    char buf[256] __attribute__((aligned(4)));
    struct nfqnl_msg_config_params p;
    uint32_t v;
    struct nlmsghdr *nlh = tg_nfq_hdr(buf, NFQNL_MSG_CONFIG, queue, NLM_F_ACK, seq);
    p.copy_range = htonl(copy_range);
    p.copy_mode = NFQNL_COPY_PACKET;
    tg_nla_put(nlh, NFQA_CFG_PARAMS, &p, sizeof p);
    v = htonl(maxlen);
    tg_nla_put(nlh, NFQA_CFG_QUEUE_MAXLEN, &v, sizeof v);
    v = htonl(flags);
    tg_nla_put(nlh, NFQA_CFG_FLAGS, &v, sizeof v);
    tg_nla_put(nlh, NFQA_CFG_MASK, &v, sizeof v);
    return tg_nl_request(fd, nlh);
}

/* One parsed NFQNL_MSG_PACKET. */
struct tg_nfq_packet {
    uint32_t id;
    uint32_t payload_off;  /* from the start of the datagram buffer */
    uint32_t payload_len;
    uint32_t wire_len;
};

/* Parse a packet message; returns 1 on success, 0 if it is not a packet
 * message, -1 if it is malformed (then id is set if the header was seen). */
static int tg_nfq_parse(const struct nlmsghdr *nlh, const char *base, struct tg_nfq_packet *out) {
    const struct nlattr *nla;
    int len, seen_hdr = 0;
    out->id = 0;
    out->payload_len = 0;
    out->payload_off = 0;
    out->wire_len = 0;
    if (nlh->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)) return 0;
    if (nlh->nlmsg_len < NLMSG_LENGTH(sizeof(struct nfgenmsg))) return -1;
    len = nlh->nlmsg_len - NLMSG_LENGTH(sizeof(struct nfgenmsg));
    nla = (const struct nlattr *)((const char *)NLMSG_DATA(nlh) + NLMSG_ALIGN(sizeof(struct nfgenmsg)));
    while (len >= (int)NLA_HDRLEN && nla->nla_len >= NLA_HDRLEN && nla->nla_len <= len) {
        const char *data = (const char *)nla + NLA_HDRLEN;
        int dlen = nla->nla_len - NLA_HDRLEN;
        switch (nla->nla_type & NLA_TYPE_MASK) {
        case NFQA_PACKET_HDR:
            if (dlen >= (int)sizeof(struct nfqnl_msg_packet_hdr)) {
                out->id = ntohl(((const struct nfqnl_msg_packet_hdr *)data)->packet_id);
                seen_hdr = 1;
            }
            break;
        case NFQA_PAYLOAD:
            out->payload_off = (uint32_t)(data - base);
            out->payload_len = dlen;
            break;
        case NFQA_CAP_LEN:
            if (dlen >= 4) out->wire_len = ntohl(*(const uint32_t *)data);
            break;
        }
        len -= TG_NLA_ALIGN(nla->nla_len);
        nla = (const struct nlattr *)((const char *)nla + TG_NLA_ALIGN(nla->nla_len));
    }
    if (!seen_hdr) return -1;
    if (out->wire_len == 0) out->wire_len = out->payload_len;  /* not truncated by the copy range */
    return 1;
}

/* Append a verdict message (batch: for every id <= id) to buf at *used. */
static inline void tg_nfq_verdict(char *buf, size_t *used, uint16_t queue, int batch, uint32_t id, uint32_t verdict) {
    struct nfqnl_msg_verdict_hdr vh;
    struct nlmsghdr *nlh = tg_nfq_hdr(buf + *used, batch ? NFQNL_MSG_VERDICT_BATCH : NFQNL_MSG_VERDICT, queue, 0, 0);
    vh.verdict = htonl(verdict);
    vh.id = htonl(id);
    tg_nla_put(nlh, NFQA_VERDICT_HDR, &vh, sizeof vh);
    *used += NLMSG_ALIGN(nlh->nlmsg_len);
}

static inline int64_t tg_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
