/*
 * kv.c - `kv ip=A.B.C.D mask=N gw=A.B.C.D port=7000 entries=N log=SIZE`: a UDP key-value
 * service whose writes go to a write-ahead log on a virtio-blk disk (protocol and log format:
 * docs/KV_PROTOCOL.md).  The log is compacted by checkpoints of the table (kv_log.h), so it
 * runs for any time at any rate while the live data fits in half of it.
 *
 * vCPU 0 does everything; the APs halt.  At start: bring up the first virtio-net and the
 * first virtio-blk device of boot_info, replay the log into the table, announce the address
 * (gratuitous ARP).  Then poll the NIC; when there is nothing to do for `spin=` microseconds
 * (default IDLE_SPIN_US), halt until a device interrupt (or 10 ms).
 *
 * A PUT is acknowledged only after its record is written (and, for durable requests, after
 * a FLUSH); the table is updated after the log write.  PUTs are group-committed and the
 * commits are pipelined: every request joins the open batch's ordered op list (a PUT also
 * stages its log record); when no batch is in flight the open batch is submitted (one write,
 * one FLUSH if a PUT asked for it) and the next one keeps collecting requests from the NIC
 * while the disk works.  When a batch is done its ops are carried out in arrival order --
 * PUTs applied to the table and acknowledged, GETs answered from the table as it stands
 * after the PUTs before them -- so replies leave in arrival order and a GET sees every PUT
 * received before it.  With nothing pending, a GET is answered at once.  Replies are queued
 * on the TX ring and the device is notified once per pass.
 *
 * Stats slot of vCPU 0: iterations = poll-loop iterations, max_gap_tsc = longest gap between
 * two iterations not counting time the loop itself chose to halt, last_tsc; w[0] requests,
 * w[1] puts, w[2] gets, w[3] log bytes appended, w[4] bad requests, w[5] io errors,
 * w[6] frames received, w[7] frames sent, w[8] halts, w[9] log commits (group commits:
 * every PUT received while the previous batch was on its way to the disk is written with one
 * request and at most one FLUSH).
 */
#include <stdint.h>

#include "drivers/virtio_blk.h"
#include "drivers/virtio_net.h"
#include "net/net.h"
#include "runtime/console.h"
#include "runtime/heap.h"
#include "runtime/hypercall.h"
#include "runtime/io.h"
#include "runtime/string.h"
#include "runtime/time.h"
#include "workloads/kv_log.h"
#include "workloads/kv_table.h"
#include "workloads/workload.h"

#define KV_REQ_MAGIC 0x3151564bu /* "KVQ1" */
#define KV_REPLY_MAGIC 0x3152564bu /* "KVR1" */
#define KV_REQ_HEADER 16
#define KV_REPLY_HEADER 12
#define KV_OP_PUT 1
#define KV_OP_GET 2
#define KV_OP_STATS 3
#define KV_FLAG_DURABLE 1
#define KV_OK 0
#define KV_NOT_FOUND 1
#define KV_BAD_REQUEST 2
#define KV_IO_ERROR 3

#define IDLE_SPIN_US 50    /* default spin=: keep polling this long after the last work */
#define HALT_US 10000
#define AUTO_ENTRIES_MIN 8192 /* entries= not given: at least this, more if RAM allows */
#define PASS_FRAMES 256    /* frames taken per pass before the log is looked at */
#define OPS_MAX (KV_LOG_BATCH_MAX + 256) /* ops per batch: its PUTs plus GETs and STATS */

static const char *const kv_keys[] = {"ip", "mask", "gw", "port", "entries", "spin", "log",
                                      NULL};

/* A request waiting for its batch: a PUT (its record staged in the batch), a GET (its key
 * copied: the RX buffer is reposted at once) or a STATS. */
struct op {
    uint32_t ip;
    uint32_t req_id;
    uint32_t rec_off; /* PUT: the record's offset in its log batch */
    uint16_t port;
    uint8_t kind;     /* KV_OP_PUT, KV_OP_GET, KV_OP_STATS */
    uint8_t klen;
    uint8_t key[KV_MAX_KEY];
};

/* The ops of one log batch, in arrival order. */
struct batch_ops {
    struct op *ops;    /* OPS_MAX */
    uint32_t n;
    uint32_t new_keys; /* staged PUTs whose key was not in the table */
};

static struct {
    struct batch_ops ops[2];
    struct batch_ops *open, *flight; /* staging; on its way to the disk (kv.log.busy) */
    uint64_t commits;
    struct virtio_net nic;
    struct virtio_blk blk;
    struct net_if nif;
    struct kv_table table;
    struct kv_log log;
    uint16_t port;
    uint64_t spin_us;
    uint8_t reply[KV_REPLY_HEADER + KV_MAX_VALUE];
} kv;

static volatile struct kv_report *report(void)
{
    return workload_area();
}

static int apply_record(void *ctx, const uint8_t *key, uint16_t klen, const uint8_t *value,
                        uint16_t vlen)
{
    return kv_table_put(ctx, key, klen, value, vlen);
}

/* The table's keys, slot by slot, for a log checkpoint. */
static int live_record(void *ctx, uint32_t *cursor, const uint8_t **key, uint16_t *klen,
                       const uint8_t **value, uint16_t *vlen)
{
    const struct kv_table *t = ctx;
    for (; *cursor < t->capacity; (*cursor)++) {
        const struct kv_slot *s = &t->slots[*cursor];
        if (!s->used)
            continue;
        *key = s->key;
        *klen = s->klen;
        *value = s->value;
        *vlen = s->vlen;
        (*cursor)++;
        return 1;
    }
    return 0;
}

/* The log's shape and checkpoints, for the VMM. */
static void report_log(void)
{
    volatile struct kv_report *rep = report();
    rep->log_area_bytes = kv.log.area_bytes;
    rep->log_active = kv.log.active;
    rep->log_first_seq = kv.log.first_seq;
    rep->checkpoints = kv.log.checkpoints;
    rep->checkpoint_bytes = kv.log.checkpoint_bytes;
    rep->checkpoint_us = kv.log.checkpoint_us;
    rep->checkpoint_max_us = kv.log.checkpoint_max_us;
}

static const struct boot_device *find_device(const struct boot_info *bi, uint32_t id)
{
    for (uint32_t i = 0; i < bi->nr_devices; i++) {
        if (bi->devices[i].virtio_device_id == id)
            return &bi->devices[i];
    }
    return NULL;
}

static void print_ip(const char *what, uint32_t ip)
{
    printf("%s%u.%u.%u.%u", what, ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
}

static int kv_setup(const struct boot_info *bi, const struct cmdline *c)
{
    uint32_t ip, gw;
    uint64_t mask_bits, port, entries, log_bytes;
    if (!cmdline_get(c, "ip")) {
        printf("kv: ip= is required; usage: %s\n", workload_kv.usage);
        return EXIT_BAD_ARGS;
    }
    if (cmdline_get_ipv4(c, "ip", 0, &ip) || cmdline_get_ipv4(c, "gw", 0, &gw) ||
        cmdline_get_u64(c, "mask", 24, &mask_bits) || cmdline_get_u64(c, "port", 7000, &port) ||
        cmdline_get_u64(c, "entries", 0, &entries) ||
        cmdline_get_u64(c, "spin", IDLE_SPIN_US, &kv.spin_us) ||
        cmdline_get_u64(c, "log", 0, &log_bytes)) {
        printf("kv: bad ip/gw/mask/port/entries/spin/log value; usage: %s\n", workload_kv.usage);
        return EXIT_BAD_ARGS;
    }
    int auto_entries = entries == 0;
    if (kv.spin_us > HALT_US) {
        printf("kv: spin=%lu must be at most %u us (an idle guest must halt)\n",
               (unsigned long)kv.spin_us, HALT_US);
        return EXIT_BAD_ARGS;
    }
    if (mask_bits == 0 || mask_bits > 32 || port == 0 || port > 65535 ||
        (!auto_entries && (entries < 8 || entries > (1u << 20) || (entries & (entries - 1))))) {
        printf("kv: mask=%lu must be 1..32, port=%lu 1..65535, entries=%lu a power of two in "
               "8..1048576\n",
               (unsigned long)mask_bits, (unsigned long)port, (unsigned long)entries);
        return EXIT_BAD_ARGS;
    }
    const struct boot_device *net = find_device(bi, VIRTIO_ID_NET);
    const struct boot_device *disk = find_device(bi, VIRTIO_ID_BLOCK);
    if (!net || !disk) {
        printf("kv: needs a virtio-net and a virtio-blk device; boot_info lists %u devices%s%s\n",
               bi->nr_devices, net ? "" : ", no net", disk ? "" : ", no disk");
        return EXIT_FAILED;
    }
    heap_init_boot(bi); /* all of RAM: the table may land above 4 GiB */
    if (virtio_net_init(&kv.nic, net->mmio_gpa) || virtio_blk_init(&kv.blk, disk->mmio_gpa))
        return EXIT_FAILED;

    if (auto_entries) /* the largest table that takes at most half of the free memory */
        for (entries = AUTO_ENTRIES_MIN; entries < (1u << 20) &&
             kv_table_bytes((uint32_t)entries * 2) <= heap_free() / 2;)
            entries *= 2;
    for (unsigned i = 0; i < 2; i++) {
        kv.ops[i].ops = heap_alloc(sizeof(struct op) * OPS_MAX, 64);
        if (!kv.ops[i].ops)
            return EXIT_FAILED;
    }
    kv.open = &kv.ops[0];
    kv.flight = &kv.ops[1];
    struct kv_slot *slots = heap_alloc(kv_table_bytes((uint32_t)entries), 4096);
    if (!slots || kv_table_init(&kv.table, slots, (uint32_t)entries))
        return EXIT_FAILED;
    struct kv_replay r;
    if (kv_log_open(&kv.log, &kv.blk, log_bytes, apply_record, live_record, &kv.table, &r))
        return EXIT_FAILED;

    volatile struct kv_report *rep = report();
    rep->replay_records = r.records;
    rep->replay_bytes = r.bytes;
    rep->replay_last_seq = r.last_seq;
    rep->replay_stop = r.stop;
    rep->formatted = (uint64_t)r.formatted;
    rep->entries = kv.table.count;
    report_log();
    __atomic_store_n(&rep->magic, KV_REPORT_MAGIC, __ATOMIC_RELEASE);

    uint32_t mask = (uint32_t)(0xffffffffull << (32 - mask_bits));
    kv.port = (uint16_t)port;
    net_init(&kv.nif, &kv.nic, ip, mask, gw);
    net_udp_bind(&kv.nif, kv.port, NULL, NULL); /* handler set in kv_run */
    printf("kv: disk %lu sectors, log %s (two areas of %lu bytes, area %lu from seq %lu), "
           "replayed %lu records (%lu bytes, stop %lu), %u keys (room for %u)\n",
           (unsigned long)kv.blk.capacity, r.formatted ? "formatted" : "found",
           (unsigned long)kv.log.area_bytes, (unsigned long)kv.log.active,
           (unsigned long)r.first_seq, (unsigned long)r.records, (unsigned long)r.bytes,
           (unsigned long)r.stop, kv.table.count, kv.table.limit);
    print_ip("kv: serving on ", ip);
    printf("/%lu port %u, mac %02x:%02x:%02x:%02x:%02x:%02x\n", (unsigned long)mask_bits,
           kv.port, kv.nif.mac[0], kv.nif.mac[1], kv.nif.mac[2], kv.nif.mac[3], kv.nif.mac[4],
           kv.nif.mac[5]);
    return EXIT_OK;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return rd16(p) | (uint32_t)rd16(p + 2) << 16; }

static void send_reply(uint32_t ip, uint16_t port, uint32_t req_id, uint8_t status,
                       const uint8_t *value, uint16_t vlen)
{
    uint8_t *r = kv.reply;
    uint32_t magic = KV_REPLY_MAGIC;
    memcpy(r, &magic, 4);
    memcpy(r + 4, &req_id, 4);
    r[8] = status;
    r[9] = 0;
    memcpy(r + 10, &vlen, 2);
    if (vlen)
        memcpy(r + KV_REPLY_HEADER, value, vlen);
    net_udp_send(&kv.nif, ip, kv.port, port, r, KV_REPLY_HEADER + (size_t)vlen);
}

static int progress(void);
static void drain_one(void);
static void stage_put(uint32_t ip, uint16_t port, uint32_t req_id, const uint8_t *key,
                      uint16_t klen, const uint8_t *value, uint16_t vlen, int durable);

static void answer_get(uint32_t ip, uint16_t port, uint32_t req_id, const uint8_t *key,
                       uint16_t klen)
{
    volatile struct kv_report *rep = report();
    const struct kv_slot *s = kv_table_get(&kv.table, key, klen);
    rep->gets++;
    stats_slot(0)->w[2] = rep->gets;
    if (s)
        send_reply(ip, port, req_id, KV_OK, s->value, s->vlen);
    else
        send_reply(ip, port, req_id, KV_NOT_FOUND, NULL, 0);
}

static void answer_stats(uint32_t ip, uint16_t port, uint32_t req_id)
{
    volatile struct kv_report *rep = report();
    uint64_t v[8] = {rep->requests, rep->puts,      rep->gets,         rep->log_bytes,
                     rep->entries,  rep->io_errors, rep->bad_requests, rep->replay_records};
    send_reply(ip, port, req_id, KV_OK, (const uint8_t *)v, sizeof(v));
}

static int pending_anything(void)
{
    return kv.open->n || kv.log.busy;
}

static void handle(void *ctx, uint32_t src_ip, uint16_t src_port, const uint8_t *d, size_t len)
{
    (void)ctx;
    volatile struct kv_report *rep = report();
    volatile struct vcpu_stats *st = stats_slot(0);
    if (len < KV_REQ_HEADER || rd32(d) != KV_REQ_MAGIC)
        return; /* not a kv request: no reply */
    rep->requests++;
    st->w[0] = rep->requests;
    uint32_t req_id = rd32(d + 4);
    uint8_t op = d[8], flags = d[9];
    uint16_t klen = rd16(d + 10), vlen = rd16(d + 12), reserved = rd16(d + 14);
    const uint8_t *key = d + KV_REQ_HEADER, *value = key + klen;
    int valid = reserved == 0 && (flags & ~KV_FLAG_DURABLE) == 0 && klen <= KV_MAX_KEY &&
                vlen <= KV_MAX_VALUE && len == (size_t)KV_REQ_HEADER + klen + vlen &&
                (op == KV_OP_PUT || ((op == KV_OP_GET || op == KV_OP_STATS) && vlen == 0));
    if (!valid) {
        rep->bad_requests++;
        st->w[4] = rep->bad_requests;
        send_reply(src_ip, src_port, req_id, KV_BAD_REQUEST, NULL, 0);
        return;
    }
    if (op == KV_OP_PUT) {
        stage_put(src_ip, src_port, req_id, key, klen, value, vlen, flags & KV_FLAG_DURABLE);
        return;
    }
    if (!pending_anything()) { /* nothing before it is unfinished: answer now */
        if (op == KV_OP_GET)
            answer_get(src_ip, src_port, req_id, key, klen);
        else
            answer_stats(src_ip, src_port, req_id);
        return;
    }
    if (kv.open->n >= OPS_MAX)
        drain_one();
    struct op *o = &kv.open->ops[kv.open->n++];
    *o = (struct op){.ip = src_ip, .req_id = req_id, .port = src_port, .kind = op,
                     .klen = (uint8_t)klen};
    memcpy(o->key, key, klen);
}

/* Carry out a finished batch's ops in arrival order; ok: its log write succeeded.  The
 * records are read from the log batch, `open_batch` says which (see kv_log_record). */
static void finish(struct batch_ops *b, int ok, int open_batch)
{
    volatile struct kv_report *rep = report();
    volatile struct vcpu_stats *st = stats_slot(0);
    for (uint32_t i = 0; i < b->n; i++) {
        const struct op *o = &b->ops[i];
        if (o->kind == KV_OP_GET) {
            answer_get(o->ip, o->port, o->req_id, o->key, o->klen);
            continue;
        }
        if (o->kind == KV_OP_STATS) {
            answer_stats(o->ip, o->port, o->req_id);
            continue;
        }
        if (!ok) {
            rep->io_errors++;
            send_reply(o->ip, o->port, o->req_id, KV_IO_ERROR, NULL, 0);
            continue;
        }
        const uint8_t *rec = kv_log_record(&kv.log, open_batch, o->rec_off);
        uint16_t klen = rd16(rec + 16), vlen = rd16(rec + 18);
        const uint8_t *key = rec + KV_LOG_RECORD_HEADER;
        kv_table_put(&kv.table, key, klen, key + klen, vlen); /* room checked at staging */
        rep->puts++;
        send_reply(o->ip, o->port, o->req_id, KV_OK, NULL, 0);
    }
    b->n = 0;
    b->new_keys = 0;
    rep->log_bytes = kv.log.appended_bytes;
    rep->entries = kv.table.count;
    report_log();
    st->w[1] = rep->puts;
    st->w[3] = rep->log_bytes;
    st->w[5] = rep->io_errors;
}

/* Finish the batch in flight if the disk is done with it; then, if no batch is in flight,
 * submit the open one.  Returns nonzero if anything happened. */
static int progress(void)
{
    int status, did = 0;
    if (kv_log_poll(&kv.log, &status)) {
        finish(kv.flight, status == VIRTIO_BLK_S_OK, 0);
        did = 1;
    }
    if (kv.log.busy || kv.open->n == 0)
        return did;
    int r = kv_log_submit(&kv.log);
    if (r == KV_LOG_NOTHING) { /* only GETs and STATS: nothing to wait for */
        finish(kv.open, 1, 1);
        return 1;
    }
    struct batch_ops *t = kv.flight;
    kv.flight = kv.open;
    kv.open = t;
    stats_slot(0)->w[9] = ++kv.commits;
    if (r != KV_LOG_SUBMITTED) /* could not even be submitted: the batch failed */
        finish(kv.flight, 0, 0);
    return 1;
}

/* Block until the batch in flight is done, then submit the open batch. */
static void drain_one(void)
{
    if (kv.log.busy)
        finish(kv.flight, kv_log_wait(&kv.log) == VIRTIO_BLK_S_OK, 0);
    progress();
}

static void stage_put(uint32_t ip, uint16_t port, uint32_t req_id, const uint8_t *key,
                      uint16_t klen, const uint8_t *value, uint16_t vlen, int durable)
{
    /* room in the table for this key, counting the new keys already staged or in flight
     * (conservatively: a key staged twice counts twice) */
    int known = kv_table_get(&kv.table, key, klen) != NULL;
    uint32_t staged_new = kv.open->new_keys + (kv.log.busy ? kv.flight->new_keys : 0);
    while (!known && kv.table.count + staged_new >= kv.table.limit && pending_anything()) {
        drain_one();
        staged_new = kv.open->new_keys + (kv.log.busy ? kv.flight->new_keys : 0);
    }
    if (kv.open->n >= OPS_MAX)
        drain_one();
    int room = known || kv.table.count + staged_new < kv.table.limit;
    uint32_t off = 0;
    int r = room ? kv_log_stage(&kv.log, key, klen, value, vlen, durable, &off)
                 : KV_LOG_NO_ROOM;
    while (r == KV_LOG_BATCH_FULL && pending_anything()) {
        drain_one();
        r = kv_log_stage(&kv.log, key, klen, value, vlen, durable, &off);
    }
    if (r != KV_LOG_STAGED) {
        volatile struct kv_report *rep = report();
        rep->io_errors++;
        stats_slot(0)->w[5] = rep->io_errors;
        send_reply(ip, port, req_id, KV_IO_ERROR, NULL, 0);
        return;
    }
    struct op *o = &kv.open->ops[kv.open->n++];
    *o = (struct op){.ip = ip, .req_id = req_id, .rec_off = off, .port = port,
                     .kind = KV_OP_PUT};
    kv.open->new_keys += !known;
}

static int kv_run(unsigned cpu, const struct boot_info *bi)
{
    (void)bi;
    if (cpu != 0)
        return EXIT_OK;
    volatile struct vcpu_stats *st = stats_slot(0);
    net_udp_bind(&kv.nif, kv.port, handle, NULL);
    net_announce(&kv.nif);

    uint64_t spin = us_to_tsc(kv.spin_us), second = ms_to_tsc(1000);
    uint64_t prev = rdtsc(), last_work = prev, next_hb = prev + second, max_gap = 0;
    uint64_t iterations = 0, halts = 0, hb = 0;
    virtio_net_hold_tx(&kv.nic, 1); /* one TX notification per pass, not per reply */
    for (;;) {
        uint64_t now = rdtsc();
        if (now - prev > max_gap) {
            max_gap = now - prev;
            st->max_gap_tsc = max_gap;
        }
        prev = now;
        st->iterations = ++iterations;
        st->last_tsc = now;

        unsigned got = 0, n;
        while (got < PASS_FRAMES && (n = net_poll(&kv.nif, 64)) > 0)
            got += n;
        got += (unsigned)progress();
        virtio_net_flush_tx(&kv.nic);
        if (got) {
            last_work = rdtsc();
            st->w[6] = kv.nif.stats.rx_frames;
            st->w[7] = kv.nif.stats.tx_frames;
            continue;
        }
        if (now >= next_hb) {
            hc_heartbeat(++hb);
            next_hb = now + second;
        }
        if (now - last_work < spin) {
            cpu_pause();
            continue;
        }
        st->w[8] = ++halts;
        hc_halt(HALT_US); /* poll mode: nothing to acknowledge, the rings say what happened */
        prev = rdtsc(); /* a halt we chose is not a pause the guest suffered */
        last_work = prev;
    }
}

const struct workload workload_kv = {
    .name = "kv",
    .usage = "kv ip=A.B.C.D mask=N gw=A.B.C.D port=7000 entries=N (default: by RAM) spin=US "
             "log=SIZE (default: the disk)",
    .keys = kv_keys,
    .setup = kv_setup,
    .run = kv_run,
};
