/* Ferry's native helpers: the few things Node 20 cannot do, or cannot do fast enough, from JavaScript.
 * - sparse-file extents (SEEK_DATA/SEEK_HOLE) and hole punching
 * - read + zero detection in one thread-pool task, so the data is scanned while still in cache
 * - batch compression/decompression of clusters off the main thread (zlib, zstd)
 * - CRC-32C
 * Every async call returns a promise and does all its work in one libuv worker task, so callers
 * pay one promise per multi-megabyte batch, never one per block. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <node_api.h>
#include "ferry_native.h"

#define CHECK(call)                                                          \
  do {                                                                       \
    if ((call) != napi_ok) {                                                 \
      napi_throw_error(env, "ERR_FERRY_NATIVE", "native call failed: " #call); \
      return NULL;                                                           \
    }                                                                        \
  } while (0)

static int64_t arg_i64(napi_env env, napi_value v) {
  int64_t out = 0;
  napi_get_value_int64(env, v, &out);
  return out;
}

static int arg_buffer(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  bool is_typed = false;
  napi_is_typedarray(env, v, &is_typed);
  if (is_typed) {
    napi_typedarray_type t;
    size_t n, off;
    napi_value ab;
    void *p;
    if (napi_get_typedarray_info(env, v, &t, &n, &p, &ab, &off) != napi_ok) return -1;
    size_t elem = (t == napi_uint8_array || t == napi_int8_array || t == napi_uint8_clamped_array) ? 1
                  : (t == napi_uint16_array || t == napi_int16_array)                              ? 2
                  : (t == napi_float64_array || t == napi_bigint64_array || t == napi_biguint64_array) ? 8
                                                                                                         : 4;
    *data = p;
    *len = n * elem;
    return 0;
  }
  return -1;
}

/* Encodes zero detection as alternating run lengths starting with a data run:
 * [data, zero, data, zero, ...]; granularity 0 means "do not scan". */
static size_t scan_runs(const uint8_t *p, size_t len, size_t gran, uint32_t *runs, size_t max_runs) {
  if (gran == 0 || len == 0) {
    runs[0] = (uint32_t)len;
    return 1;
  }
  size_t n = 0;
  int cur_zero = 0;
  uint32_t cur_len = 0;
  for (size_t off = 0; off < len; off += gran) {
    size_t g = len - off < gran ? len - off : gran;
    const uint8_t *b = p + off;
    /* memcmp against itself shifted by one byte runs at memory speed and needs no zero page. */
    int zero = b[0] == 0 && (g == 1 || memcmp(b, b + 1, g - 1) == 0);
    if (zero == cur_zero) {
      cur_len += (uint32_t)g;
    } else {
      if (n + 1 >= max_runs) { /* cannot happen with max_runs >= granules + 1; keep data run */
        cur_len += (uint32_t)g;
        continue;
      }
      runs[n++] = cur_len;
      cur_zero = zero;
      cur_len = (uint32_t)g;
    }
  }
  runs[n++] = cur_len;
  return n;
}

typedef struct task task;
typedef void (*task_fn)(task *);

enum { MAX_REFS = 6 };

struct task {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref refs[MAX_REFS];
  int nrefs;
  task_fn run;
  int err;                /* errno-style code, 0 on success */
  char message[160];      /* set for non-errno failures */
  /* inputs */
  int fd, codec, level;
  uint8_t *buf, *out;
  size_t len, gran, cluster, count, out_stride, capacity;
  int64_t pos;
  double *triples;
  size_t ntriples;
  uint32_t *sizes;
  /* outputs */
  size_t bytes;
  uint32_t *runs;
  size_t nruns;
};

static void execute(napi_env env, void *data) {
  task *t = data;
  t->run(t);
}

static void complete(napi_env env, napi_status status, void *data) {
  task *t = data;
  napi_value result;
  if (t->err || t->message[0]) {
    napi_value msg, code, errv;
    const char *text = t->message[0] ? t->message : strerror(t->err);
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
    napi_create_string_utf8(env, t->err ? "ERR_FERRY_IO" : "ERR_FERRY_DATA", NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, msg, &errv);
    if (t->err) {
      napi_value errno_v;
      napi_create_int32(env, t->err, &errno_v);
      napi_set_named_property(env, errv, "errno", errno_v);
    }
    napi_reject_deferred(env, t->deferred, errv);
  } else if (t->runs) {
    napi_value ab, arr, bytes_v;
    void *p;
    napi_create_arraybuffer(env, t->nruns * 4, &p, &ab);
    memcpy(p, t->runs, t->nruns * 4);
    napi_create_typedarray(env, napi_uint32_array, t->nruns, ab, 0, &arr);
    napi_create_object(env, &result);
    napi_create_double(env, (double)t->bytes, &bytes_v);
    napi_set_named_property(env, result, "bytesRead", bytes_v);
    napi_set_named_property(env, result, "runs", arr);
    napi_resolve_deferred(env, t->deferred, result);
  } else {
    napi_create_double(env, (double)t->bytes, &result);
    napi_resolve_deferred(env, t->deferred, result);
  }
  for (int i = 0; i < t->nrefs; i++) napi_delete_reference(env, t->refs[i]);
  napi_delete_async_work(env, t->work);
  free(t->runs);
  free(t);
}

static napi_value queue(napi_env env, task *t, const char *name) {
  napi_value promise, resource_name;
  CHECK(napi_create_promise(env, &t->deferred, &promise));
  CHECK(napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource_name));
  CHECK(napi_create_async_work(env, NULL, resource_name, execute, complete, t, &t->work));
  CHECK(napi_queue_async_work(env, t->work));
  return promise;
}

static int keep(napi_env env, task *t, napi_value v) {
  return napi_create_reference(env, v, 1, &t->refs[t->nrefs++]) == napi_ok ? 0 : -1;
}

/* ---- read + scan ---- */

static void run_pread_scan(task *t) {
  size_t done = 0;
  while (done < t->len) {
    ssize_t n = pread(t->fd, t->buf + done, t->len - done, t->pos + (int64_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      t->err = errno;
      return;
    }
    if (n == 0) break;
    done += (size_t)n;
  }
  t->bytes = done;
  size_t max_runs = (t->gran ? (done + t->gran - 1) / t->gran : 0) + 2;
  t->runs = malloc(max_runs * sizeof(uint32_t));
  if (!t->runs) {
    t->err = ENOMEM;
    return;
  }
  t->nruns = scan_runs(t->buf, done, t->gran, t->runs, max_runs);
}

/* preadScan(fd, buffer, length, position, granularity) -> Promise<{bytesRead, runs}> */
static napi_value pread_scan(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  task *t = calloc(1, sizeof *t);
  size_t cap;
  if (!t || arg_buffer(env, argv[1], &t->buf, &cap) != 0) {
    free(t);
    napi_throw_type_error(env, NULL, "preadScan: buffer expected");
    return NULL;
  }
  t->fd = (int)arg_i64(env, argv[0]);
  t->len = (size_t)arg_i64(env, argv[2]);
  t->pos = arg_i64(env, argv[3]);
  t->gran = (size_t)arg_i64(env, argv[4]);
  if (t->len > cap) {
    free(t);
    napi_throw_range_error(env, NULL, "preadScan: length exceeds buffer");
    return NULL;
  }
  t->run = run_pread_scan;
  if (keep(env, t, argv[1]) != 0) return NULL;
  return queue(env, t, "ferry.preadScan");
}

static void run_scan(task *t) {
  size_t max_runs = (t->gran ? (t->len + t->gran - 1) / t->gran : 0) + 2;
  t->runs = malloc(max_runs * sizeof(uint32_t));
  if (!t->runs) {
    t->err = ENOMEM;
    return;
  }
  t->bytes = t->len;
  t->nruns = scan_runs(t->buf, t->len, t->gran, t->runs, max_runs);
}

/* scanZeroes(buffer, length, granularity) -> Promise<{bytesRead, runs}> */
static napi_value scan_zeroes(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  task *t = calloc(1, sizeof *t);
  size_t cap;
  if (!t || arg_buffer(env, argv[0], &t->buf, &cap) != 0) {
    free(t);
    napi_throw_type_error(env, NULL, "scanZeroes: buffer expected");
    return NULL;
  }
  t->len = (size_t)arg_i64(env, argv[1]);
  t->gran = (size_t)arg_i64(env, argv[2]);
  if (t->len > cap) {
    free(t);
    napi_throw_range_error(env, NULL, "scanZeroes: length exceeds buffer");
    return NULL;
  }
  t->run = run_scan;
  if (keep(env, t, argv[0]) != 0) return NULL;
  return queue(env, t, "ferry.scanZeroes");
}

/* ---- codecs ---- */

static void run_compress(task *t) {
  for (size_t i = 0; i < t->count; i++) {
    const uint8_t *src = t->buf + i * t->cluster;
    long n = ferry_compress(t->codec, t->level, src, t->cluster, t->out + i * t->out_stride, t->capacity);
    if (n < 0) {
      snprintf(t->message, sizeof t->message, "compression failed");
      return;
    }
    t->sizes[i] = (uint32_t)n;
  }
}

/* compressBlocks(codec, level, src, blockSize, count, out, outStride, capacity, sizes) -> Promise<void>
 * Block i is compressed to out[i*outStride], at most `capacity` bytes; sizes[i] = 0 when it did not fit. */
static napi_value compress_blocks(napi_env env, napi_callback_info info) {
  size_t argc = 9;
  napi_value argv[9];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  task *t = calloc(1, sizeof *t);
  size_t src_len, out_len, sizes_len;
  uint8_t *sizes_p;
  if (!t || arg_buffer(env, argv[2], &t->buf, &src_len) || arg_buffer(env, argv[5], &t->out, &out_len) ||
      arg_buffer(env, argv[8], &sizes_p, &sizes_len)) {
    free(t);
    napi_throw_type_error(env, NULL, "compressBlocks: buffers expected");
    return NULL;
  }
  t->codec = (int)arg_i64(env, argv[0]);
  t->level = (int)arg_i64(env, argv[1]);
  t->cluster = (size_t)arg_i64(env, argv[3]);
  t->count = (size_t)arg_i64(env, argv[4]);
  t->out_stride = (size_t)arg_i64(env, argv[6]);
  t->capacity = (size_t)arg_i64(env, argv[7]);
  t->sizes = (uint32_t *)sizes_p;
  if (t->cluster * t->count > src_len || t->out_stride * t->count > out_len || t->count * 4 > sizes_len ||
      t->capacity > t->out_stride) {
    free(t);
    napi_throw_range_error(env, NULL, "compressBlocks: buffers too small");
    return NULL;
  }
  t->run = run_compress;
  if (keep(env, t, argv[2]) || keep(env, t, argv[5]) || keep(env, t, argv[8])) return NULL;
  return queue(env, t, "ferry.compressBlocks");
}

static void run_decompress(task *t) {
  for (size_t i = 0; i < t->ntriples; i++) {
    double *d = t->triples + i * 3;
    size_t src_off = (size_t)d[0], src_len = (size_t)d[1], dst_off = (size_t)d[2];
    if (src_off + src_len > t->len || dst_off + t->cluster > t->out_stride) {
      snprintf(t->message, sizeof t->message, "compressed block %zu out of range", i);
      return;
    }
    if (ferry_decompress(t->codec, t->buf + src_off, src_len, t->out + dst_off, t->cluster) != 0) {
      snprintf(t->message, sizeof t->message, "compressed block %zu is corrupt", i);
      t->bytes = i;
      return;
    }
  }
}

/* decompressBlocks(codec, src, triples: Float64Array[srcOff, srcLen, dstOff]*, dst, blockSize) -> Promise<void> */
static napi_value decompress_blocks(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  task *t = calloc(1, sizeof *t);
  size_t triples_len;
  uint8_t *triples_p;
  if (!t || arg_buffer(env, argv[1], &t->buf, &t->len) || arg_buffer(env, argv[2], &triples_p, &triples_len) ||
      arg_buffer(env, argv[3], &t->out, &t->out_stride)) {
    free(t);
    napi_throw_type_error(env, NULL, "decompressBlocks: buffers expected");
    return NULL;
  }
  t->codec = (int)arg_i64(env, argv[0]);
  t->triples = (double *)triples_p;
  t->ntriples = triples_len / (3 * sizeof(double));
  t->cluster = (size_t)arg_i64(env, argv[4]);
  t->run = run_decompress;
  if (keep(env, t, argv[1]) || keep(env, t, argv[2]) || keep(env, t, argv[3])) return NULL;
  return queue(env, t, "ferry.decompressBlocks");
}

/* ---- synchronous helpers ---- */

/* dataSegments(fd, start, end, maxSegments) -> Float64Array [s0, e0, s1, e1, ..., resumeAt]
 * Data ranges in [start, end) by SEEK_DATA/SEEK_HOLE. The last element is where a further call should
 * resume (== end when complete). On a filesystem without support the whole range is one segment. */
static napi_value data_segments(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int fd = (int)arg_i64(env, argv[0]);
  int64_t pos = arg_i64(env, argv[1]), end = arg_i64(env, argv[2]);
  int64_t max = arg_i64(env, argv[3]);
  if (max < 1) max = 1;
  double *seg = malloc((size_t)(max * 2 + 1) * sizeof(double));
  if (!seg) {
    napi_throw_error(env, "ERR_FERRY_NATIVE", "out of memory");
    return NULL;
  }
  int64_t n = 0;
  while (pos < end && n < max) {
    off_t d = lseek(fd, pos, SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) { /* no data after pos */
        pos = end;
        break;
      }
      /* unsupported: report everything as data */
      seg[n * 2] = (double)pos;
      seg[n * 2 + 1] = (double)end;
      n++;
      pos = end;
      break;
    }
    if (d >= end) {
      pos = end;
      break;
    }
    off_t h = lseek(fd, d, SEEK_HOLE);
    if (h < 0 || h > end) h = end;
    seg[n * 2] = (double)d;
    seg[n * 2 + 1] = (double)h;
    n++;
    pos = h;
  }
  seg[n * 2] = (double)(pos < end ? pos : end);
  napi_value ab, arr;
  void *p;
  CHECK(napi_create_arraybuffer(env, (size_t)(n * 2 + 1) * sizeof(double), &p, &ab));
  memcpy(p, seg, (size_t)(n * 2 + 1) * sizeof(double));
  free(seg);
  CHECK(napi_create_typedarray(env, napi_float64_array, (size_t)(n * 2 + 1), ab, 0, &arr));
  return arr;
}

/* punchHole(fd, offset, length) -> boolean: deallocates the range, which then reads as zeroes. */
static napi_value punch_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], result;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int rc = fallocate((int)arg_i64(env, argv[0]), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, arg_i64(env, argv[1]),
                     arg_i64(env, argv[2]));
  CHECK(napi_get_boolean(env, rc == 0, &result));
  return result;
}

/* crc32c(buffer, initial = 0) -> number */
static napi_value crc32c(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2], result;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint8_t *p;
  size_t len;
  if (arg_buffer(env, argv[0], &p, &len)) {
    napi_throw_type_error(env, NULL, "crc32c: buffer expected");
    return NULL;
  }
  uint32_t init = argc > 1 ? (uint32_t)arg_i64(env, argv[1]) : 0;
  CHECK(napi_create_uint32(env, ferry_crc32c(init, p, len), &result));
  return result;
}

/* isZero(buffer) -> boolean, synchronous, for small buffers. */
static napi_value is_zero(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], result;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint8_t *p;
  size_t len;
  if (arg_buffer(env, argv[0], &p, &len)) {
    napi_throw_type_error(env, NULL, "isZero: buffer expected");
    return NULL;
  }
  bool zero = len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
  CHECK(napi_get_boolean(env, zero, &result));
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"preadScan", NULL, pread_scan, NULL, NULL, NULL, napi_default, NULL},
      {"scanZeroes", NULL, scan_zeroes, NULL, NULL, NULL, napi_default, NULL},
      {"compressBlocks", NULL, compress_blocks, NULL, NULL, NULL, napi_default, NULL},
      {"decompressBlocks", NULL, decompress_blocks, NULL, NULL, NULL, napi_default, NULL},
      {"dataSegments", NULL, data_segments, NULL, NULL, NULL, napi_default, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
      {"crc32c", NULL, crc32c, NULL, NULL, NULL, napi_default, NULL},
      {"isZero", NULL, is_zero, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
