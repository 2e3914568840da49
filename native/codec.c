/* Block codecs for compressed clusters and grains. Each libuv worker thread keeps its own contexts,
 * so batches compress in parallel without locking or per-call allocation. */
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>
#include "ferry_native.h"

static __thread ZSTD_CCtx *zstd_cctx;
static __thread ZSTD_DCtx *zstd_dctx;

static long deflate_block(int window_bits, int level, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap) {
  z_stream s;
  memset(&s, 0, sizeof s);
  if (deflateInit2(&s, level, Z_DEFLATED, window_bits, 9, Z_DEFAULT_STRATEGY) != Z_OK) return -1;
  s.next_in = (Bytef *)src;
  s.avail_in = (uInt)src_len;
  s.next_out = dst;
  s.avail_out = (uInt)dst_cap;
  int rc = deflate(&s, Z_FINISH);
  long out = (long)s.total_out;
  deflateEnd(&s);
  if (rc == Z_STREAM_END) return out;
  return rc == Z_OK || rc == Z_BUF_ERROR ? 0 : -1;
}

static long zstd_block(int level, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap) {
  if (!zstd_cctx && !(zstd_cctx = ZSTD_createCCtx())) return -1;
  ZSTD_CCtx_reset(zstd_cctx, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(zstd_cctx, ZSTD_c_compressionLevel, level);
  size_t n = ZSTD_compress2(zstd_cctx, dst, dst_cap, src, src_len);
  if (ZSTD_isError(n)) return ZSTD_getErrorCode(n) == ZSTD_error_dstSize_tooSmall ? 0 : -1;
  return (long)n;
}

long ferry_compress(int codec, int level, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_cap) {
  switch (codec) {
    case FERRY_CODEC_ZSTD:
      return zstd_block(level, src, src_len, dst, dst_cap);
    case FERRY_CODEC_ZLIB:
      return deflate_block(15, level, src, src_len, dst, dst_cap);
    default:
      /* Raw deflate with a 4 KiB window, as qcow2 readers expect (no zlib header). */
      return deflate_block(-12, level, src, src_len, dst, dst_cap);
  }
}

static int inflate_block(int window_bits, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  z_stream s;
  memset(&s, 0, sizeof s);
  if (inflateInit2(&s, window_bits) != Z_OK) return -1;
  s.next_in = (Bytef *)src;
  s.avail_in = (uInt)src_len;
  s.next_out = dst;
  s.avail_out = (uInt)dst_len;
  int rc = inflate(&s, Z_FINISH);
  int full = s.avail_out == 0;
  inflateEnd(&s);
  return (rc == Z_STREAM_END || rc == Z_BUF_ERROR || rc == Z_OK) && full ? 0 : -1;
}

static int zstd_decompress_block(const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  if (!zstd_dctx && !(zstd_dctx = ZSTD_createDCtx())) return -1;
  ZSTD_DCtx_reset(zstd_dctx, ZSTD_reset_session_only);
  ZSTD_inBuffer in = {src, src_len, 0};
  ZSTD_outBuffer out = {dst, dst_len, 0};
  /* Stop as soon as the cluster is full: the bytes after the frame are sector padding. */
  while (out.pos < out.size) {
    size_t before_in = in.pos, before_out = out.pos;
    size_t rc = ZSTD_decompressStream(zstd_dctx, &out, &in);
    if (ZSTD_isError(rc)) return -1;
    if (rc == 0 && out.pos < out.size) return -1; /* frame ended short */
    if (in.pos == before_in && out.pos == before_out) return -1; /* no progress: truncated input */
  }
  return 0;
}

int ferry_decompress(int codec, const uint8_t *src, size_t src_len, uint8_t *dst, size_t dst_len) {
  switch (codec) {
    case FERRY_CODEC_ZSTD:
      return zstd_decompress_block(src, src_len, dst, dst_len);
    case FERRY_CODEC_ZLIB:
      return inflate_block(15, src, src_len, dst, dst_len);
    default:
      /* A 32 KiB window decodes raw streams written with any smaller window. */
      return inflate_block(-15, src, src_len, dst, dst_len);
  }
}
