/*
 * internal.h - what the stack's files call in each other (not for workloads).
 */
#ifndef PTMIG_NET_INTERNAL_H
#define PTMIG_NET_INTERNAL_H

#include "net/net.h"

/* IPv4 packet (starting at the IP header) received from eth_src. */
void ip_input(struct net_if *nif, const uint8_t *eth_src, const uint8_t *pkt, size_t len);

/* frame[ETH_HLEN..len) is an IPv4 packet to dst: fill the Ethernet header and send it (or
 * park it until ARP resolves the next hop).  0, or -1 if dropped. */
int eth_output_ip(struct net_if *nif, uint32_t dst, uint8_t *frame, size_t len);

/* Remember ip -> mac (on-link senders). */
void arp_learn(struct net_if *nif, uint32_t ip, const uint8_t mac[6]);

/* Is ip on our subnet? */
int net_on_link(const struct net_if *nif, uint32_t ip);

#endif
