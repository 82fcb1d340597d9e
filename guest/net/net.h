/*
 * net.h - a minimal IPv4 host stack over one virtio-net device: Ethernet II, ARP (answers
 * requests, learns senders, resolves next hops, gratuitous ARP at start), IPv4 without
 * fragments or options processing, ICMP echo reply, and UDP with one bound port.
 *
 * Addresses are kept in host byte order (10.0.0.2 == 0x0a000002).
 */
#ifndef PTMIG_NET_NET_H
#define PTMIG_NET_NET_H

#include <stddef.h>
#include <stdint.h>

#include "drivers/virtio_net.h"

#define NET_ARP_ENTRIES 32

typedef void (*udp_handler)(void *ctx, uint32_t src_ip, uint16_t src_port, const uint8_t *data,
                            size_t len);

struct arp_entry {
    uint32_t ip;
    uint8_t mac[6];
    uint8_t valid;
    uint64_t stamp; /* TSC of the last update (oldest is replaced) */
};

struct net_stats {
    uint64_t rx_frames, rx_arp, rx_icmp, rx_udp, rx_dropped;
    uint64_t tx_frames, tx_arp, tx_icmp, tx_udp, tx_dropped;
};

struct net_if {
    struct virtio_net *nic;
    uint8_t mac[6];
    uint32_t ip, mask, gw;
    struct arp_entry arp[NET_ARP_ENTRIES];
    uint16_t udp_port;
    udp_handler udp_rx;
    void *udp_ctx;
    /* one packet waiting for ARP resolution of its next hop */
    uint32_t pending_hop;
    size_t pending_len;
    uint8_t pending[NET_FRAME_MAX];
    uint8_t txbuf[NET_FRAME_MAX];
    struct net_stats stats;
};

void net_init(struct net_if *nif, struct virtio_net *nic, uint32_t ip, uint32_t mask,
              uint32_t gw);

/* Bind the single UDP port. */
void net_udp_bind(struct net_if *nif, uint16_t port, udp_handler fn, void *ctx);

/* Send a gratuitous ARP (announce ip -> mac). */
void net_announce(struct net_if *nif);

/* Process up to budget received frames; returns how many. */
unsigned net_poll(struct net_if *nif, unsigned budget);

/* Send a UDP datagram (len <= 1472).  0, or -1 if it could not be sent now. */
int net_udp_send(struct net_if *nif, uint32_t dst_ip, uint16_t src_port, uint16_t dst_port,
                 const void *data, size_t len);

/* Frame input (exposed for virtio_net_poll and the tests). */
void net_input(void *nif, const uint8_t *frame, size_t len);

/* Internet checksum helpers (pure). */
uint32_t inet_sum(uint32_t sum, const void *data, size_t len);
uint16_t inet_fold(uint32_t sum);

#endif
