/* XXH64, written from the algorithm description in the xxHash specification (doc/xxhash_spec.md,
 * "XXH64 Algorithm Description"): a fast non-cryptographic 64-bit hash.
 *
 * Header-only on purpose: the addon (Ferry side) and the capture agent (source side, a separate static
 * binary) include this one definition, so the two ends of a capture can never disagree on a chunk's hash. */
#ifndef FERRY_XXH64_H
#define FERRY_XXH64_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define FERRY_XXH_P1 0x9E3779B185EBCA87ULL
#define FERRY_XXH_P2 0xC2B2AE3D27D4EB4FULL
#define FERRY_XXH_P3 0x165667B19E3779F9ULL
#define FERRY_XXH_P4 0x85EBCA77C2B2AE63ULL
#define FERRY_XXH_P5 0x27D4EB2F165667C5ULL

static inline uint64_t ferry_xxh_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* The specification reads lanes as little-endian words. */
static inline uint64_t ferry_xxh_read64(const uint8_t *p) {
  return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 |
         (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

static inline uint32_t ferry_xxh_read32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t ferry_xxh_round(uint64_t acc, uint64_t lane) {
  acc += lane * FERRY_XXH_P2;
  acc = ferry_xxh_rotl(acc, 31);
  return acc * FERRY_XXH_P1;
}

static inline uint64_t ferry_xxh_merge(uint64_t acc, uint64_t lane_acc) {
  acc ^= ferry_xxh_round(0, lane_acc);
  return acc * FERRY_XXH_P1 + FERRY_XXH_P4;
}

static inline uint64_t ferry_xxh64(const uint8_t *p, size_t len, uint64_t seed) {
  const uint8_t *end = p + len;
  uint64_t acc;
  if (len >= 32) {
    uint64_t v1 = seed + FERRY_XXH_P1 + FERRY_XXH_P2, v2 = seed + FERRY_XXH_P2, v3 = seed, v4 = seed - FERRY_XXH_P1;
    const uint8_t *limit = end - 32;
    do {
      v1 = ferry_xxh_round(v1, ferry_xxh_read64(p));
      v2 = ferry_xxh_round(v2, ferry_xxh_read64(p + 8));
      v3 = ferry_xxh_round(v3, ferry_xxh_read64(p + 16));
      v4 = ferry_xxh_round(v4, ferry_xxh_read64(p + 24));
      p += 32;
    } while (p <= limit);
    acc = ferry_xxh_rotl(v1, 1) + ferry_xxh_rotl(v2, 7) + ferry_xxh_rotl(v3, 12) + ferry_xxh_rotl(v4, 18);
    acc = ferry_xxh_merge(acc, v1);
    acc = ferry_xxh_merge(acc, v2);
    acc = ferry_xxh_merge(acc, v3);
    acc = ferry_xxh_merge(acc, v4);
  } else {
    acc = seed + FERRY_XXH_P5;
  }
  acc += (uint64_t)len;
  while (end - p >= 8) {
    acc ^= ferry_xxh_round(0, ferry_xxh_read64(p));
    acc = ferry_xxh_rotl(acc, 27) * FERRY_XXH_P1 + FERRY_XXH_P4;
    p += 8;
  }
  if (end - p >= 4) {
    acc ^= (uint64_t)ferry_xxh_read32(p) * FERRY_XXH_P1;
    acc = ferry_xxh_rotl(acc, 23) * FERRY_XXH_P2 + FERRY_XXH_P3;
    p += 4;
  }
  while (p < end) {
    acc ^= (uint64_t)(*p) * FERRY_XXH_P5;
    acc = ferry_xxh_rotl(acc, 11) * FERRY_XXH_P1;
    p++;
  }
  acc ^= acc >> 33;
  acc *= FERRY_XXH_P2;
  acc ^= acc >> 29;
  acc *= FERRY_XXH_P3;
  acc ^= acc >> 32;
  return acc;
}

/* Stores a hash as 8 little-endian bytes: the wire and journal order on both ends. */
static inline void ferry_put_le64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

#endif
