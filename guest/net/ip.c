/*
 * ip.c - IPv4 (RFC 791, no fragments), ICMP echo (RFC 792) and UDP (RFC 768) for net.h.
 */
#include "net/bytes.h"
#include "net/internal.h"
#include "runtime/string.h"

#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8
#define IP_DEFAULT_TTL 64
#define IP_FLAG_MF 0x2000
#define IP_FRAG_OFFSET 0x1fff

uint32_t inet_sum(uint32_t sum, const void *data, size_t len)
{
    const uint8_t *p = data;
    while (len > 1) {
        sum += (uint32_t)((p[0] << 8) | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)(p[0] << 8);
    return sum;
}

uint16_t inet_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static uint32_t pseudo_sum(uint32_t src, uint32_t dst, uint8_t proto, uint16_t len)
{
    return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + len;
}

static uint16_t ip_id;

/* frame has room for the Ethernet and IP headers before the payload of plen bytes. */
static int ip_output(struct net_if *nif, uint32_t dst, uint8_t proto, uint8_t *frame,
                     size_t plen)
{
    uint8_t *ip = frame + ETH_HLEN;
    size_t total = IP_HLEN + plen;
    ip[0] = 0x45;
    ip[1] = 0;
    put_be16(ip + 2, (uint16_t)total);
    put_be16(ip + 4, ip_id++);
    put_be16(ip + 6, 0x4000); /* DF */
    ip[8] = IP_DEFAULT_TTL;
    ip[9] = proto;
    put_be16(ip + 10, 0);
    put_be32(ip + 12, nif->ip);
    put_be32(ip + 16, dst);
    put_be16(ip + 10, inet_fold(inet_sum(0, ip, IP_HLEN)));
    return eth_output_ip(nif, dst, frame, ETH_HLEN + total);
}

static void icmp_input(struct net_if *nif, uint32_t src, const uint8_t *icmp, size_t len)
{
    if (len < 8 || inet_fold(inet_sum(0, icmp, len)) != 0) {
        nif->stats.rx_dropped++;
        return;
    }
    nif->stats.rx_icmp++;
    if (icmp[0] != ICMP_ECHO_REQUEST || len > NET_FRAME_MAX - ETH_HLEN - IP_HLEN)
        return;
    uint8_t *f = nif->txbuf;
    uint8_t *out = f + ETH_HLEN + IP_HLEN;
    memcpy(out, icmp, len);
    out[0] = ICMP_ECHO_REPLY;
    out[1] = 0;
    put_be16(out + 2, 0);
    put_be16(out + 2, inet_fold(inet_sum(0, out, len)));
    if (ip_output(nif, src, IP_PROTO_ICMP, f, len) == 0)
        nif->stats.tx_icmp++;
}

static void udp_input(struct net_if *nif, uint32_t src, uint32_t dst, const uint8_t *udp,
                      size_t len)
{
    if (len < UDP_HLEN) {
        nif->stats.rx_dropped++;
        return;
    }
    uint16_t ulen = get_be16(udp + 4);
    if (ulen < UDP_HLEN || ulen > len) {
        nif->stats.rx_dropped++;
        return;
    }
    if (get_be16(udp + 6) != 0) { /* checksum present: verify it */
        uint32_t sum = pseudo_sum(src, dst, IP_PROTO_UDP, ulen);
        if (inet_fold(inet_sum(sum, udp, ulen)) != 0) {
            nif->stats.rx_dropped++;
            return;
        }
    }
    uint16_t dport = get_be16(udp + 2);
    if (!nif->udp_rx || dport != nif->udp_port) {
        nif->stats.rx_dropped++;
        return;
    }
    nif->stats.rx_udp++;
    nif->udp_rx(nif->udp_ctx, src, get_be16(udp), udp + UDP_HLEN, ulen - UDP_HLEN);
}

void ip_input(struct net_if *nif, const uint8_t *eth_src, const uint8_t *pkt, size_t len)
{
    if (len < IP_HLEN || (pkt[0] >> 4) != 4) {
        nif->stats.rx_dropped++;
        return;
    }
    size_t hlen = (size_t)(pkt[0] & 0xf) * 4;
    size_t total = get_be16(pkt + 2);
    if (hlen < IP_HLEN || total < hlen || total > len ||
        inet_fold(inet_sum(0, pkt, hlen)) != 0) {
        nif->stats.rx_dropped++;
        return;
    }
    uint16_t frag = get_be16(pkt + 6);
    if (frag & (IP_FLAG_MF | IP_FRAG_OFFSET)) {
        nif->stats.rx_dropped++; /* no fragment reassembly */
        return;
    }
    uint32_t src = get_be32(pkt + 12), dst = get_be32(pkt + 16);
    int for_us = dst == nif->ip || dst == 0xffffffffu || dst == (nif->ip | ~nif->mask);
    if (!for_us) {
        nif->stats.rx_dropped++;
        return;
    }
    /* learn the sender's MAC (on-link) or confirm the gateway's (off-link) */
    if (net_on_link(nif, src))
        arp_learn(nif, src, eth_src);
    const uint8_t *payload = pkt + hlen;
    size_t plen = total - hlen;
    if (pkt[9] == IP_PROTO_ICMP)
        icmp_input(nif, src, payload, plen);
    else if (pkt[9] == IP_PROTO_UDP)
        udp_input(nif, src, dst, payload, plen);
    else
        nif->stats.rx_dropped++;
}

int net_udp_send(struct net_if *nif, uint32_t dst_ip, uint16_t src_port, uint16_t dst_port,
                 const void *data, size_t len)
{
    if (len > NET_FRAME_MAX - ETH_HLEN - IP_HLEN - UDP_HLEN) {
        nif->stats.tx_dropped++;
        return -1;
    }
    uint8_t *f = nif->txbuf;
    uint8_t *udp = f + ETH_HLEN + IP_HLEN;
    uint16_t ulen = (uint16_t)(UDP_HLEN + len);
    put_be16(udp, src_port);
    put_be16(udp + 2, dst_port);
    put_be16(udp + 4, ulen);
    put_be16(udp + 6, 0);
    memcpy(udp + UDP_HLEN, data, len);
    uint16_t sum = inet_fold(inet_sum(pseudo_sum(nif->ip, dst_ip, IP_PROTO_UDP, ulen), udp, ulen));
    put_be16(udp + 6, sum ? sum : 0xffff);
    int rc = ip_output(nif, dst_ip, IP_PROTO_UDP, f, ulen);
    if (rc == 0)
        nif->stats.tx_udp++;
    return rc;
}
