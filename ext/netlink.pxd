# The socket, netlink and timer declarations the netlink readers
# (nfqueue.pyx, nflog.pyx) share; their protocol helpers are in the headers
# nfq_netlink.h and nflog_netlink.h.

from libc.stdint cimport uint16_t, uint32_t


cdef extern from "<sys/socket.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    struct timespec:
        long tv_sec
        long tv_nsec
    int socket(int, int, int)
    int setsockopt(int, int, int, const void *, unsigned int)
    int getsockopt(int, int, int, void *, unsigned int *)
    int bind(int, const void *, unsigned int)
    int recvmmsg(int, mmsghdr *, unsigned int, int, timespec *)
    ssize_t sendto(int, const void *, size_t, int, const void *, unsigned int)
    int close(int)
    enum:
        AF_NETLINK
        SOCK_RAW
        SOL_SOCKET
        SO_RCVBUF
        SO_RCVBUFFORCE
        SO_RCVTIMEO
        MSG_DONTWAIT
        MSG_WAITFORONE
        MSG_TRUNC

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec *, timespec *)

cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long)
    enum:
        PR_SET_TIMERSLACK

cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec

cdef extern from "<linux/netlink.h>" nogil:
    enum:
        NETLINK_NETFILTER
        SOL_NETLINK
        NETLINK_NO_ENOBUFS
    struct sockaddr_nl:
        unsigned short nl_family
        unsigned int nl_pid
        unsigned int nl_groups
    struct nlmsghdr:
        uint32_t nlmsg_len
        uint16_t nlmsg_type
