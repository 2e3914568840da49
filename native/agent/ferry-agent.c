/* ferry-agent: the thin block server Ferry pushes to a capture source over SSH and removes afterwards.
 *
 * It runs on a stock Linux server (built statically: no Node.js, no shared libraries needed), opens one
 * block device or file read-only and answers requests on stdin with frames on stdout. It only reads,
 * hashes, compresses and freezes; every decision (which ranges, which passes, what changed) is Ferry's.
 *
 * Protocol (all integers little-endian; the TypeScript side is src/transfer/protocol.ts):
 *   request, 32 bytes: u8 op, u8[3] 0, u32 chunk, u64 offset, u64 length, i32 arg (READ: zstd level; HASH:
 *                      chunks per hash), u32 extra_len, then extra_len bytes of argument (FREEZE:
 *                      NUL-separated mount points)
 *   frame,   32 bytes: u8 type, u8 flags, u16 0, u32 payload_len, u64 offset, u32 length, u32 0, u64 hash,
 *                      then payload_len bytes
 * On start the agent sends HELLO (offset = protocol version, hash = AGENT_MAGIC). Requests are answered in
 * order, so Ferry may pipeline them. Any failure of one request is an ERROR frame with a message; the
 * agent keeps serving. EOF on stdin ends the agent (and thaws anything it froze).
 *
 * Chunks are the unit of hashing and resume; a DATA frame carries a run of them (as many as fit in
 * MAX_CHUNK bytes), compressed as one: per-chunk frames cost a header each and restart zstd's history every
 * chunk. A frame's hash is the run hash of its chunks: the chunk's XXH64 for a run of one, else the XXH64 of
 * the chunks' XXH64s (8 little-endian bytes each), so Ferry checks every chunk with one field.
 *
 * Freezing is delegated to a watchdog child process that freezes, then thaws when Ferry asks, when the
 * timeout passes, or when the agent disappears for any reason (even SIGKILL): the child waits on a pipe
 * only the agent holds open, so a dead agent or a dropped connection can never leave filesystems frozen. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zstd.h>
#include "../xxh64.h"

#define PROTOCOL_VERSION 2
#define AGENT_MAGIC 0x3147415952524546ULL /* "FERRYAG1" read as a little-endian u64 */
#define HEADER_SIZE 32
#define MIN_CHUNK 512u
#define MAX_CHUNK (4u << 20)
#define MAX_EXTRA 65536u
#define HASHES_PER_FRAME 65536u
/* HASH: the most chunks one hash may stand for (a frame's worth of the smallest chunks). */
#define MAX_HASH_GROUP (MAX_CHUNK / MIN_CHUNK)
#define SEGMENTS_PER_FRAME 4096u
#define MAX_MOUNTS 64

enum { OP_INFO = 1, OP_READ = 2, OP_HASH = 3, OP_SEGMENTS = 4, OP_FREEZE = 5, OP_THAW = 6, OP_UNLINK_SELF = 7 };
enum {
  FR_HELLO = 1,
  FR_INFO = 2,
  FR_DATA = 3,
  FR_HASHES = 4,
  FR_SEGMENTS = 5,
  FR_END = 6,
  FR_ERROR = 7,
  FR_FROZEN = 8,
  FR_THAWED = 9,
  FR_UNLINKED = 10,
};
enum { DATA_ZERO = 1, DATA_ZSTD = 2 };
enum { THAWED_BY_WATCHDOG = 1 };
/* Exit status of the watchdog child: thawed because asked (or the agent went away), or because of the timeout. */
enum { WATCHDOG_ON_REQUEST = 0, WATCHDOG_TIMEOUT = 2, WATCHDOG_FAILED = 3 };

static int dev_fd = -1;
static uint64_t dev_size;
static int dev_is_block;
/* Block devices are read with O_DIRECT: a mounted filesystem writes file data past the block device's page
 * cache, so buffered reads of the device can return stale blocks forever (and would also evict the
 * server's own cache). Without O_DIRECT support, cached pages are dropped before each read instead. */
static int dev_direct;
#define DIRECT_ALIGN 4096
static uint8_t *chunk_buf, *zbuf, *bounce;
static size_t zbuf_cap;
static ZSTD_CCtx *cctx;
static pid_t watchdog_pid = -1;
static int watchdog_ctl = -1; /* write end: closing it tells the watchdog to thaw */

static int remove_self(void);

static void put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static uint64_t get_u64(const uint8_t *p) { return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }

static int write_all(int fd, struct iovec *iov, int n) {
  while (n > 0) {
    ssize_t w = writev(fd, iov, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    while (n > 0 && (size_t)w >= iov->iov_len) {
      w -= (ssize_t)iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (uint8_t *)iov->iov_base + w;
      iov->iov_len -= (size_t)w;
    }
  }
  return 0;
}

/* A failed write means Ferry (or the connection) is gone: stop, which also releases any freeze. */
static void send_frame(uint8_t type, uint8_t flags, uint64_t offset, uint32_t length, uint64_t hash, const void *payload,
                       uint32_t payload_len) {
  uint8_t h[HEADER_SIZE] = {0};
  h[0] = type;
  h[1] = flags;
  put_u32(h + 4, payload_len);
  ferry_put_le64(h + 8, offset);
  put_u32(h + 16, length);
  ferry_put_le64(h + 24, hash);
  struct iovec iov[2] = {{h, HEADER_SIZE}, {(void *)payload, payload_len}};
  if (write_all(STDOUT_FILENO, iov, payload_len ? 2 : 1) != 0) {
    remove_self();
    _exit(1);
  }
}

static void send_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void send_error(const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  if ((size_t)n >= sizeof msg) n = sizeof msg - 1;
  send_frame(FR_ERROR, 0, 0, 0, 0, msg, (uint32_t)n);
}

static int read_full(int fd, void *buf, size_t len) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = read(fd, (uint8_t *)buf + done, len - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) return done == 0 ? 0 : -1;
    done += (size_t)n;
  }
  return 1;
}

/* Reads up to len bytes, stopping early only at the end of the device. Returns the count, or -1. */
static ssize_t pread_some(uint8_t *buf, size_t len, uint64_t offset) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(dev_fd, buf + done, len - done, (off_t)(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) break;
    done += (size_t)n;
  }
  return (ssize_t)done;
}

static int pread_full(uint8_t *buf, size_t len, uint64_t offset) {
  if (dev_is_block && !dev_direct) posix_fadvise(dev_fd, (off_t)offset, (off_t)len, POSIX_FADV_DONTNEED);
  uint64_t start = dev_direct ? offset & ~(uint64_t)(DIRECT_ALIGN - 1) : offset;
  uint64_t end = dev_direct ? (offset + len + DIRECT_ALIGN - 1) & ~(uint64_t)(DIRECT_ALIGN - 1) : offset + len;
  /* O_DIRECT wants aligned offsets, lengths and memory: unaligned requests go through a bounce buffer. */
  int bounced = start != offset || end != offset + len || ((uintptr_t)buf % DIRECT_ALIGN) != 0;
  uint8_t *into = dev_direct && bounced ? bounce : buf;
  ssize_t got = pread_some(into, (size_t)(end - start), start);
  if (got < 0) return -1;
  if ((uint64_t)got < offset + len - start) {
    errno = EIO; /* the device shrank under us */
    return -1;
  }
  if (into != buf) memcpy(buf, into + (offset - start), len);
  return 0;
}

static int is_zero(const uint8_t *p, size_t len) { return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0); }

static int check_range(uint64_t offset, uint64_t length, uint32_t chunk) {
  if (chunk < MIN_CHUNK || chunk > MAX_CHUNK) {
    send_error("chunk size %u outside %u..%u", chunk, MIN_CHUNK, MAX_CHUNK);
    return -1;
  }
  if (offset > dev_size || length > dev_size - offset) {
    send_error("range %llu+%llu is past the end of the device (%llu bytes)", (unsigned long long)offset,
               (unsigned long long)length, (unsigned long long)dev_size);
    return -1;
  }
  return 0;
}

/* Chunks per DATA frame: Ferry computes the same number to know where each frame must start. */
static uint32_t chunks_per_frame(uint32_t chunk) { return chunk >= MAX_CHUNK ? 1 : MAX_CHUNK / chunk; }

static uint64_t run_hash(const uint8_t *hashes, uint32_t count) {
  return count == 1 ? ferry_xxh_read64(hashes) : ferry_xxh64(hashes, (size_t)count * 8, 0);
}

/* XXH64 of each chunk of buf[0, len) into hashes; returns the number of chunks. */
static uint32_t hash_chunks(const uint8_t *buf, uint32_t len, uint32_t chunk, uint8_t *hashes) {
  uint32_t n = 0;
  for (uint32_t at = 0; at < len; at += chunk, n++) ferry_put_le64(hashes + 8 * n, ferry_xxh64(buf + at, len - at < chunk ? len - at : chunk, 0));
  return n;
}

/* READ: DATA frames of up to chunks_per_frame chunks each, compressed when that saves space, a flag only
 * when all zero. */
static void do_read(uint64_t offset, uint64_t length, uint32_t chunk, int level) {
  if (check_range(offset, length, chunk)) return;
  if (level > 0 && !cctx && !(cctx = ZSTD_createCCtx())) {
    send_error("cannot create a zstd context");
    return;
  }
  static uint8_t hashes[(MAX_CHUNK / MIN_CHUNK) * 8];
  uint64_t frame = (uint64_t)chunks_per_frame(chunk) * chunk;
  for (uint64_t pos = offset; pos < offset + length; pos += frame) {
    uint32_t len = (uint32_t)(offset + length - pos < frame ? offset + length - pos : frame);
    if (pread_full(chunk_buf, len, pos) != 0) {
      send_error("read at %llu: %s", (unsigned long long)pos, strerror(errno));
      return;
    }
    uint64_t hash = run_hash(hashes, hash_chunks(chunk_buf, len, chunk, hashes));
    if (is_zero(chunk_buf, len)) {
      send_frame(FR_DATA, DATA_ZERO, pos, len, hash, NULL, 0);
      continue;
    }
    if (level > 0) {
      /* Capacity len - 1: a result that does not shrink the run goes out plain. */
      size_t n = ZSTD_compressCCtx(cctx, zbuf, len - 1 < zbuf_cap ? len - 1 : zbuf_cap, chunk_buf, len, level);
      if (!ZSTD_isError(n)) {
        send_frame(FR_DATA, DATA_ZSTD, pos, len, hash, zbuf, (uint32_t)n);
        continue;
      }
    }
    send_frame(FR_DATA, 0, pos, len, hash, chunk_buf, len);
  }
  send_frame(FR_END, 0, offset, 0, 0, NULL, 0);
}

/* HASH: one hash per `group` chunks (the run hash of the group; the chunk's own hash when group is 1),
 * batched into HASHES frames (offset = first chunk of the frame's first group, length = count). Ferry asks
 * for group hashes first and for chunk hashes only inside groups that changed: a pass over a quiet disk
 * costs 8 bytes per group on the wire, not per chunk. */
static void do_hash(uint64_t offset, uint64_t length, uint32_t chunk, int group_arg) {
  if (check_range(offset, length, chunk)) return;
  if (group_arg < 1 || (uint32_t)group_arg > MAX_HASH_GROUP) {
    send_error("hash group of %d chunks outside 1..%u", group_arg, MAX_HASH_GROUP);
    return;
  }
  uint32_t group = (uint32_t)group_arg;
  static uint8_t out[HASHES_PER_FRAME * 8];
  static uint8_t member[MAX_HASH_GROUP * 8];
  uint32_t count = 0, members = 0;
  uint64_t first = offset;
  /* Read a frame's worth at a time (fewer system calls, larger O_DIRECT requests), hash chunk by chunk. */
  uint64_t step = (uint64_t)chunks_per_frame(chunk) * chunk;
  for (uint64_t pos = offset; pos < offset + length; pos += step) {
    uint32_t len = (uint32_t)(offset + length - pos < step ? offset + length - pos : step);
    if (pread_full(chunk_buf, len, pos) != 0) {
      send_error("read at %llu: %s", (unsigned long long)pos, strerror(errno));
      return;
    }
    for (uint32_t at = 0; at < len; at += chunk) {
      ferry_put_le64(member + 8 * members++, ferry_xxh64(chunk_buf + at, len - at < chunk ? len - at : chunk, 0));
      int last = pos + at + chunk >= offset + length;
      if (members < group && !last) continue;
      ferry_put_le64(out + 8 * count++, run_hash(member, members));
      members = 0;
      if (count == HASHES_PER_FRAME) {
        send_frame(FR_HASHES, 0, first, count, 0, out, count * 8);
        first = pos + at + chunk;
        count = 0;
      }
    }
  }
  if (count) send_frame(FR_HASHES, 0, first, count, 0, out, count * 8);
  send_frame(FR_END, 0, offset, 0, 0, NULL, 0);
}

/* SEGMENTS: where a file source stores data (SEEK_DATA/SEEK_HOLE), as [start, end) pairs. A block device,
 * or a filesystem without hole reporting, answers with the whole range. */
static void do_segments(uint64_t offset, uint64_t length) {
  if (check_range(offset, length, MIN_CHUNK)) return;
  static uint8_t pairs[SEGMENTS_PER_FRAME * 16];
  uint32_t count = 0;
  uint64_t end = offset + length, pos = offset;
  while (pos < end) {
    off_t d = dev_is_block ? -1 : lseek(dev_fd, (off_t)pos, SEEK_DATA);
    uint64_t start, stop;
    if (d < 0) {
      if (!dev_is_block && errno == ENXIO) break; /* nothing but holes from here on */
      start = pos;
      stop = end;
    } else {
      if ((uint64_t)d >= end) break;
      off_t h = lseek(dev_fd, d, SEEK_HOLE);
      start = (uint64_t)d;
      stop = h < 0 || (uint64_t)h > end ? end : (uint64_t)h;
    }
    ferry_put_le64(pairs + 16 * count, start);
    ferry_put_le64(pairs + 16 * count + 8, stop);
    if (++count == SEGMENTS_PER_FRAME) {
      send_frame(FR_SEGMENTS, 0, offset, count, 0, pairs, count * 16);
      count = 0;
    }
    pos = stop;
  }
  if (count) send_frame(FR_SEGMENTS, 0, offset, count, 0, pairs, count * 16);
  send_frame(FR_END, 0, offset, 0, 0, NULL, 0);
}

/* ---- freeze watchdog (child process) ---- */

static int frozen_fds[MAX_MOUNTS];
static int frozen_count;

static void thaw_all(void) {
  for (int i = frozen_count - 1; i >= 0; i--) ioctl(frozen_fds[i], FITHAW, 0);
  frozen_count = 0;
}

static void watchdog_signal(int sig) {
  (void)sig;
  thaw_all(); /* ioctl is a plain system call: safe in a signal handler */
  _exit(WATCHDOG_ON_REQUEST);
}

static void watchdog_main(int ctl, int status, char **mounts, int nmounts, uint64_t timeout_ms) {
  /* Detach from the SSH session's stdio so the channel closes when the agent exits. */
  int null = open("/dev/null", O_RDWR);
  if (null >= 0) {
    dup2(null, STDIN_FILENO);
    dup2(null, STDOUT_FILENO);
    close(null);
  }
  signal(SIGHUP, SIG_IGN);
  signal(SIGINT, SIG_IGN);
  signal(SIGPIPE, SIG_IGN);
  signal(SIGTERM, watchdog_signal);
  for (int i = 0; i < nmounts; i++) {
    int fd = open(mounts[i], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, FIFREEZE, 0) != 0) {
      char msg[300];
      int n = snprintf(msg, sizeof msg, "freeze %s: %s", mounts[i], strerror(errno));
      thaw_all();
      if (write(status, msg, (size_t)(n < (int)sizeof msg ? n : (int)sizeof msg - 1)) < 0) _exit(WATCHDOG_FAILED);
      _exit(WATCHDOG_FAILED);
    }
    frozen_fds[frozen_count++] = fd;
  }
  if (write(status, "", 1) != 1) {
    thaw_all();
    _exit(WATCHDOG_FAILED);
  }
  close(status);
  struct pollfd p = {.fd = ctl, .events = POLLIN};
  int timeout = timeout_ms > 0x7fffffff ? 0x7fffffff : (int)timeout_ms;
  int rc;
  do rc = poll(&p, 1, timeout);
  while (rc < 0 && errno == EINTR); /* an EINTR restarts the full timeout: at worst a late thaw, never none */
  thaw_all();
  _exit(rc == 0 ? WATCHDOG_TIMEOUT : WATCHDOG_ON_REQUEST);
}

static void do_freeze(char *extra, uint32_t extra_len, uint64_t timeout_ms) {
  if (watchdog_pid > 0) {
    send_error("already frozen");
    return;
  }
  char *mounts[MAX_MOUNTS];
  int nmounts = 0;
  for (uint32_t i = 0; i < extra_len;) {
    size_t n = strnlen(extra + i, extra_len - i);
    if (i + n >= extra_len) {
      send_error("mount point list is not NUL-terminated");
      return;
    }
    if (n > 0) {
      if (nmounts == MAX_MOUNTS) {
        send_error("more than %d mount points", MAX_MOUNTS);
        return;
      }
      mounts[nmounts++] = extra + i;
    }
    i += (uint32_t)n + 1;
  }
  int ctl[2], status[2];
  if (pipe2(ctl, O_CLOEXEC) != 0) {
    send_error("pipe: %s", strerror(errno));
    return;
  }
  if (pipe2(status, O_CLOEXEC) != 0) {
    send_error("pipe: %s", strerror(errno));
    close(ctl[0]);
    close(ctl[1]);
    return;
  }
  pid_t pid = fork();
  if (pid < 0) {
    send_error("fork: %s", strerror(errno));
    close(ctl[0]);
    close(ctl[1]);
    close(status[0]);
    close(status[1]);
    return;
  }
  if (pid == 0) {
    close(ctl[1]);
    close(status[0]);
    watchdog_main(ctl[0], status[1], mounts, nmounts, timeout_ms);
  }
  close(ctl[0]);
  close(status[1]);
  char msg[300];
  ssize_t n;
  do n = read(status[0], msg, sizeof msg - 1);
  while (n < 0 && errno == EINTR);
  close(status[0]);
  if (n == 1 && msg[0] == 0) {
    watchdog_pid = pid;
    watchdog_ctl = ctl[1];
    send_frame(FR_FROZEN, 0, 0, (uint32_t)nmounts, 0, NULL, 0);
    return;
  }
  close(ctl[1]);
  waitpid(pid, NULL, 0);
  if (n <= 0) send_error("freeze watchdog failed to start");
  else send_frame(FR_ERROR, 0, 0, 0, 0, msg, (uint32_t)n);
}

/* Returns the watchdog's exit status, or -1 when nothing was frozen. */
static int release_freeze(void) {
  if (watchdog_pid <= 0) return -1;
  close(watchdog_ctl);
  int st = 0;
  while (waitpid(watchdog_pid, &st, 0) < 0 && errno == EINTR) {
  }
  watchdog_pid = -1;
  watchdog_ctl = -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : WATCHDOG_FAILED;
}

static void do_thaw(void) {
  int st = release_freeze();
  if (st < 0) {
    send_error("not frozen");
    return;
  }
  if (st == WATCHDOG_FAILED) {
    send_error("freeze watchdog failed");
    return;
  }
  send_frame(FR_THAWED, st == WATCHDOG_TIMEOUT ? THAWED_BY_WATCHDOG : 0, 0, 0, 0, NULL, 0);
}

/* The directory Ferry's push script made for this binary (argv[0] is its full path), or empty when the agent
 * was started from anywhere else. */
static char self_dir[4096];

static void remember_self(const char *argv0) {
  const char *slash = strrchr(argv0, '/');
  if (argv0[0] != '/' || !slash || strcmp(slash + 1, "ferry-agent") != 0 || (size_t)(slash - argv0) >= sizeof self_dir) return;
  size_t n = (size_t)(slash - argv0);
  memcpy(self_dir, argv0, n);
  self_dir[n] = 0;
  const char *base = strrchr(self_dir, '/');
  if (strncmp(base + 1, "ferry-agent.", 12) != 0) self_dir[0] = 0;
}

/* Removes the pushed binary and its directory; running agents keep their copy. Safe in any exit path. */
static int remove_self(void) {
  if (!self_dir[0]) return 0;
  char binary[sizeof self_dir + 16];
  snprintf(binary, sizeof binary, "%s/ferry-agent", self_dir);
  if ((unlink(binary) != 0 && errno != ENOENT) || (rmdir(self_dir) != 0 && errno != ENOENT)) return -1;
  return 0;
}

/* UNLINK_SELF: Ferry asks the first agent to remove the binary once every agent runs. Doing it here instead of
 * in another SSH command saves a remote shell start, often the slowest step of connecting (login shells read
 * their rc files). Every agent also removes it when it exits, so a connection lost before that leaves nothing. */
static void do_unlink_self(void) {
  if (!self_dir[0]) {
    send_error("not started from a pushed agent directory");
    return;
  }
  if (remove_self() != 0) {
    send_error("remove %s: %s", self_dir, strerror(errno));
    return;
  }
  send_frame(FR_UNLINKED, 0, 0, 0, 0, NULL, 0);
}

static void do_info(void) {
  uint8_t info[16] = {0};
  uint32_t sector = 512;
  if (dev_is_block) {
    int s = 0;
    if (ioctl(dev_fd, BLKSSZGET, &s) == 0 && s > 0) sector = (uint32_t)s;
  }
  ferry_put_le64(info, dev_size);
  put_u32(info + 8, sector);
  put_u32(info + 12, dev_is_block ? 1 : 0);
  send_frame(FR_INFO, 0, 0, 0, 0, info, sizeof info);
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "--version") == 0) {
    printf("ferry-agent %d\n", PROTOCOL_VERSION);
    return 0;
  }
  if (argc != 2) {
    fprintf(stderr, "usage: ferry-agent DEVICE|FILE\n");
    return 2;
  }
  /* A vanished reader must surface as a write error (and a clean exit), never as a silent kill. */
  signal(SIGPIPE, SIG_IGN);
  remember_self(argv[0]);
  dev_fd = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (dev_fd < 0) {
    fprintf(stderr, "ferry-agent: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  struct stat st;
  if (fstat(dev_fd, &st) != 0) {
    fprintf(stderr, "ferry-agent: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  dev_is_block = S_ISBLK(st.st_mode);
  if (dev_is_block) {
    if (ioctl(dev_fd, BLKGETSIZE64, &dev_size) != 0) {
      fprintf(stderr, "ferry-agent: %s: cannot read the device size: %s\n", argv[1], strerror(errno));
      return 1;
    }
  } else if (S_ISREG(st.st_mode)) {
    dev_size = (uint64_t)st.st_size;
  } else {
    fprintf(stderr, "ferry-agent: %s: not a block device or regular file\n", argv[1]);
    return 1;
  }
  if (dev_is_block) {
    int direct = open(argv[1], O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (direct >= 0) {
      close(dev_fd);
      dev_fd = direct;
      dev_direct = 1;
    }
  } else {
    posix_fadvise(dev_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  }
  zbuf_cap = ZSTD_compressBound(MAX_CHUNK);
  zbuf = malloc(zbuf_cap);
  if (posix_memalign((void **)&chunk_buf, DIRECT_ALIGN, MAX_CHUNK) != 0 ||
      posix_memalign((void **)&bounce, DIRECT_ALIGN, MAX_CHUNK + 2 * DIRECT_ALIGN) != 0 || !zbuf) {
    fprintf(stderr, "ferry-agent: out of memory\n");
    return 1;
  }
  send_frame(FR_HELLO, 0, PROTOCOL_VERSION, 0, AGENT_MAGIC, NULL, 0);

  static char extra[MAX_EXTRA];
  for (;;) {
    uint8_t req[HEADER_SIZE];
    int rc = read_full(STDIN_FILENO, req, sizeof req);
    if (rc <= 0) break; /* Ferry closed the channel (or died): done */
    uint8_t op = req[0];
    uint32_t chunk = get_u32(req + 4);
    uint64_t offset = get_u64(req + 8), length = get_u64(req + 16);
    int arg = (int)get_u32(req + 24);
    uint32_t extra_len = get_u32(req + 28);
    if (extra_len > MAX_EXTRA) break; /* cannot resynchronise with the stream: give up */
    if (extra_len && read_full(STDIN_FILENO, extra, extra_len) != 1) break;
    switch (op) {
      case OP_INFO:
        do_info();
        break;
      case OP_READ:
        do_read(offset, length, chunk, arg > 22 ? 22 : arg);
        break;
      case OP_HASH:
        do_hash(offset, length, chunk, arg);
        break;
      case OP_UNLINK_SELF:
        do_unlink_self();
        break;
      case OP_SEGMENTS:
        do_segments(offset, length);
        break;
      case OP_FREEZE:
        do_freeze(extra, extra_len, length);
        break;
      case OP_THAW:
        do_thaw();
        break;
      default:
        send_error("unknown request %u", op);
    }
  }
  release_freeze();
  remove_self();
  return 0;
}
