/* nfnetlink_log over a raw netlink socket: configuration messages and parsing.
 *
 * Structures and constants are the kernel's (linux/netfilter/nfnetlink_log.h);
 * the protocol is described in net/netfilter/nfnetlink_log.c. The kernel
 * gathers logged packets of a group in one buffer of NFULA_CFG_NLBUFSIZ bytes
 * and sends it when the queue threshold (the nft rule's queue-threshold, else
 * NFULA_CFG_QTHRESH) is reached, when the next packet does not fit, or when the
 * flush timer (NFULA_CFG_TIMEOUT, 1/100 s) fires: one datagram carries many
 * NFULNL_MSG_PACKET messages, closed by an NLMSG_DONE when there is more than
 * one. A datagram the socket cannot take is dropped whole; its packets' instance
 * sequence numbers (NFULA_SEQ, with NFULNL_CFG_F_SEQ) are then missing, which is
 * how losses are counted.
 *
 * The building blocks shared with nfqueue (attribute append, request with ACK,
 * clock) come from nfq_netlink.h.
 */
#ifndef TOLLGATE_NFLOG_NETLINK_H
#define TOLLGATE_NFLOG_NETLINK_H

#include <linux/netfilter/nfnetlink_log.h>

#include "nfq_netlink.h"

/* Start an NFULNL_MSG_CONFIG message for group at buf. */
static inline struct nlmsghdr *tg_nful_hdr(void *buf, uint16_t group, uint32_t seq) {
    struct nlmsghdr *nlh = (struct nlmsghdr *)buf;
    struct nfgenmsg *nfg;
    nlh->nlmsg_len = NLMSG_LENGTH(sizeof(struct nfgenmsg));
    nlh->nlmsg_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG;
    nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    nlh->nlmsg_seq = seq;
    nlh->nlmsg_pid = 0;
    nfg = (struct nfgenmsg *)NLMSG_DATA(nlh);
    nfg->nfgen_family = AF_UNSPEC;
    nfg->version = NFNETLINK_V0;
    nfg->res_id = htons(group);
    return nlh;
}

/* NFULNL_CFG_CMD_UNBIND (or any command alone); returns 0 or -errno. */
static int tg_nful_cmd(int fd, uint16_t group, uint8_t cmd, uint32_t seq) {
    char buf[128] __attribute__((aligned(4)));
    struct nfulnl_msg_config_cmd c = {.command = cmd};
    struct nlmsghdr *nlh = tg_nful_hdr(buf, group, seq);
    tg_nla_put(nlh, NFULA_CFG_CMD, &c, sizeof c);
    return tg_nl_request(fd, nlh);
}

/* Bind the group and set copy mode and range, buffer size, queue threshold,
 * flush timeout and flags in the same message (the kernel creates the
 * instance first, then applies the rest), so no packet is logged under the
 * defaults. Returns 0 or -errno (EBUSY: another socket has the group).
 * Packets logged before the ACK is read are discarded with it; they show as
 * the first sequence gap, not silently. */
static int tg_nful_bind(int fd, uint16_t group, uint32_t copy_range, uint32_t nlbufsiz, uint32_t qthresh,
                        uint32_t timeout_cs, uint16_t flags, uint32_t seq) {
    char buf[256] __attribute__((aligned(4)));
    struct nfulnl_msg_config_cmd c = {.command = NFULNL_CFG_CMD_BIND};
    struct nfulnl_msg_config_mode mode;
    uint32_t v;
    uint16_t f = htons(flags);
    struct nlmsghdr *nlh = tg_nful_hdr(buf, group, seq);
    tg_nla_put(nlh, NFULA_CFG_CMD, &c, sizeof c);
    memset(&mode, 0, sizeof mode);
    mode.copy_range = htonl(copy_range);
    mode.copy_mode = NFULNL_COPY_PACKET;
    tg_nla_put(nlh, NFULA_CFG_MODE, &mode, sizeof mode);
    v = htonl(nlbufsiz);
    tg_nla_put(nlh, NFULA_CFG_NLBUFSIZ, &v, sizeof v);
    v = htonl(qthresh);
    tg_nla_put(nlh, NFULA_CFG_QTHRESH, &v, sizeof v);
    v = htonl(timeout_cs);
    tg_nla_put(nlh, NFULA_CFG_TIMEOUT, &v, sizeof v);
    tg_nla_put(nlh, NFULA_CFG_FLAGS, &f, sizeof f);
    return tg_nl_request(fd, nlh);
}

/* One parsed NFULNL_MSG_PACKET. */
struct tg_nful_packet {
    uint32_t payload_off;  /* from the start of the receive buffer */
    uint32_t payload_len;  /* bytes copied (at most the copy range) */
    uint32_t wire_len;     /* the packet's IP length, from its header; 0: unknown */
    uint32_t seq;
    int has_seq;
};

/* The IP length a header states: IPv4 total length, IPv6 40 + payload
 * length; 0 when the header is cut short or states none (an IPv6 jumbogram,
 * an IPv4 GSO packet of more than 64 KiB). nfnetlink_log, unlike
 * nfnetlink_queue, has no attribute carrying the original length. */
static inline uint32_t tg_ip_length(const unsigned char *p, uint32_t n) {
    if (n >= 20 && (p[0] >> 4) == 4) return ((uint32_t)p[2] << 8) | p[3];
    if (n >= 40 && (p[0] >> 4) == 6) {
        uint32_t payload = ((uint32_t)p[4] << 8) | p[5];
        return payload ? 40 + payload : 0;
    }
    return 0;
}

/* Parse one message: 1 for a packet, 0 for anything else (NLMSG_DONE,
 * another subsystem), -1 for a packet message that is malformed (no payload). */
static int tg_nful_parse(const struct nlmsghdr *nlh, const char *base, struct tg_nful_packet *out) {
    const struct nlattr *nla;
    int len;
    out->payload_len = 0;
    out->payload_off = 0;
    out->wire_len = 0;
    out->has_seq = 0;
    out->seq = 0;
    if (nlh->nlmsg_type != ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)) return 0;
    if (nlh->nlmsg_len < NLMSG_LENGTH(sizeof(struct nfgenmsg))) return -1;
    len = nlh->nlmsg_len - NLMSG_LENGTH(sizeof(struct nfgenmsg));
    nla = (const struct nlattr *)((const char *)NLMSG_DATA(nlh) + NLMSG_ALIGN(sizeof(struct nfgenmsg)));
    while (len >= (int)NLA_HDRLEN && nla->nla_len >= NLA_HDRLEN && nla->nla_len <= len) {
        const char *data = (const char *)nla + NLA_HDRLEN;
        int dlen = nla->nla_len - NLA_HDRLEN;
        switch (nla->nla_type & NLA_TYPE_MASK) {
        case NFULA_PAYLOAD:
            out->payload_off = (uint32_t)(data - base);
            out->payload_len = dlen;
            break;
        case NFULA_SEQ:
            if (dlen >= 4) {
                uint32_t v;
                memcpy(&v, data, 4);
                out->seq = ntohl(v);
                out->has_seq = 1;
            }
            break;
        }
        len -= TG_NLA_ALIGN(nla->nla_len);
        nla = (const struct nlattr *)((const char *)nla + TG_NLA_ALIGN(nla->nla_len));
    }
    if (out->payload_len == 0) return -1;
    out->wire_len = tg_ip_length((const unsigned char *)base + out->payload_off, out->payload_len);
    return 1;
}

#endif
