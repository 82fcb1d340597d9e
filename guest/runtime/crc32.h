/*
 * crc32.h - CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, as zlib's crc32()).  Pure.
 */
#ifndef PTMIG_RUNTIME_CRC32_H
#define PTMIG_RUNTIME_CRC32_H

#include <stddef.h>
#include <stdint.h>

/* crc32(0, data, len) starts a CRC; pass the previous result to continue it. */
uint32_t crc32(uint32_t crc, const void *data, size_t len);

#endif
