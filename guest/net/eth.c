/*
 * eth.c - Ethernet II input/output and ARP (RFC 826) for the stack in net.h.
 */
#include "net/bytes.h"
#include "net/internal.h"
#include "runtime/io.h"
#include "runtime/string.h"

#define ARP_HTYPE_ETHER 1
#define ARP_OP_REQUEST 1
#define ARP_OP_REPLY 2
#define ARP_LEN 28

static const uint8_t broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

void net_init(struct net_if *nif, struct virtio_net *nic, uint32_t ip, uint32_t mask,
              uint32_t gw)
{
    memset(nif, 0, sizeof(*nif));
    nif->nic = nic;
    memcpy(nif->mac, nic->mac, 6);
    nif->ip = ip;
    nif->mask = mask;
    nif->gw = gw;
}

void net_udp_bind(struct net_if *nif, uint16_t port, udp_handler fn, void *ctx)
{
    nif->udp_port = port;
    nif->udp_rx = fn;
    nif->udp_ctx = ctx;
}

int net_on_link(const struct net_if *nif, uint32_t ip)
{
    return (ip & nif->mask) == (nif->ip & nif->mask);
}

static int send_frame(struct net_if *nif, const uint8_t *frame, size_t len)
{
    uint8_t padded[60];
    if (len < 60) { /* pad to the Ethernet minimum */
        memset(padded, 0, sizeof(padded));
        memcpy(padded, frame, len);
        frame = padded;
        len = 60;
    }
    if (virtio_net_send(nif->nic, frame, len)) {
        nif->stats.tx_dropped++;
        return -1;
    }
    nif->stats.tx_frames++;
    return 0;
}

static void fill_eth(uint8_t *frame, const uint8_t dst[6], const uint8_t src[6], uint16_t type)
{
    memcpy(frame, dst, 6);
    memcpy(frame + 6, src, 6);
    put_be16(frame + 12, type);
}

static void send_arp(struct net_if *nif, uint16_t op, const uint8_t eth_dst[6],
                     const uint8_t target_mac[6], uint32_t target_ip)
{
    uint8_t f[ETH_HLEN + ARP_LEN];
    fill_eth(f, eth_dst, nif->mac, ETH_P_ARP);
    uint8_t *a = f + ETH_HLEN;
    put_be16(a, ARP_HTYPE_ETHER);
    put_be16(a + 2, ETH_P_IP);
    a[4] = 6;
    a[5] = 4;
    put_be16(a + 6, op);
    memcpy(a + 8, nif->mac, 6);
    put_be32(a + 14, nif->ip);
    memcpy(a + 18, target_mac, 6);
    put_be32(a + 24, target_ip);
    if (send_frame(nif, f, sizeof(f)) == 0)
        nif->stats.tx_arp++;
}

void net_announce(struct net_if *nif)
{
    /* gratuitous ARP: a request for our own address, to everyone */
    static const uint8_t zero[6];
    send_arp(nif, ARP_OP_REQUEST, broadcast, zero, nif->ip);
}

static struct arp_entry *arp_find(struct net_if *nif, uint32_t ip)
{
    for (unsigned i = 0; i < NET_ARP_ENTRIES; i++) {
        if (nif->arp[i].valid && nif->arp[i].ip == ip)
            return &nif->arp[i];
    }
    return NULL;
}

void arp_learn(struct net_if *nif, uint32_t ip, const uint8_t mac[6])
{
    if (ip == 0 || ip == nif->ip || (mac[0] & 1))
        return; /* no entries for 0.0.0.0, ourselves or multicast MACs */
    struct arp_entry *e = arp_find(nif, ip);
    if (!e) {
        e = &nif->arp[0];
        for (unsigned i = 0; i < NET_ARP_ENTRIES; i++) {
            if (!nif->arp[i].valid) {
                e = &nif->arp[i];
                break;
            }
            if (nif->arp[i].stamp < e->stamp)
                e = &nif->arp[i];
        }
    }
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    e->valid = 1;
    e->stamp = rdtsc();

    if (nif->pending_len && nif->pending_hop == ip) { /* the parked packet can go now */
        memcpy(nif->pending, mac, 6);
        send_frame(nif, nif->pending, nif->pending_len);
        nif->pending_len = 0;
    }
}

static void arp_input(struct net_if *nif, const uint8_t *a, size_t len)
{
    if (len < ARP_LEN || get_be16(a) != ARP_HTYPE_ETHER || get_be16(a + 2) != ETH_P_IP ||
        a[4] != 6 || a[5] != 4) {
        nif->stats.rx_dropped++;
        return;
    }
    nif->stats.rx_arp++;
    uint16_t op = get_be16(a + 6);
    uint32_t sender_ip = get_be32(a + 14), target_ip = get_be32(a + 24);
    const uint8_t *sender_mac = a + 8;
    if (net_on_link(nif, sender_ip) && (target_ip == nif->ip || arp_find(nif, sender_ip)))
        arp_learn(nif, sender_ip, sender_mac);
    if (op == ARP_OP_REQUEST && target_ip == nif->ip && sender_ip != nif->ip)
        send_arp(nif, ARP_OP_REPLY, sender_mac, sender_mac, sender_ip);
}

void net_input(void *ctx, const uint8_t *frame, size_t len)
{
    struct net_if *nif = ctx;
    nif->stats.rx_frames++;
    if (len < ETH_HLEN) {
        nif->stats.rx_dropped++;
        return;
    }
    if (memcmp(frame, nif->mac, 6) != 0 && memcmp(frame, broadcast, 6) != 0) {
        nif->stats.rx_dropped++; /* not for us (the switch may flood) */
        return;
    }
    uint16_t type = get_be16(frame + 12);
    if (type == ETH_P_ARP)
        arp_input(nif, frame + ETH_HLEN, len - ETH_HLEN);
    else if (type == ETH_P_IP)
        ip_input(nif, frame + 6, frame + ETH_HLEN, len - ETH_HLEN);
    else
        nif->stats.rx_dropped++;
}

int eth_output_ip(struct net_if *nif, uint32_t dst, uint8_t *frame, size_t len)
{
    if (dst == 0xffffffffu || dst == (nif->ip | ~nif->mask)) {
        fill_eth(frame, broadcast, nif->mac, ETH_P_IP);
        return send_frame(nif, frame, len);
    }
    uint32_t hop = net_on_link(nif, dst) ? dst : nif->gw;
    if (hop == 0) {
        nif->stats.tx_dropped++; /* off-link destination and no gateway */
        return -1;
    }
    struct arp_entry *e = arp_find(nif, hop);
    if (e) {
        fill_eth(frame, e->mac, nif->mac, ETH_P_IP);
        return send_frame(nif, frame, len);
    }
    /* park the packet (replacing an older one) and ask who has the next hop */
    fill_eth(frame, broadcast, nif->mac, ETH_P_IP);
    memcpy(nif->pending, frame, len);
    nif->pending_len = len;
    nif->pending_hop = hop;
    static const uint8_t zero[6];
    send_arp(nif, ARP_OP_REQUEST, broadcast, zero, hop);
    return 0;
}

unsigned net_poll(struct net_if *nif, unsigned budget)
{
    return virtio_net_poll(nif->nic, budget, net_input, nif);
}
