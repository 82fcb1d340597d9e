/*
 * pagescan.c - the passes over guest pages a migration makes besides sending them, in C:
 * which pages are zero (ptmig/migration/pages.py `nonzero_pages`, the source's every batch),
 * the page digest of ptmig/migration/verify.py (x-verify, both ends), and the destination's
 * scatter of a gathered batch into RAM with its digests (verify.py `scatter_pages`).  The
 * numpy code in those modules is the reference; these give the same answers, outside the GIL.
 *
 * The digest, one pass per page:
 * verify.py defines the digest and keeps the numpy implementation as the reference: for the
 * 64-bit words w[i] of a page, t = (w[i] ^ key[i]) * M1; t ^= t >> 31; the terms are summed
 * mod 2^64 and the sum is finalised by h ^= h >> 33; h *= M2; h ^= h >> 29; h *= M3;
 * h ^= h >> 32.  numpy makes five passes over each chunk of pages (xor, multiply, shift, xor,
 * sum) with a temporary the size of the chunk; here each word is read once and the terms stay
 * in registers.  The result is the same number: the stream and a peer running the reference
 * see no difference.
 *
 * Zero pages: a page is read a cache line at a time until a non-zero byte shows (most pages
 * that hold data: in their first line); only a zero page is read whole.  numpy first gathers
 * the first word of each page, then scans the doubtful pages whole, through temporaries.
 *
 * Pages are read through memcpy (the compiler turns it into plain loads): guest RAM is
 * page-aligned, a test's buffer need not be.  The caller has checked the page numbers; they
 * are checked again here, and a bad one fails the whole call (-1) before anything is read.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define M1 0x9E3779B97F4A7C15ULL
#define M2 0xBF58476D1CE4E5B9ULL
#define M3 0x94D049BB133111EBULL

static uint64_t digest_one(const unsigned char *page, const uint64_t *keys, size_t words)
{
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= words; i += 4) {
        uint64_t w[4];
        memcpy(w, page + i * 8, sizeof(w));
        uint64_t t0 = (w[0] ^ keys[i]) * M1;
        uint64_t t1 = (w[1] ^ keys[i + 1]) * M1;
        uint64_t t2 = (w[2] ^ keys[i + 2]) * M1;
        uint64_t t3 = (w[3] ^ keys[i + 3]) * M1;
        s0 += t0 ^ (t0 >> 31);
        s1 += t1 ^ (t1 >> 31);
        s2 += t2 ^ (t2 >> 31);
        s3 += t3 ^ (t3 >> 31);
    }
    for (; i < words; i++) {
        uint64_t w;
        memcpy(&w, page + i * 8, sizeof(w));
        uint64_t t = (w ^ keys[i]) * M1;
        s0 += t ^ (t >> 31);
    }
    uint64_t h = s0 + s1 + s2 + s3;
    h ^= h >> 33;
    h *= M2;
    h ^= h >> 29;
    h *= M3;
    h ^= h >> 32;
    return h;
}

/*
 * The digests of `count` pages of `words` 64-bit words each, of the memory at `base`
 * (`npages` pages), into out[0..count): page idx[j] when `idx` is given, else page first + j.
 * Returns 0, or -1 (nothing written) when a page lies outside the memory.
 */
int page_digests(const unsigned char *base, uint64_t npages, uint64_t words,
                 const uint64_t *keys, const int64_t *idx, uint64_t first, uint64_t count,
                 uint64_t *out)
{
    size_t page_size = (size_t)words * 8;
    if (idx == NULL) {
        if (first > npages || count > npages - first)
            return -1;
        for (uint64_t j = 0; j < count; j++)
            out[j] = digest_one(base + (size_t)(first + j) * page_size, keys, words);
        return 0;
    }
    for (uint64_t j = 0; j < count; j++)
        if (idx[j] < 0 || (uint64_t)idx[j] >= npages)
            return -1;
    for (uint64_t j = 0; j < count; j++)
        out[j] = digest_one(base + (size_t)idx[j] * page_size, keys, words);
    return 0;
}

static int page_nonzero(const unsigned char *page, size_t words)
{
    size_t i = 0;
    for (; i + 8 <= words; i += 8) {
        uint64_t w[8];
        memcpy(w, page + i * 8, sizeof(w));
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7])
            return 1;
    }
    for (; i < words; i++) {
        uint64_t w;
        memcpy(&w, page + i * 8, sizeof(w));
        if (w)
            return 1;
    }
    return 0;
}

/*
 * For each of the `count` pages idx[j] of the memory at `base` (`npages` pages of `words`
 * 64-bit words), out[j] = 1 if it has a non-zero byte, else 0.  Returns 0, or -1 (nothing
 * written) when a page lies outside the memory.
 */
int pages_nonzero(const unsigned char *base, uint64_t npages, uint64_t words,
                  const int64_t *idx, uint64_t count, unsigned char *out)
{
    size_t page_size = (size_t)words * 8;
    for (uint64_t j = 0; j < count; j++)
        if (idx[j] < 0 || (uint64_t)idx[j] >= npages)
            return -1;
    for (uint64_t j = 0; j < count; j++)
        out[j] = (unsigned char)page_nonzero(base + (size_t)idx[j] * page_size, words);
    return 0;
}

/*
 * The destination's scatter of a gathered batch: page j of `src` (count pages, packed) to page
 * idx[j] of the memory at `base`, and, with `out`, its digest into out[j], taken from `src`
 * while it is in the cache rather than from guest RAM afterwards (one read of RAM fewer per
 * page).  Returns 0, or -1 (nothing written) when a page lies outside the memory.
 */
int pages_scatter(unsigned char *base, uint64_t npages, uint64_t words, const uint64_t *keys,
                  const unsigned char *src, const int64_t *idx, uint64_t count, uint64_t *out)
{
    size_t page_size = (size_t)words * 8;
    for (uint64_t j = 0; j < count; j++)
        if (idx[j] < 0 || (uint64_t)idx[j] >= npages)
            return -1;
    for (uint64_t j = 0; j < count; j++) {
        const unsigned char *page = src + (size_t)j * page_size;
        if (out != NULL)
            out[j] = digest_one(page, keys, words);
        memcpy(base + (size_t)idx[j] * page_size, page, page_size);
    }
    return 0;
}
