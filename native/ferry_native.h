#ifndef FERRY_NATIVE_H
#define FERRY_NATIVE_H
#include <stddef.h>
#include <stdint.h>

uint32_t ferry_crc32c(uint32_t crc, const uint8_t *p, size_t n);

/* DEFLATE: raw deflate (qcow2); ZLIB: deflate with the zlib header and checksum (VMDK grains). */
enum ferry_codec { FERRY_CODEC_DEFLATE = 0, FERRY_CODEC_ZSTD = 1, FERRY_CODEC_ZLIB = 2 };

/* Compresses src into dst (capacity dst_cap). Returns the compressed length, 0 when the result
 * would not fit in dst_cap (the caller stores the block uncompressed), or -1 on an internal error. */
long ferry_compress(int codec, int level, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap);

/* Decompresses src until dst is full, tolerating trailing padding after the stream (qcow2 rounds
 * compressed clusters up to sectors). Returns 0 on success, -1 when the data is corrupt or short. */
int ferry_decompress(int codec, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len);

#endif
