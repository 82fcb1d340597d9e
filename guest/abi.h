/*
 * abi.h - the contract between the ptmig VMM and the guest firmware.
 *
 * Every number in docs/GUEST_ABI.md lives here and in ptmig/layout.py, nowhere else; a test
 * compares the two.  Keep the constants as plain `#define NAME value` lines (no suffixes,
 * no expressions) so that the test can read them.
 *
 * All structures are little-endian and packed by construction: every field is naturally
 * aligned and every hole is an explicit padding field, so the VMM can describe them with
 * fixed offsets.  The _Static_assert lines pin the sizes and offsets the VMM relies on.
 */
#ifndef PTMIG_ABI_H
#define PTMIG_ABI_H

/* ---- guest-physical layout ---------------------------------------------------------- */
#define ABI_PML4_GPA 0x1000
#define ABI_BOOT_INFO_GPA 0x8000
#define ABI_MAILBOX_GPA 0x9000
#define ABI_MAILBOX_SIZE 256
#define ABI_STATS_GPA 0xA000
#define ABI_STATS_SLOT_SIZE 128
#define ABI_WORKLOAD_STATS_GPA 0xA800
#define ABI_FW_LOAD_GPA 0x200000
#define ABI_FW_MAX_SIZE 0x200000
#define ABI_STACK_BASE_GPA 0x400000
#define ABI_STACK_SIZE 0x10000
#define ABI_HEAP_START_GPA 0x600000
#define ABI_MMIO_BASE_GPA 0xD0000000
#define ABI_MMIO_STRIDE 0x1000
#define ABI_MAX_VCPUS 16
#define ABI_MAX_DEVICES 8
#define ABI_MAX_RAM_REGIONS 4
#define ABI_LOW_RAM_MAX 0xC0000000
#define ABI_HIGH_RAM_GPA 0x100000000
#define ABI_PD_HIGH_GPA 0x104000

/* ---- ports ---------------------------------------------------------------------------- */
#define ABI_PORT_CONSOLE 0x3f8
#define ABI_PORT_HYPERCALL 0x500

/* ---- hypercall numbers (written as a 32-bit value to ABI_PORT_HYPERCALL) --------------- */
#define HC_EXIT 1
#define HC_HALT 2
#define HC_CONSOLE 3
#define HC_HEARTBEAT 4

/* ---- magics ---------------------------------------------------------------------------- */
#define BOOT_INFO_MAGIC 0x31494247494d5450 /* "PTMIGBI1" little-endian */
#define FW_HEADER_MAGIC 0x31574647494d5450 /* "PTMIGFW1" */
#define VCPU_STATS_MAGIC 0x5354415453555043 /* "CPUSTATS" */
#define DIRTY_REPORT_MAGIC 0x3150525954524944 /* "DIRTYRP1": struct dirty_report */
#define STOREBW_REPORT_MAGIC 0x3150455257425453 /* "STBWREP1": struct storebw_report */
#define KV_REPORT_MAGIC 0x31504552564b4d50 /* "PMKVREP1": struct kv_report */

/* ---- versions and sizes derived from the structures below ------------------------------- */
#define FW_HEADER_VERSION 1
#define FW_HEADER_SIZE 48
#define BOOT_INFO_VERSION 2
#define BOOT_INFO_CMDLINE_SIZE 1024
#define ABI_WORKLOAD_AREA_SIZE 2048
#define ABI_PAGE_SIZE 4096

#ifndef __ASSEMBLER__

#include <stdint.h>

/*
 * struct fw_header - offset 0 of the flat firmware image (section .fw_header, placed first
 * by guest/link.ld).  The VMM reads it to know where to load the image and where to start.
 */
struct fw_header {
    uint64_t magic;       /* FW_HEADER_MAGIC */
    uint32_t version;     /* FW_HEADER_VERSION */
    uint32_t header_size; /* sizeof(struct fw_header) == FW_HEADER_SIZE */
    uint64_t load_gpa;    /* GPA of byte 0 of the image: ABI_FW_LOAD_GPA */
    uint64_t entry;       /* rip of vCPU 0 (symbol _start) */
    uint64_t entry_ap;    /* rip of every other vCPU (symbol _start_ap) */
    uint64_t image_end;   /* GPA just past .bss: the VMM must leave [load_gpa, image_end) zero
                             beyond the file's bytes and must not put anything else there */
};

/* One virtio-mmio device the VMM attached (boot_info.devices[i]). */
struct boot_device {
    uint64_t mmio_gpa;         /* base GPA of its virtio-mmio register window */
    uint32_t mmio_size;        /* size of that window in bytes (ABI_MMIO_STRIDE) */
    uint32_t virtio_device_id; /* 1 = net, 2 = block, as in the virtio spec */
};

/* One region of guest RAM (boot_info.ram[i]): GPAs [gpa, gpa + size). */
struct ram_region {
    uint64_t gpa;
    uint64_t size;
};

/*
 * struct boot_info - the boot-info page at ABI_BOOT_INFO_GPA, written by the VMM.  RAM is
 * ram[0] = [0, mem_size) (at most ABI_LOW_RAM_MAX, below the MMIO windows) and, for a guest
 * with more RAM, ram[1] from ABI_HIGH_RAM_GPA up; the page tables map all of it.
 */
struct boot_info {
    uint64_t magic;      /* BOOT_INFO_MAGIC */
    uint32_t version;    /* BOOT_INFO_VERSION */
    uint32_t nr_vcpus;   /* number of vCPUs started, 1..ABI_MAX_VCPUS */
    uint64_t mem_size;   /* bytes of RAM from GPA 0 (the size of ram[0]) */
    uint64_t tsc_khz;    /* TSC frequency in kHz (0 if unknown; the guest then assumes 1 GHz) */
    uint64_t heap_start; /* first GPA the workload may use (ABI_HEAP_START_GPA) */
    uint32_t nr_devices; /* valid entries in devices[], 0..ABI_MAX_DEVICES */
    uint32_t nr_ram;     /* valid entries in ram[], 1..ABI_MAX_RAM_REGIONS, ascending GPAs */
    struct boot_device devices[ABI_MAX_DEVICES];
    char cmdline[BOOT_INFO_CMDLINE_SIZE]; /* "workload key=value ...", NUL-terminated */
    struct ram_region ram[ABI_MAX_RAM_REGIONS];
};

/*
 * struct hc_mailbox - one per vCPU at ABI_MAILBOX_GPA + ABI_MAILBOX_SIZE * cpu.  The guest
 * fills nr and args, writes nr to ABI_PORT_HYPERCALL; the VMM handles the exit synchronously
 * and writes ret before the vCPU resumes.
 */
struct hc_mailbox {
    uint64_t nr;      /* hypercall number (same value as written to the port) */
    uint64_t args[6]; /* arguments, see the hypercall table in docs/GUEST_ABI.md */
    uint64_t ret;     /* return value, written by the VMM */
    uint8_t pad[ABI_MAILBOX_SIZE - 64];
};

/*
 * struct vcpu_stats - one 128-byte slot per vCPU at ABI_STATS_GPA + ABI_STATS_SLOT_SIZE * cpu,
 * written only by that vCPU; the VMM and the tests read it.
 */
struct vcpu_stats {
    uint64_t magic;         /* VCPU_STATS_MAGIC once the slot is initialised */
    uint64_t iterations;    /* loop iterations of the running workload */
    uint64_t max_gap_tsc;   /* longest TSC gap between two consecutive loop iterations */
    uint64_t last_tsc;      /* TSC at the last iteration */
    uint64_t pages_written; /* pages written by this vCPU (dirty workload) */
    uint64_t hb;            /* heartbeat counter (last value sent with HC_HEARTBEAT) */
    uint64_t w[10];         /* workload-specific counters (see each workload) */
};

/*
 * struct dirty_report - the dirty workload's ground truth, at ABI_WORKLOAD_STATS_GPA.
 * bitmap: 1 bit per 4 KiB page of guest-physical memory up to the end of RAM (bit n of byte
 * n/8 is page n; the MMIO gap's bits stay clear), set for every page the workload wrote.  The
 * working set is ws_pages pages of RAM from ws_gpa, continuing at the next RAM region where
 * one ends.  magic is written last, once the other fields are valid.
 */
struct dirty_report {
    uint64_t magic;        /* DIRTY_REPORT_MAGIC */
    uint64_t bitmap_gpa;   /* GPA of the ground-truth bitmap (boot_info.heap_start) */
    uint64_t bitmap_bytes; /* its size in bytes (end of RAM / 4096 / 8, rounded up to 8) */
    uint64_t ws_gpa;       /* GPA of the working set (page aligned, after the bitmap) */
    uint64_t ws_pages;     /* pages in the working set */
    uint64_t pass;         /* passes completed by vCPU 0 */
};

/* struct storebw_report - the storebw workload's result, at ABI_WORKLOAD_STATS_GPA. */
struct storebw_report {
    uint64_t magic;  /* STOREBW_REPORT_MAGIC, written last */
    uint64_t size;   /* bytes per pass */
    uint64_t passes; /* passes */
    uint64_t bytes;  /* size * passes */
    uint64_t ticks;  /* TSC ticks for all passes */
    uint64_t tsc_khz;
};

/*
 * struct kv_report - the kv workload's report, at ABI_WORKLOAD_STATS_GPA: log replay results
 * (written once, before magic) and live operation counters (updated after every request).
 */
struct kv_report {
    uint64_t magic;           /* KV_REPORT_MAGIC, written once replay is done */
    uint64_t replay_records;  /* valid log records replayed at start */
    uint64_t replay_bytes;    /* log bytes they occupy (the log end, from the first record) */
    uint64_t replay_last_seq; /* sequence number of the last replayed record (0: none) */
    uint64_t replay_stop;     /* why replay stopped: KV_REPLAY_* */
    uint64_t formatted;       /* 1 if the disk had no log and was formatted */
    uint64_t requests;        /* datagrams with the request magic */
    uint64_t puts;            /* PUTs acknowledged OK */
    uint64_t gets;            /* GETs answered (OK or NOT_FOUND) */
    uint64_t log_bytes;       /* bytes appended to the log since start */
    uint64_t entries;         /* keys in the table */
    uint64_t io_errors;       /* requests answered IO_ERROR */
    uint64_t bad_requests;    /* requests answered BAD_REQUEST */
    uint64_t log_area_bytes;  /* size of each of the log's two areas */
    uint64_t log_active;      /* the area appended to (0 or 1) */
    uint64_t log_first_seq;   /* seq of its first record (a checkpoint's, after one) */
    uint64_t checkpoints;     /* checkpoints written since start */
    uint64_t checkpoint_bytes; /* their record bytes */
    uint64_t checkpoint_us;    /* their time, in us: the kv loop serves nothing meanwhile */
    uint64_t checkpoint_max_us; /* the longest one's */
};

#define KV_REPLAY_END 0       /* an all-zero record header: the clean end of the log */
#define KV_REPLAY_BAD_MAGIC 1 /* a record header with the wrong magic */
#define KV_REPLAY_BAD_LEN 2   /* a record whose lengths are impossible */
#define KV_REPLAY_BAD_CRC 3   /* a record whose CRC-32 does not match */
#define KV_REPLAY_BAD_SEQ 4   /* a record whose seq is not the previous one + 1 */
#define KV_REPLAY_IO_ERROR 5  /* the disk failed a read */
#define KV_REPLAY_DISK_END 6  /* the log reaches the end of its area */
#define KV_REPLAY_TABLE_FULL 7 /* the in-memory table could not hold another key */

_Static_assert(sizeof(struct fw_header) == FW_HEADER_SIZE, "fw_header size");
_Static_assert(sizeof(struct boot_device) == 16, "boot_device size");
_Static_assert(__builtin_offsetof(struct boot_info, devices) == 48, "boot_info.devices");
_Static_assert(__builtin_offsetof(struct boot_info, cmdline) == 176, "boot_info.cmdline");
_Static_assert(__builtin_offsetof(struct boot_info, ram) == 1200, "boot_info.ram");
_Static_assert(sizeof(struct boot_info) == 1200 + 16 * ABI_MAX_RAM_REGIONS, "boot_info size");
_Static_assert(sizeof(struct hc_mailbox) == ABI_MAILBOX_SIZE, "hc_mailbox size");
_Static_assert(__builtin_offsetof(struct hc_mailbox, ret) == 56, "hc_mailbox.ret");
_Static_assert(sizeof(struct vcpu_stats) == ABI_STATS_SLOT_SIZE, "vcpu_stats size");
_Static_assert(ABI_STATS_GPA + ABI_MAX_VCPUS * ABI_STATS_SLOT_SIZE == ABI_WORKLOAD_STATS_GPA,
               "workload area follows the stats slots");
_Static_assert(sizeof(struct dirty_report) <= ABI_WORKLOAD_AREA_SIZE, "dirty_report size");
_Static_assert(sizeof(struct kv_report) == 20 * 8, "kv_report size");

#endif /* __ASSEMBLER__ */
#endif /* PTMIG_ABI_H */
