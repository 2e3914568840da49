/* Ferry's native helpers: the few things Node 20 cannot do, or cannot do fast enough, from JavaScript.
 * - sparse-file extents (SEEK_DATA/SEEK_HOLE) and hole punching
 * - read + zero detection in one thread-pool task, so the data is scanned while still in cache
 * - mapping a file range and scanning it in place, so data is copied once (into the output) instead of twice
 * - output writes into ranges allocated just before (cheaper for the filesystem than delayed allocation)
 * - batch compression/decompression of clusters off the main thread (zlib, zstd)
 * - CRC-32C
 * - XXH64 chunk hashes (the same definition the capture agent uses on the source, native/xxh64.h)
 * Every async call returns a promise and does all its work in one libuv worker task, so callers
 * pay one promise per multi-megabyte batch, never one per block. */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#include <node_api.h>
#include "ferry_native.h"
#include "xxh64.h"

#define CHECK(call)                                                          \
  do {                                                                       \
    if ((call) != napi_ok) {                                                 \
      napi_throw_error(env, "ERR_FERRY_NATIVE", "native call failed: " #call); \
      return NULL;                                                           \
    }                                                                        \
  } while (0)

/* Fetches the first n arguments into argv, those not passed reading as undefined, and how many were passed
 * when `passed` is not NULL; false with an exception pending when N-API fails. */
static bool get_args(napi_env env, napi_callback_info info, size_t n, napi_value *argv, size_t *passed) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    napi_throw_error(env, "ERR_FERRY_NATIVE", "native call failed: napi_get_cb_info(env, info, &argc, argv, NULL, NULL)");
    return false;
  }
  if (passed) *passed = argc;
  return true;
}

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

/* arg_buffer for an optional argument: undefined (or not passed) is accepted and leaves *data untouched. */
static int arg_optional_buffer(napi_env env, napi_value v, uint8_t **data, size_t *len) {
  napi_valuetype type;
  if (napi_typeof(env, v, &type) == napi_ok && type == napi_undefined) return 0;
  return arg_buffer(env, v, data, len);
}

/* arg_buffer that throws the TypeError `message` itself (false then), for calls with no task to free first. */
static bool require_buffer(napi_env env, napi_value v, uint8_t **data, size_t *len, const char *message) {
  if (arg_buffer(env, v, data, len) == 0) return true;
  napi_throw_type_error(env, NULL, message);
  return false;
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

typedef struct mapping {
  struct mapping *next;
  uint8_t *base;
  size_t len;
} mapping;

/* Mapped source ranges are unmapped on a thread of their own: munmap waits for every other core to drop the
 * range from its TLB, and on the main thread, once per copied chunk, that wait held up the pipeline (a tenth
 * of a 4 GiB conversion). The queue needs no JS, so a garbage-collection finalizer can use it too. */
static struct {
  pthread_once_t once;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  mapping *head;
  bool running;
} unmapper = {PTHREAD_ONCE_INIT, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, false};

static void *unmapper_main(void *arg) {
  for (;;) {
    pthread_mutex_lock(&unmapper.mu);
    while (!unmapper.head) pthread_cond_wait(&unmapper.cv, &unmapper.mu);
    mapping *list = unmapper.head;
    unmapper.head = NULL;
    pthread_mutex_unlock(&unmapper.mu);
    for (mapping *m = list, *next; m; m = next) {
      next = m->next;
      munmap(m->base, m->len);
      free(m);
    }
  }
  return NULL;
}

static void unmapper_start(void) {
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  unmapper.running = pthread_create(&thread, &attr, unmapper_main, NULL) == 0;
  pthread_attr_destroy(&attr);
}

/* Runs when the last view of a mapped range is gone, or at once when releaseMapping detaches it. */
static void unmap_finalize(napi_env env, void *data, void *hint) {
  mapping *m = hint;
  pthread_once(&unmapper.once, unmapper_start);
  if (!unmapper.running) {
    munmap(m->base, m->len);
    free(m);
    return;
  }
  pthread_mutex_lock(&unmapper.mu);
  m->next = unmapper.head;
  unmapper.head = m;
  pthread_cond_signal(&unmapper.cv);
  pthread_mutex_unlock(&unmapper.mu);
}

typedef struct task task;
typedef void (*task_fn)(task *);

enum { MAX_REFS = 7 };

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
  /* mapScanned: the mapping, and where the requested range starts in it */
  uint8_t *map_base;
  size_t map_len, map_delta;
};

static void execute(napi_env env, void *data) {
  task *t = data;
  t->run(t);
}

/* The error an async call rejects with: ERR_FERRY_IO with its errno when `err` is set, else ERR_FERRY_DATA;
 * the message is `message` when not empty, else the errno's text. */
static napi_value failure(napi_env env, int err, const char *message) {
  napi_value msg, code, errv;
  napi_create_string_utf8(env, message && message[0] ? message : strerror(err), NAPI_AUTO_LENGTH, &msg);
  napi_create_string_utf8(env, err ? "ERR_FERRY_IO" : "ERR_FERRY_DATA", NAPI_AUTO_LENGTH, &code);
  napi_create_error(env, code, msg, &errv);
  if (err) {
    napi_value errno_v;
    napi_create_int32(env, err, &errno_v);
    napi_set_named_property(env, errv, "errno", errno_v);
  }
  return errv;
}

static void complete(napi_env env, napi_status status, void *data) {
  task *t = data;
  napi_value result;
  if (t->err || t->message[0]) {
    napi_reject_deferred(env, t->deferred, failure(env, t->err, t->message));
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
    if (t->map_base) {
      napi_value buf;
      mapping *m = malloc(sizeof *m);
      if (m) {
        m->base = t->map_base;
        m->len = t->map_len;
      }
      if (!m || napi_create_external_buffer(env, t->len, t->map_base + t->map_delta, unmap_finalize, m, &buf) != napi_ok) {
        munmap(t->map_base, t->map_len);
        free(m);
        napi_get_null(env, &buf);
      }
      napi_set_named_property(env, result, "buffer", buf);
    }
    napi_resolve_deferred(env, t->deferred, result);
  } else if (t->map_len) {
    /* mapScanned found the range cannot be mapped whole (past the end of the file): the caller reads it instead */
    napi_get_null(env, &result);
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

/* Holds the n values that follow (a NULL one is an optional argument not given) until the task completes, so the
 * worker thread can use their memory; false when one could not be held. */
static bool keep(napi_env env, task *t, int n, ...) {
  va_list values;
  va_start(values, n);
  bool kept = true;
  for (int i = 0; i < n && kept; i++) {
    napi_value v = va_arg(values, napi_value);
    if (v) kept = napi_create_reference(env, v, 1, &t->refs[t->nrefs++]) == napi_ok;
  }
  va_end(values);
  return kept;
}

typedef napi_status (*error_thrower)(napi_env env, const char *code, const char *message);

/* Frees a task that will not be queued and throws `message` with `throw_error` (napi_throw_type_error, ...);
 * returns NULL for the call to return. */
static napi_value abandon(napi_env env, void *t, error_thrower throw_error, const char *message) {
  free(t);
  throw_error(env, NULL, message);
  return NULL;
}

/* ---- read + scan ---- */

/* Scans p[0, len) into t->runs (t->bytes = len); 0, or -1 with t->err set when out of memory. */
static int scan_task(task *t, const uint8_t *p, size_t len) {
  size_t max_runs = (t->gran ? (len + t->gran - 1) / t->gran : 0) + 2;
  t->runs = malloc(max_runs * sizeof(uint32_t));
  if (!t->runs) {
    t->err = ENOMEM;
    return -1;
  }
  t->bytes = len;
  t->nruns = scan_runs(p, len, t->gran, t->runs, max_runs);
  return 0;
}

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
  scan_task(t, t->buf, done);
}

/* preadScan(fd, buffer, length, position, granularity) -> Promise<{bytesRead, runs}> */
static napi_value pread_scan(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  if (!get_args(env, info, 5, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  size_t cap;
  if (!t || arg_buffer(env, argv[1], &t->buf, &cap))
    return abandon(env, t, napi_throw_type_error, "preadScan: buffer expected");
  t->fd = (int)arg_i64(env, argv[0]);
  t->len = (size_t)arg_i64(env, argv[2]);
  t->pos = arg_i64(env, argv[3]);
  t->gran = (size_t)arg_i64(env, argv[4]);
  if (t->len > cap) return abandon(env, t, napi_throw_range_error, "preadScan: length exceeds buffer");
  t->run = run_pread_scan;
  if (!keep(env, t, 1, argv[1])) return NULL;
  return queue(env, t, "ferry.preadScan");
}

static void run_scan(task *t) {
  scan_task(t, t->buf, t->len);
}

/* scanZeroes(buffer, length, granularity) -> Promise<{bytesRead, runs}> */
static napi_value scan_zeroes(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (!get_args(env, info, 3, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  size_t cap;
  if (!t || arg_buffer(env, argv[0], &t->buf, &cap))
    return abandon(env, t, napi_throw_type_error, "scanZeroes: buffer expected");
  t->len = (size_t)arg_i64(env, argv[1]);
  t->gran = (size_t)arg_i64(env, argv[2]);
  if (t->len > cap) return abandon(env, t, napi_throw_range_error, "scanZeroes: length exceeds buffer");
  t->run = run_scan;
  if (!keep(env, t, 1, argv[0])) return NULL;
  return queue(env, t, "ferry.scanZeroes");
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

static void run_map_scan(task *t) {
  long page = sysconf(_SC_PAGESIZE);
  t->map_delta = (size_t)(t->pos % page);
  t->map_len = t->len + t->map_delta;
  void *p = mmap(NULL, t->map_len, PROT_READ, MAP_SHARED, t->fd, t->pos - (int64_t)t->map_delta);
  if (p == MAP_FAILED) {
    t->err = errno;
    return;
  }
  /* Populating first turns a range past the end of the file into an error here instead of SIGBUS later,
   * and maps the pages in one call instead of one fault per 64 KiB. */
  if (madvise(p, t->map_len, MADV_POPULATE_READ) != 0) {
    int e = errno;
    munmap(p, t->map_len);
    if (e != EFAULT && e != EINVAL) t->err = e;
    return;
  }
  if (scan_task(t, (const uint8_t *)p + t->map_delta, t->len) == 0) t->map_base = p;
  else munmap(p, t->map_len);
}

/* mapScanned(fd, position, length, granularity) -> Promise<{bytesRead, runs, buffer} | null>
 * buffer is a read-only view of the file's page cache; null when the range is not wholly inside the file. */
static napi_value map_scanned(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (!get_args(env, info, 4, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  if (!t) {
    napi_throw_error(env, NULL, "mapScanned: out of memory");
    return NULL;
  }
  t->fd = (int)arg_i64(env, argv[0]);
  t->pos = arg_i64(env, argv[1]);
  t->len = (size_t)arg_i64(env, argv[2]);
  t->gran = (size_t)arg_i64(env, argv[3]);
  if (t->len == 0 || t->pos < 0) return abandon(env, t, napi_throw_range_error, "mapScanned: empty or negative range");
  t->run = run_map_scan;
  return queue(env, t, "ferry.mapScanned");
}

/* releaseMapping(buffer): unmaps a mapScanned buffer now instead of at garbage collection, so mapped
 * pages do not pile up in the process; every view of it becomes empty. */
static napi_value release_mapping(napi_env env, napi_callback_info info) {
  napi_value argv[1], ab;
  if (!get_args(env, info, 1, argv, NULL)) return NULL;
  napi_typedarray_type type;
  size_t length, offset;
  void *data;
  CHECK(napi_get_typedarray_info(env, argv[0], &type, &length, &data, &ab, &offset));
  CHECK(napi_detach_arraybuffer(env, ab));
  return NULL;
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
  napi_value argv[9];
  if (!get_args(env, info, 9, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  size_t src_len, out_len, sizes_len;
  uint8_t *sizes_p;
  if (!t || arg_buffer(env, argv[2], &t->buf, &src_len) || arg_buffer(env, argv[5], &t->out, &out_len) ||
      arg_buffer(env, argv[8], &sizes_p, &sizes_len))
    return abandon(env, t, napi_throw_type_error, "compressBlocks: buffers expected");
  t->codec = (int)arg_i64(env, argv[0]);
  t->level = (int)arg_i64(env, argv[1]);
  t->cluster = (size_t)arg_i64(env, argv[3]);
  t->count = (size_t)arg_i64(env, argv[4]);
  t->out_stride = (size_t)arg_i64(env, argv[6]);
  t->capacity = (size_t)arg_i64(env, argv[7]);
  t->sizes = (uint32_t *)sizes_p;
  if (t->cluster * t->count > src_len || t->out_stride * t->count > out_len || t->count * 4 > sizes_len ||
      t->capacity > t->out_stride)
    return abandon(env, t, napi_throw_range_error, "compressBlocks: buffers too small");
  t->run = run_compress;
  if (!keep(env, t, 3, argv[2], argv[5], argv[8])) return NULL;
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
  napi_value argv[5];
  if (!get_args(env, info, 5, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  size_t triples_len;
  uint8_t *triples_p;
  if (!t || arg_buffer(env, argv[1], &t->buf, &t->len) || arg_buffer(env, argv[2], &triples_p, &triples_len) ||
      arg_buffer(env, argv[3], &t->out, &t->out_stride))
    return abandon(env, t, napi_throw_type_error, "decompressBlocks: buffers expected");
  t->codec = (int)arg_i64(env, argv[0]);
  t->triples = (double *)triples_p;
  t->ntriples = triples_len / (3 * sizeof(double));
  t->cluster = (size_t)arg_i64(env, argv[4]);
  t->run = run_decompress;
  if (!keep(env, t, 3, argv[1], argv[2], argv[3])) return NULL;
  return queue(env, t, "ferry.decompressBlocks");
}

/* ---- chunk hashes ---- */

static void run_hash_blocks(task *t) {
  size_t n = (t->len + t->cluster - 1) / t->cluster;
  for (size_t i = 0; i < n; i++) {
    size_t off = i * t->cluster;
    size_t len = t->len - off < t->cluster ? t->len - off : t->cluster;
    ferry_put_le64(t->out + i * 8, ferry_xxh64(t->buf + off, len, 0));
  }
  t->bytes = n;
}

/* hashBlocks(buffer, length, blockSize, out) -> Promise<number of hashes>
 * XXH64 of each blockSize piece of buffer[0, length) (the last may be shorter), as 8 little-endian bytes
 * per piece into out. */
static napi_value hash_blocks(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (!get_args(env, info, 4, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  size_t cap, out_len;
  if (!t || arg_buffer(env, argv[0], &t->buf, &cap) || arg_buffer(env, argv[3], &t->out, &out_len))
    return abandon(env, t, napi_throw_type_error, "hashBlocks: buffers expected");
  int64_t len = arg_i64(env, argv[1]), block = arg_i64(env, argv[2]);
  if (len < 0 || block <= 0 || (size_t)len > cap || ((size_t)len + (size_t)block - 1) / (size_t)block * 8 > out_len)
    return abandon(env, t, napi_throw_range_error, "hashBlocks: length, block size or output buffer out of range");
  t->len = (size_t)len;
  t->cluster = (size_t)block;
  t->run = run_hash_blocks;
  if (!keep(env, t, 2, argv[0], argv[3])) return NULL;
  return queue(env, t, "ferry.hashBlocks");
}

/* ---- output writes ---- */

/* Buffers one lane write may merge at most. */
#define MAX_WRITE_BUFFERS 256
/* Queued writes at consecutive positions merged into one at most. */
#define MAX_MERGED_JOBS 64

/* Writes go to the page cache in pieces of at most this many bytes. The kernel sizes the folios it allocates
 * for a write after the write, up to 2 MiB; in a VM whose host takes free memory back (free page reporting,
 * balloons), blocks that large are the ones the host has discarded, and every page of them faults in the host
 * on first touch. Measured here, 1.5 GiB copied in 2 MiB writes: 0.43–3.1 s; in 512 KiB writes: 0.23–0.27 s
 * (the allocator takes smaller blocks from its smaller free lists first, which the host keeps). */
#define WRITE_PIECE (512u * 1024)

/* Writes iov[0..count) back to back at pos into a range allocated first (unwritten extents, the file size
 * unchanged): a buffered write into allocated blocks skips the filesystem's delayed-allocation bookkeeping for
 * every block, a third of the kernel's cost of the write on ext4 (measured: 1.28 GiB in 0.20 s, 0.13 s with
 * the range allocated). Where fallocate is not supported the write goes ahead as it is. Consumes iov.
 * Returns 0 or an errno. */
static int write_allocated(int fd, struct iovec *iov, int count, int64_t pos) {
  size_t total = 0;
  for (int i = 0; i < count; i++) total += iov[i].iov_len;
  if (total) fallocate(fd, FALLOC_FL_KEEP_SIZE, pos, (off_t)total);
  struct iovec piece[MAX_WRITE_BUFFERS];
  while (count > 0) {
    int pieces = 0;
    size_t len = 0;
    for (; pieces < count && len < WRITE_PIECE; pieces++) {
      piece[pieces] = iov[pieces];
      if (piece[pieces].iov_len > WRITE_PIECE - len) piece[pieces].iov_len = WRITE_PIECE - len;
      len += piece[pieces].iov_len;
    }
    ssize_t n = pwritev(fd, piece, pieces, pos);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    pos += n;
    while (count > 0 && (size_t)n >= iov->iov_len) {
      n -= (ssize_t)iov->iov_len;
      iov++;
      count--;
    }
    if (count > 0 && n > 0) {
      iov->iov_base = (uint8_t *)iov->iov_base + n;
      iov->iov_len -= (size_t)n;
    }
  }
  return 0;
}

/* The output lane: one thread of its own that writes the queued writes in order, back to back. On the libuv
 * pool a write waited behind the copy workers' mapping tasks, and each write was issued only once the main
 * thread had seen the previous one complete, so the lane stood idle between writes. */
typedef struct lane_job {
  struct lane_job *next;
  napi_deferred deferred;
  napi_ref buffers; /* the JS array of buffers, kept alive until the write is done */
  int64_t pos;
  size_t bytes;
  int err;
  int count;
  struct iovec iov[];
} lane_job;

typedef struct {
  int fd;
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  lane_job *head, *tail;
  bool closing, joined;
  napi_threadsafe_function done;
  /* main thread only: writes submitted and not completed (the lane keeps the event loop alive meanwhile) */
  int pending;
  /* owners left: the JS handle and the thread-safe function; the last one frees the lane */
  int owners;
} write_lane;

static void lane_release(write_lane *lane) {
  if (--lane->owners > 0) return;
  pthread_mutex_destroy(&lane->mu);
  pthread_cond_destroy(&lane->cv);
  free(lane);
}

static void *lane_main(void *arg) {
  write_lane *lane = arg;
  struct iovec iov[MAX_WRITE_BUFFERS];
  for (;;) {
    pthread_mutex_lock(&lane->mu);
    while (!lane->head && !lane->closing) pthread_cond_wait(&lane->cv, &lane->mu);
    if (!lane->head) {
      pthread_mutex_unlock(&lane->mu);
      break;
    }
    /* The first write, and those queued right behind it that continue it, as one. */
    lane_job *first = lane->head, *last = first;
    int count = first->count, jobs = 1;
    int64_t end = first->pos;
    for (int i = 0; i < first->count; i++) end += (int64_t)first->iov[i].iov_len;
    while (last->next && jobs < MAX_MERGED_JOBS && last->next->pos == end && count + last->next->count <= MAX_WRITE_BUFFERS) {
      last = last->next;
      for (int i = 0; i < last->count; i++) end += (int64_t)last->iov[i].iov_len;
      count += last->count;
      jobs++;
    }
    lane->head = last->next;
    if (!lane->head) lane->tail = NULL;
    last->next = NULL;
    pthread_mutex_unlock(&lane->mu);

    int n = 0;
    for (lane_job *j = first; j; j = j->next) {
      memcpy(iov + n, j->iov, (size_t)j->count * sizeof *iov);
      n += j->count;
    }
    int err = write_allocated(lane->fd, iov, n, first->pos);
    for (lane_job *j = first; j; j = j->next) {
      j->err = err;
      if (!err)
        for (int i = 0; i < j->count; i++) j->bytes += j->iov[i].iov_len;
    }
    napi_call_threadsafe_function(lane->done, first, napi_tsfn_blocking);
  }
  napi_release_threadsafe_function(lane->done, napi_tsfn_release);
  return NULL;
}

/* On the main thread: settles a group of writes the lane finished. */
static void lane_completed(napi_env env, napi_value js_cb, void *context, void *data) {
  write_lane *lane = context;
  for (lane_job *j = data, *next; j; j = next) {
    next = j->next;
    if (env) {
      if (j->err) {
        napi_reject_deferred(env, j->deferred, failure(env, j->err, NULL));
      } else {
        napi_value result;
        napi_create_double(env, (double)j->bytes, &result);
        napi_resolve_deferred(env, j->deferred, result);
      }
      napi_delete_reference(env, j->buffers);
      if (--lane->pending == 0) napi_unref_threadsafe_function(env, lane->done);
    }
    free(j);
  }
}

static void lane_finalized(napi_env env, void *data, void *hint) {
  lane_release(data);
}

static void lane_join(write_lane *lane) {
  if (lane->joined) return;
  pthread_mutex_lock(&lane->mu);
  lane->closing = true;
  pthread_cond_signal(&lane->cv);
  pthread_mutex_unlock(&lane->mu);
  pthread_join(lane->thread, NULL);
  lane->joined = true;
}

static void lane_handle_finalized(napi_env env, void *data, void *hint) {
  write_lane *lane = data;
  lane_join(lane);
  lane_release(lane);
}

static write_lane *arg_lane(napi_env env, napi_value v) {
  void *p = NULL;
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_external || napi_get_value_external(env, v, &p) != napi_ok) return NULL;
  return p;
}

/* openWriteLane(fd) -> lane: a thread that writes to fd what laneWrite queues, in order. */
static napi_value open_write_lane(napi_env env, napi_callback_info info) {
  napi_value argv[1], name, handle;
  if (!get_args(env, info, 1, argv, NULL)) return NULL;
  write_lane *lane = calloc(1, sizeof *lane);
  if (!lane) {
    napi_throw_error(env, "ERR_FERRY_NATIVE", "out of memory");
    return NULL;
  }
  lane->fd = (int)arg_i64(env, argv[0]);
  lane->owners = 2;
  pthread_mutex_init(&lane->mu, NULL);
  pthread_cond_init(&lane->cv, NULL);
  napi_create_string_utf8(env, "ferry.writeLane", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, NULL, NULL, name, 0, 1, lane, lane_finalized, lane, lane_completed, &lane->done) != napi_ok) {
    free(lane);
    napi_throw_error(env, "ERR_FERRY_NATIVE", "openWriteLane: cannot create the completion queue");
    return NULL;
  }
  napi_unref_threadsafe_function(env, lane->done);
  if (pthread_create(&lane->thread, NULL, lane_main, lane) != 0) {
    lane->joined = true;
    napi_release_threadsafe_function(lane->done, napi_tsfn_abort);
    lane_release(lane);
    napi_throw_error(env, "ERR_FERRY_NATIVE", "openWriteLane: cannot start the thread");
    return NULL;
  }
  if (napi_create_external(env, lane, lane_handle_finalized, NULL, &handle) != napi_ok) {
    lane_join(lane);
    lane_release(lane);
    napi_throw_error(env, "ERR_FERRY_NATIVE", "openWriteLane: cannot wrap the lane");
    return NULL;
  }
  return handle;
}

/* laneWrite(lane, buffers: Uint8Array[], position) -> Promise<number>
 * Queues a write of the buffers back to back at `position`; resolves once all of it is written. */
static napi_value lane_write(napi_env env, napi_callback_info info) {
  napi_value argv[3], promise;
  size_t argc;
  if (!get_args(env, info, 3, argv, &argc)) return NULL;
  write_lane *lane = argc >= 1 ? arg_lane(env, argv[0]) : NULL;
  if (!lane || lane->joined) {
    napi_throw_type_error(env, NULL, "laneWrite: an open write lane expected");
    return NULL;
  }
  bool is_array = false;
  uint32_t count = 0;
  if (argc < 3 || napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array ||
      napi_get_array_length(env, argv[1], &count) != napi_ok || count == 0 || count > MAX_WRITE_BUFFERS) {
    napi_throw_type_error(env, NULL, "laneWrite: 1 to 256 buffers expected");
    return NULL;
  }
  lane_job *job = calloc(1, sizeof *job + count * sizeof(struct iovec));
  if (!job) {
    napi_throw_error(env, "ERR_FERRY_NATIVE", "out of memory");
    return NULL;
  }
  for (uint32_t i = 0; i < count; i++) {
    napi_value item;
    uint8_t *p;
    size_t len;
    if (napi_get_element(env, argv[1], i, &item) != napi_ok || arg_buffer(env, item, &p, &len))
      return abandon(env, job, napi_throw_type_error, "laneWrite: buffers expected");
    job->iov[i].iov_base = p;
    job->iov[i].iov_len = len;
  }
  job->count = (int)count;
  job->pos = arg_i64(env, argv[2]);
  if (job->pos < 0) return abandon(env, job, napi_throw_range_error, "laneWrite: negative position");
  /* The array holds every buffer: referencing it keeps them all alive until the write is done. */
  if (napi_create_reference(env, argv[1], 1, &job->buffers) != napi_ok) return abandon(env, job, napi_throw_error, "laneWrite: cannot hold the buffers");
  if (napi_create_promise(env, &job->deferred, &promise) != napi_ok) {
    napi_delete_reference(env, job->buffers);
    return abandon(env, job, napi_throw_error, "laneWrite: cannot create a promise");
  }
  if (lane->pending++ == 0) napi_ref_threadsafe_function(env, lane->done);
  pthread_mutex_lock(&lane->mu);
  if (lane->tail) lane->tail->next = job;
  else lane->head = job;
  lane->tail = job;
  pthread_cond_signal(&lane->cv);
  pthread_mutex_unlock(&lane->mu);
  return promise;
}

/* closeWriteLane(lane): lets the thread finish the writes queued and end; closing again does nothing. Writes after
 * it throw. */
static napi_value close_write_lane(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv, NULL)) return NULL;
  write_lane *lane = arg_lane(env, argv[0]);
  if (!lane) {
    napi_throw_type_error(env, NULL, "closeWriteLane: a write lane expected");
    return NULL;
  }
  lane_join(lane);
  return NULL;
}

/* ---- synchronous helpers ---- */

static void unmap_whole(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

/* mapShared(fd, length, writable?) -> ArrayBuffer
 * A MAP_SHARED mapping of the file's first `length` bytes (read-only unless `writable`), unmapped when the
 * buffer is collected. Live migration reads guest RAM through it (hashing, gathering pages to send) and the
 * destination writes pages into its RAM file through it: no system call per page, and one page table kept from
 * round to round. */
static napi_value map_shared(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (!get_args(env, info, 3, argv, NULL)) return NULL;
  int fd = (int)arg_i64(env, argv[0]);
  int64_t len = arg_i64(env, argv[1]);
  bool writable = false;
  napi_valuetype type;
  if (napi_typeof(env, argv[2], &type) == napi_ok && type == napi_boolean) napi_get_value_bool(env, argv[2], &writable);
  if (len <= 0) {
    napi_throw_range_error(env, NULL, "mapShared: length must be positive");
    return NULL;
  }
  void *p = mmap(NULL, (size_t)len, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    napi_throw_error(env, "ERR_FERRY_NATIVE", strerror(errno));
    return NULL;
  }
  napi_value buffer;
  if (napi_create_external_arraybuffer(env, p, (size_t)len, unmap_whole, (void *)(uintptr_t)len, &buffer) != napi_ok) {
    munmap(p, (size_t)len);
    napi_throw_error(env, "ERR_FERRY_NATIVE", "mapShared: cannot wrap the mapping");
    return NULL;
  }
  return buffer;
}

/* dataSegments(fd, start, end, maxSegments) -> Float64Array [s0, e0, s1, e1, ..., resumeAt]
 * Data ranges in [start, end) by SEEK_DATA/SEEK_HOLE. The last element is where a further call should
 * resume (== end when complete). On a filesystem without support the whole range is one segment. */
static napi_value data_segments(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  if (!get_args(env, info, 4, argv, NULL)) return NULL;
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
  napi_value argv[3], result;
  if (!get_args(env, info, 3, argv, NULL)) return NULL;
  int rc = fallocate((int)arg_i64(env, argv[0]), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, arg_i64(env, argv[1]),
                     arg_i64(env, argv[2]));
  CHECK(napi_get_boolean(env, rc == 0, &result));
  return result;
}

/* crc32c(buffer, initial = 0) -> number */
static napi_value crc32c(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  size_t argc;
  uint8_t *p;
  size_t len;
  if (!get_args(env, info, 2, argv, &argc) || !require_buffer(env, argv[0], &p, &len, "crc32c: buffer expected"))
    return NULL;
  uint32_t init = argc > 1 ? (uint32_t)arg_i64(env, argv[1]) : 0;
  CHECK(napi_create_uint32(env, ferry_crc32c(init, p, len), &result));
  return result;
}

/* xxh64(buffer) -> bigint, synchronous, for small buffers and tests. */
static napi_value xxh64(napi_env env, napi_callback_info info) {
  napi_value argv[1], result;
  uint8_t *p;
  size_t len;
  if (!get_args(env, info, 1, argv, NULL) || !require_buffer(env, argv[0], &p, &len, "xxh64: buffer expected"))
    return NULL;
  CHECK(napi_create_bigint_uint64(env, ferry_xxh64(p, len, 0), &result));
  return result;
}

/* isZero(buffer) -> boolean, synchronous, for small buffers. */
static napi_value is_zero(napi_env env, napi_callback_info info) {
  napi_value argv[1], result;
  uint8_t *p;
  size_t len;
  if (!get_args(env, info, 1, argv, NULL) || !require_buffer(env, argv[0], &p, &len, "isZero: buffer expected"))
    return NULL;
  bool zero = len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
  CHECK(napi_get_boolean(env, zero, &result));
  return result;
}

/* ---- live migration: page digests, scattered page reads, page batch encoding ----
 * Pages are digested with XXH64 (xxh64.h): the whole-memory equality proof at switchover and the hash-compare
 * dirty tracker both need a 64-bit digest, since a 32-bit one lets a changed page pass for unchanged once in 4e9. */

static inline void put_digest(uint32_t *out, size_t i, uint64_t d) {
  out[i * 2] = (uint32_t)d;
  out[i * 2 + 1] = (uint32_t)(d >> 32);
}

static int pread_full(int fd, uint8_t *buf, size_t len, int64_t pos) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, len - done, pos + (int64_t)done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO; /* the file is shorter than the memory it backs */
    done += (size_t)n;
  }
  return 0;
}

/* Extra inputs of the page tasks; `base` comes first so complete() frees the whole struct. */
typedef struct {
  task base;
  uint32_t *indices; /* page numbers of the batch */
  uint8_t *cache;    /* encode: arena of previously sent pages, `slots` pages */
  int32_t *tags;     /* encode: page number held by each cache slot, -1 when empty */
  size_t slots;
  int cache_mode;    /* encode: CACHE_* */
  uint32_t *meta;    /* per page: kind, size, digest low, digest high */
  uint8_t *states;   /* optional: encode, per page number, PAGE_HELD_DATA | raw sends in a row; hash, per page of
                      * the range, 1 once it held data */
  size_t states_len;
  uint8_t *memory;   /* encode (gather) / apply: the whole RAM file mapped, page n at n * page size */
  size_t memory_len;
  uint8_t *skip;     /* hash: pages to leave alone, one flag per page */
  uint32_t *held;    /* apply, optional: digest of each page the file holds, by page number */
} page_task;

enum { PAGE_ZERO = 0, PAGE_RAW = 1, PAGE_ZSTD = 2, PAGE_DELTA = 3 };
/* A page that went raw is compressed again only every this many sends: a failed zstd attempt costs more
 * than sending the page (guest pages rewritten with fresh random-looking data fail every time). */
#define RAW_RETRY_EVERY 8
/* Page state bits (encode): the page held data when last read (so it is no hole of the file), and the
 * count of its raw sends in a row in the low bits (wrapping at 128, a multiple of RAW_RETRY_EVERY). */
#define PAGE_HELD_DATA 0x80u
#define PAGE_RAW_RUN 0x7fu
/* What encoding does to the delta cache: CACHE_LOOKUP only reads it (the stop-and-copy: no round follows
 * that could use what it sends, so a cached page sent is evicted instead of refreshed); CACHE_REFRESH
 * also refreshes the pages it holds; CACHE_INSERT also caches pages it does not hold yet. */
enum { CACHE_LOOKUP = 0, CACHE_REFRESH = 1, CACHE_INSERT = 2 };

/* The file is read in chunks of this many bytes when hashing. */
#define HASH_CHUNK (1u << 20)

static void run_hash_file_pages(task *t) {
  size_t page = t->gran, per_chunk = HASH_CHUNK / page ? HASH_CHUNK / page : 1;
  uint8_t *buf = malloc(per_chunk * page);
  if (!buf) {
    t->err = ENOMEM;
    return;
  }
  uint32_t *out = (uint32_t *)t->out;
  for (size_t first = 0; first < t->count; first += per_chunk) {
    size_t n = t->count - first < per_chunk ? t->count - first : per_chunk;
    int rc = pread_full(t->fd, buf, n * page, t->pos + (int64_t)(first * page));
    if (rc) {
      t->err = rc;
      break;
    }
    for (size_t i = 0; i < n; i++) put_digest(out, first + i, ferry_xxh64(buf + i * page, page, 0));
  }
  free(buf);
}

/* Digests of the pages of a mapped file range whose holes are not read: a hole reads as zeroes (its digest
 * is the zero page's), and reading it through a shared mapping of tmpfs would allocate it. Pages flagged in
 * `skip` keep the digest they had. Pages flagged in `known_data` held data at an earlier pass and are read
 * without asking the file where its holes are (guest RAM that was written stays allocated; the walk over the
 * file's pages that SEEK_HOLE costs is paid only where holes may remain); pages found holding data are flagged. */
static void run_hash_mapped_pages(task *t) {
  page_task *pt = (page_task *)t;
  size_t page = t->gran;
  uint8_t *zero = calloc(1, page);
  if (!zero) {
    t->err = ENOMEM;
    return;
  }
  uint64_t zero_digest = ferry_xxh64(zero, page, 0);
  free(zero);
  uint32_t *out = (uint32_t *)t->out;
  const uint8_t *skip = pt->skip;
  uint8_t *known = pt->states;
  int64_t start = t->pos;
  size_t next = 0, hashed = 0;
  while (next < t->count) {
    if (known && known[next]) {
      if (!skip || !skip[next]) {
        put_digest(out, next, ferry_xxh64(t->buf + next * page, page, 0));
        hashed++;
      }
      next++;
      continue;
    }
    /* A run of pages not known to hold data: where the file's data lies in it. */
    size_t run_end = next + 1;
    while (known && run_end < t->count && !known[run_end]) run_end++;
    if (!known) run_end = t->count;
    int64_t pos = start + (int64_t)(next * page), end = start + (int64_t)(run_end * page);
    off_t data = lseek(t->fd, pos, SEEK_DATA);
    if (data < 0) data = errno == ENXIO ? end : pos; /* ENXIO: nothing but a hole after pos; else no hole support */
    if (data > end) data = end;
    off_t hole = data < end ? lseek(t->fd, data, SEEK_HOLE) : end;
    if (hole < 0 || hole > end) hole = end;
    size_t data_page = (size_t)((data - start) / (int64_t)page);
    size_t hole_page = (size_t)((hole - start + (int64_t)page - 1) / (int64_t)page);
    for (; next < data_page; next++)
      if (!skip || !skip[next]) put_digest(out, next, zero_digest);
    for (; next < hole_page; next++) {
      if (known) known[next] = 1;
      if (skip && skip[next]) continue;
      put_digest(out, next, ferry_xxh64(t->buf + next * page, page, 0));
      hashed++;
    }
  }
  t->bytes = hashed;
}

/* hashMappedPages(memory, fd, position, pageSize, count, out: Uint32Array[count*2], skip?: Uint8Array[count],
 *                 knownData?: Uint8Array[count]) -> Promise<number of pages read>
 * XXH64 of each page of memory[0, pageSize*count), which maps the file range at `position` of fd. */
static napi_value hash_mapped_pages(napi_env env, napi_callback_info info) {
  napi_value argv[8];
  if (!get_args(env, info, 8, argv, NULL)) return NULL;
  page_task *pt = calloc(1, sizeof *pt);
  task *t = &pt->base;
  size_t mem_len, out_len, skip_len = 0, known_len = 0;
  if (!pt || arg_buffer(env, argv[0], &t->buf, &mem_len) || arg_buffer(env, argv[5], &t->out, &out_len))
    return abandon(env, pt, napi_throw_type_error, "hashMappedPages: buffers expected");
  if (arg_optional_buffer(env, argv[6], &pt->skip, &skip_len) || arg_optional_buffer(env, argv[7], &pt->states, &known_len))
    return abandon(env, pt, napi_throw_type_error, "hashMappedPages: skip and knownData must be Uint8Arrays");
  t->fd = (int)arg_i64(env, argv[1]);
  t->pos = arg_i64(env, argv[2]);
  t->gran = (size_t)arg_i64(env, argv[3]);
  t->count = (size_t)arg_i64(env, argv[4]);
  if (t->gran == 0 || t->pos < 0 || t->pos % (int64_t)t->gran || t->count * t->gran > mem_len || t->count * 8 > out_len ||
      (pt->skip && skip_len < t->count) || (pt->states && known_len < t->count))
    return abandon(env, pt, napi_throw_range_error, "hashMappedPages: memory, digests or flags too small");
  t->run = run_hash_mapped_pages;
  if (!keep(env, t, 4, argv[0], argv[5], pt->skip ? argv[6] : NULL, pt->states ? argv[7] : NULL)) return NULL;
  return queue(env, t, "ferry.hashMappedPages");
}

/* hashFilePages(fd, position, pageSize, count, out: Uint32Array[count*2]) -> Promise<number>
 * XXH64 of each page of a file range, as (low, high) 32-bit pairs. */
static napi_value hash_file_pages(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  if (!get_args(env, info, 5, argv, NULL)) return NULL;
  task *t = calloc(1, sizeof *t);
  size_t out_len;
  if (!t || arg_buffer(env, argv[4], &t->out, &out_len))
    return abandon(env, t, napi_throw_type_error, "hashFilePages: Uint32Array expected");
  t->fd = (int)arg_i64(env, argv[0]);
  t->pos = arg_i64(env, argv[1]);
  t->gran = (size_t)arg_i64(env, argv[2]);
  t->count = (size_t)arg_i64(env, argv[3]);
  if (t->gran == 0 || t->count * 8 > out_len)
    return abandon(env, t, napi_throw_range_error, "hashFilePages: digest array too small");
  t->run = run_hash_file_pages;
  if (!keep(env, t, 1, argv[4])) return NULL;
  return queue(env, t, "ferry.hashFilePages");
}

static void run_pread_pages(task *t) {
  page_task *pt = (page_task *)t;
  size_t page = t->gran;
  for (size_t i = 0; i < t->count;) {
    /* Contiguous page numbers become one pread. */
    size_t run = 1;
    while (i + run < t->count && pt->indices[i + run] == pt->indices[i] + run) run++;
    int rc = pread_full(t->fd, t->out + i * page, run * page, (int64_t)pt->indices[i] * (int64_t)page);
    if (rc) {
      t->err = rc;
      return;
    }
    i += run;
  }
  t->bytes = t->count * page;
}

/* preadPages(fd, pageSize, indices: Uint32Array, count, out) -> Promise<number>
 * Reads pages indices[0..count) of a file into out, back to back. */
static napi_value pread_pages(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  if (!get_args(env, info, 5, argv, NULL)) return NULL;
  page_task *pt = calloc(1, sizeof *pt);
  task *t = &pt->base;
  size_t idx_len, out_len;
  uint8_t *idx_p;
  if (!pt || arg_buffer(env, argv[2], &idx_p, &idx_len) || arg_buffer(env, argv[4], &t->out, &out_len))
    return abandon(env, pt, napi_throw_type_error, "preadPages: buffers expected");
  pt->indices = (uint32_t *)idx_p;
  t->fd = (int)arg_i64(env, argv[0]);
  t->gran = (size_t)arg_i64(env, argv[1]);
  t->count = (size_t)arg_i64(env, argv[3]);
  if (t->gran == 0 || t->count * 4 > idx_len || t->count * t->gran > out_len)
    return abandon(env, pt, napi_throw_range_error, "preadPages: buffers too small");
  t->run = run_pread_pages;
  if (!keep(env, t, 2, argv[2], argv[4])) return NULL;
  return queue(env, t, "ferry.preadPages");
}

static void run_encode_pages(task *t) {
  page_task *pt = (page_task *)t;
  size_t page = t->gran, out_pos = 0;
  uint8_t *scratch = malloc(page * 3);
  if (!scratch) {
    t->err = ENOMEM;
    return;
  }
  uint8_t *xor_buf = scratch, *packed = scratch + page, *copy = scratch + 2 * page;
  for (size_t i = 0; i < t->count; i++) {
    const uint8_t *src = t->buf + i * page;
    uint32_t idx = pt->indices[i];
    uint32_t *meta = pt->meta + i * 4;
    uint8_t *state = pt->states && idx < pt->states_len ? pt->states + idx : NULL;
    if (pt->memory) {
      /* Gathered from the live mapping into a private copy first, so that the digest, the zero test and what is
       * sent all see one version of a page the guest may be writing. A page never seen holding data may be a
       * hole of the file, which a read through the shared mapping would allocate: pread returns its zeroes. */
      if (state && (*state & PAGE_HELD_DATA)) {
        memcpy(copy, pt->memory + (size_t)idx * page, page);
      } else {
        int rc = pread_full(t->fd, copy, page, (int64_t)idx * (int64_t)page);
        if (rc) {
          t->err = rc;
          free(scratch);
          return;
        }
      }
      src = copy;
    }
    uint64_t digest = ferry_xxh64(src, page, 0);
    put_digest(pt->meta, i * 2 + 1, digest); /* meta[2], meta[3] */
    size_t slot = pt->slots ? idx % pt->slots : 0;
    int cached = pt->slots && pt->tags[slot] == (int32_t)idx;
    if (src[0] == 0 && memcmp(src, src + 1, page - 1) == 0) {
      meta[0] = PAGE_ZERO;
      meta[1] = 0;
      if (cached) pt->tags[slot] = -1;
      if (state) *state = 0;
      continue;
    }
    uint32_t kind = PAGE_RAW;
    size_t size = page;
    size_t same_words = 0;
    unsigned raw_run = state ? *state & PAGE_RAW_RUN : 0;
    if (cached) {
      const uint8_t *prev = pt->cache + slot * page;
      for (size_t b = 0; b < page; b += 8) {
        uint64_t x = ferry_xxh_read64(src + b) ^ ferry_xxh_read64(prev + b);
        same_words += x == 0;
        memcpy(xor_buf + b, &x, 8);
      }
    }
    /* A page rewritten nearly everywhere makes no delta worth compressing: skip the attempt. */
    if (cached && same_words * 4 >= page / 8) {
      long n = ferry_compress(FERRY_CODEC_ZSTD, t->level, xor_buf, page, packed, page - 1);
      if (n < 0) goto fail;
      if (n > 0) {
        kind = PAGE_DELTA;
        size = (size_t)n;
        memcpy(t->out + out_pos, packed, size);
      }
    }
    /* A delta under an eighth of a page is as good as it gets: skip compressing the page itself. */
    if (size > page / 8 && raw_run % RAW_RETRY_EVERY == 0) {
      long n = ferry_compress(FERRY_CODEC_ZSTD, t->level, src, page, packed, size - 1);
      if (n < 0) goto fail;
      if (n > 0) {
        kind = PAGE_ZSTD;
        size = (size_t)n;
        memcpy(t->out + out_pos, packed, size);
      }
    }
    if (kind == PAGE_RAW) memcpy(t->out + out_pos, src, page);
    if (state) *state = (uint8_t)(PAGE_HELD_DATA | (kind == PAGE_RAW ? (raw_run + 1) & PAGE_RAW_RUN : 0));
    meta[0] = kind;
    meta[1] = (uint32_t)size;
    out_pos += size;
    /* The cache must hold exactly what the destination holds, so a cached page is refreshed or evicted. A
     * page that went raw twice in a row is rewritten whole each time: its delta will not pay, so it leaves
     * the cache (sparing the copy here and the XOR next time) until its next retry turn. */
    unsigned sent_raw = state ? *state & PAGE_RAW_RUN : 0;
    int hopeless = sent_raw >= 2 && sent_raw % RAW_RETRY_EVERY != 0;
    if (pt->slots && pt->cache_mode != CACHE_LOOKUP && !hopeless && (cached || pt->cache_mode == CACHE_INSERT)) {
      memcpy(pt->cache + slot * page, src, page);
      pt->tags[slot] = (int32_t)idx;
    } else if (cached) {
      pt->tags[slot] = -1;
    }
  }
  free(scratch);
  t->bytes = out_pos;
  return;
fail:
  free(scratch);
  snprintf(t->message, sizeof t->message, "page compression failed");
}

/* encodePages(src, fd, pageSize, count, indices: Uint32Array, cache: Buffer, tags: Int32Array, cacheMode, level,
 *             out, meta: Uint32Array[count*4], states?: Uint8Array[pages]) -> Promise<number bytes written to out>
 * Page i (page number indices[i]) becomes the smallest of: nothing (zero page), its zstd frame, the zstd frame
 * of its XOR with the cached previously sent version (a delta), or itself. With fd < 0, src holds the batch's
 * pages back to back; otherwise src maps all of fd and page n is gathered from n * pageSize (pages whose state
 * lacks PAGE_HELD_DATA are read from fd instead). meta[i] = kind, size, XXH64 low, high. Cache slot = page
 * number mod slots; pass empty cache/tags to disable deltas; cacheMode is CACHE_*. states, indexed by page
 * number and kept by the caller across batches, is updated here (see PAGE_HELD_DATA, RAW_RETRY_EVERY). */
static napi_value encode_pages(napi_env env, napi_callback_info info) {
  napi_value argv[12];
  if (!get_args(env, info, 12, argv, NULL)) return NULL;
  page_task *pt = calloc(1, sizeof *pt);
  task *t = &pt->base;
  size_t src_len, idx_len, cache_len, tags_len, out_len, meta_len;
  uint8_t *src_p, *idx_p, *tags_p, *meta_p;
  if (!pt || arg_buffer(env, argv[0], &src_p, &src_len) || arg_buffer(env, argv[4], &idx_p, &idx_len) ||
      arg_buffer(env, argv[5], &pt->cache, &cache_len) || arg_buffer(env, argv[6], &tags_p, &tags_len) ||
      arg_buffer(env, argv[9], &t->out, &out_len) || arg_buffer(env, argv[10], &meta_p, &meta_len))
    return abandon(env, pt, napi_throw_type_error, "encodePages: buffers expected");
  pt->indices = (uint32_t *)idx_p;
  pt->tags = (int32_t *)tags_p;
  pt->meta = (uint32_t *)meta_p;
  t->fd = (int)arg_i64(env, argv[1]);
  t->gran = (size_t)arg_i64(env, argv[2]);
  t->count = (size_t)arg_i64(env, argv[3]);
  pt->cache_mode = (int)arg_i64(env, argv[7]);
  t->level = (int)arg_i64(env, argv[8]);
  pt->slots = t->gran ? cache_len / t->gran : 0;
  if (pt->slots > tags_len / 4) pt->slots = tags_len / 4;
  if (t->gran < 64 || t->gran % 8 || t->count * 4 > idx_len || t->count * t->gran > out_len || t->count * 16 > meta_len ||
      (t->fd < 0 && t->count * t->gran > src_len))
    return abandon(env, pt, napi_throw_range_error, "encodePages: buffers too small");
  if (pt->cache_mode < CACHE_LOOKUP || pt->cache_mode > CACHE_INSERT)
    return abandon(env, pt, napi_throw_range_error, "encodePages: unknown cache mode");
  if (t->fd >= 0) {
    for (size_t i = 0; i < t->count; i++) {
      if (((size_t)pt->indices[i] + 1) * t->gran > src_len)
        return abandon(env, pt, napi_throw_range_error, "encodePages: a page number is beyond the mapped memory");
    }
    pt->memory = src_p;
    pt->memory_len = src_len;
  } else {
    t->buf = src_p;
  }
  if (arg_optional_buffer(env, argv[11], &pt->states, &pt->states_len))
    return abandon(env, pt, napi_throw_type_error, "encodePages: states must be a Uint8Array");
  t->run = run_encode_pages;
  if (!keep(env, t, 7, argv[0], argv[4], argv[5], argv[6], argv[9], argv[10], pt->states ? argv[11] : NULL))
    return NULL;
  return queue(env, t, "ferry.encodePages");
}

static void run_apply_pages(task *t) {
  page_task *pt = (page_task *)t;
  size_t page = t->gran, in_pos = 0;
  uint8_t *xor_buf = calloc(1, page);
  if (!xor_buf) {
    t->err = ENOMEM;
    return;
  }
  uint64_t zero_digest = ferry_xxh64(xor_buf, page, 0);
  const uint32_t *held = pt->held;
  for (size_t i = 0; i < t->count; i++) {
    uint32_t *meta = pt->meta + i * 4;
    uint32_t kind = meta[0];
    size_t size = meta[1];
    uint8_t *dest = pt->memory + (size_t)pt->indices[i] * page;
    if (in_pos + size > t->len) {
      snprintf(t->message, sizeof t->message, "page %zu of the batch runs past its payload", i);
      goto out;
    }
    const uint8_t *in = t->buf + in_pos;
    switch (kind) {
      case PAGE_RAW:
        if (size != page) goto corrupt;
        memcpy(dest, in, page);
        break;
      case PAGE_ZERO:
        if (size != 0) goto corrupt;
        /* Already zero here (a hole the guest never wrote, most of the first round): left alone, so the hole
         * stays one. */
        if (!held || held[pt->indices[i] * 2] != (uint32_t)zero_digest || held[pt->indices[i] * 2 + 1] != (uint32_t)(zero_digest >> 32))
          memset(dest, 0, page);
        put_digest(pt->meta, i * 2 + 1, zero_digest);
        continue;
      case PAGE_ZSTD:
        if (ferry_decompress(FERRY_CODEC_ZSTD, in, size, dest, page) != 0) goto corrupt;
        break;
      case PAGE_DELTA:
        /* The base is the version this side already holds: the page itself. */
        if (ferry_decompress(FERRY_CODEC_ZSTD, in, size, xor_buf, page) != 0) goto corrupt;
        for (size_t b = 0; b < page; b += 8) {
          uint64_t x = ferry_xxh_read64(dest + b) ^ ferry_xxh_read64(xor_buf + b);
          memcpy(dest + b, &x, 8);
        }
        break;
      default:
        goto corrupt;
    }
    put_digest(pt->meta, i * 2 + 1, ferry_xxh64(dest, page, 0));
    in_pos += size;
    continue;
  corrupt:
    snprintf(t->message, sizeof t->message, "page %zu of the batch (kind %u, %zu bytes) is corrupt", i, kind, size);
    goto out;
  }
  t->bytes = in_pos;
out:
  free(xor_buf);
}

/* applyPages(memory, pageSize, count, indices: Uint32Array, payload, meta: Uint32Array[count*4], held?: Uint32Array)
 *   -> Promise<number>
 * Decodes a batch made by encodePages into `memory` (a writable shared mapping of the RAM file: mapShared), each
 * page at its place; fills meta[i*4+2..3] with the XXH64 of the page as written. `held`, the digests of what the
 * memory holds by page number (low, high), lets a zero page that is already zero go unwritten. A page that fails
 * to decode may be left half written: the batch is then an error, and the migration with it. */
static napi_value apply_pages(napi_env env, napi_callback_info info) {
  napi_value argv[7];
  if (!get_args(env, info, 7, argv, NULL)) return NULL;
  page_task *pt = calloc(1, sizeof *pt);
  task *t = &pt->base;
  size_t idx_len, meta_len, held_len = 0;
  uint8_t *idx_p, *meta_p, *held_p = NULL;
  if (!pt || arg_buffer(env, argv[0], &pt->memory, &pt->memory_len) || arg_buffer(env, argv[3], &idx_p, &idx_len) ||
      arg_buffer(env, argv[4], &t->buf, &t->len) || arg_buffer(env, argv[5], &meta_p, &meta_len))
    return abandon(env, pt, napi_throw_type_error, "applyPages: buffers expected");
  if (arg_optional_buffer(env, argv[6], &held_p, &held_len))
    return abandon(env, pt, napi_throw_type_error, "applyPages: held must be a Uint32Array");
  pt->indices = (uint32_t *)idx_p;
  pt->meta = (uint32_t *)meta_p;
  t->gran = (size_t)arg_i64(env, argv[1]);
  t->count = (size_t)arg_i64(env, argv[2]);
  if (t->gran < 64 || t->gran % 8 || t->count * 4 > idx_len || t->count * 16 > meta_len)
    return abandon(env, pt, napi_throw_range_error, "applyPages: buffers too small");
  for (size_t i = 0; i < t->count; i++) {
    if (((size_t)pt->indices[i] + 1) * t->gran > pt->memory_len || (held_p && (size_t)pt->indices[i] * 8 + 8 > held_len))
      return abandon(env, pt, napi_throw_range_error, "applyPages: a page number is beyond the memory");
  }
  pt->held = (uint32_t *)held_p;
  t->run = run_apply_pages;
  if (!keep(env, t, 5, argv[0], argv[3], argv[4], argv[5], held_p ? argv[6] : NULL)) return NULL;
  return queue(env, t, "ferry.applyPages");
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"preadScan", NULL, pread_scan, NULL, NULL, NULL, napi_default, NULL},
      {"scanZeroes", NULL, scan_zeroes, NULL, NULL, NULL, napi_default, NULL},
      {"mapScanned", NULL, map_scanned, NULL, NULL, NULL, napi_default, NULL},
      {"releaseMapping", NULL, release_mapping, NULL, NULL, NULL, napi_default, NULL},
      {"compressBlocks", NULL, compress_blocks, NULL, NULL, NULL, napi_default, NULL},
      {"decompressBlocks", NULL, decompress_blocks, NULL, NULL, NULL, napi_default, NULL},
      {"dataSegments", NULL, data_segments, NULL, NULL, NULL, napi_default, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
      {"crc32c", NULL, crc32c, NULL, NULL, NULL, napi_default, NULL},
      {"isZero", NULL, is_zero, NULL, NULL, NULL, napi_default, NULL},
      {"hashFilePages", NULL, hash_file_pages, NULL, NULL, NULL, napi_default, NULL},
      {"hashMappedPages", NULL, hash_mapped_pages, NULL, NULL, NULL, napi_default, NULL},
      {"openWriteLane", NULL, open_write_lane, NULL, NULL, NULL, napi_default, NULL},
      {"laneWrite", NULL, lane_write, NULL, NULL, NULL, napi_default, NULL},
      {"closeWriteLane", NULL, close_write_lane, NULL, NULL, NULL, napi_default, NULL},
      {"preadPages", NULL, pread_pages, NULL, NULL, NULL, napi_default, NULL},
      {"encodePages", NULL, encode_pages, NULL, NULL, NULL, napi_default, NULL},
      {"applyPages", NULL, apply_pages, NULL, NULL, NULL, napi_default, NULL},
      {"hashBlocks", NULL, hash_blocks, NULL, NULL, NULL, napi_default, NULL},
      {"mapShared", NULL, map_shared, NULL, NULL, NULL, napi_default, NULL},
      {"xxh64", NULL, xxh64, NULL, NULL, NULL, napi_default, NULL},
  };
  CHECK(napi_define_properties(env, exports, sizeof props / sizeof props[0], props));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
