/* reactor: a WASI reactor (no main; _initialize + exports) for memory-snapshot
 * tests. Built with -mexec-model=reactor.
 *   int add(int n)          adds n to a static total, returns the new total
 *   int get(void)           returns the total
 *   int touch(int kib)      mallocs kib KiB and fills it with non-zero bytes (kept
 *                           alive, so linear memory grows); 0 on success, -1 on failure
 *   int open_data(void)     opens /data.txt for reading; returns the descriptor or -1
 *   int read_next(void)     the next byte of /data.txt, -1 at its end or on error
 *   int open_extra(void)    opens /data.txt once more and keeps it; returns the
 *                           descriptor (shows which number the next open gets)
 *   int close_fd(int fd)    closes a descriptor; 0 or -1
 *   int log_line(int n)     appends "line N\n" to /log.txt through a descriptor kept
 *                           open (opened with O_APPEND at the first call); 0 or -1
 *   long long monotonic_ns(void)   CLOCK_MONOTONIC in nanoseconds
 *   int say(int n)          prints "say N" on stdout; returns n
 *   int touch_noise(int kib)  like touch, but fills with pseudo-random bytes (so the
 *                           memory compresses like real data, not like a memset) */
#include <fcntl.h>
#include "heap.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int total = 0;
static int data_fd = -1;
static int log_fd = -1;

__attribute__((export_name("add"))) int add(int n) {
    total += n;
    return total;
}

__attribute__((export_name("get"))) int get(void) { return total; }

__attribute__((export_name("touch"))) int touch(int kib) { return grow_heap(kib, 0x5A); }

__attribute__((export_name("open_data"))) int open_data(void) {
    data_fd = open("/data.txt", O_RDONLY);
    return data_fd;
}

__attribute__((export_name("read_next"))) int read_next(void) {
    unsigned char c;
    if (data_fd < 0) return -1;
    return read(data_fd, &c, 1) == 1 ? c : -1;
}

__attribute__((export_name("open_extra"))) int open_extra(void) { return open("/data.txt", O_RDONLY); }

__attribute__((export_name("close_fd"))) int close_fd(int fd) { return close(fd); }

__attribute__((export_name("log_line"))) int log_line(int n) {
    char line[32];
    if (log_fd < 0) log_fd = open("/log.txt", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log_fd < 0) return -1;
    int len = snprintf(line, sizeof line, "line %d\n", n);
    return write(log_fd, line, len) == len ? 0 : -1;
}

__attribute__((export_name("monotonic_ns"))) long long monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((export_name("say"))) int say(int n) {
    printf("say %d\n", n);
    fflush(stdout);
    return n;
}

__attribute__((export_name("touch_noise"))) int touch_noise(int kib) {
    static unsigned long long seed = 0x9E3779B97F4A7C15ULL;
    if (kib < 0) return -1;
    size_t size = (size_t)kib * 1024;
    unsigned char *p = malloc(size ? size : 1);
    if (p == NULL) return -1;
    for (size_t i = 0; i < size; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        /* Half text-like, half noise: compressible, but not trivially. */
        p[i] = (i & 1) ? (unsigned char)seed : (unsigned char)('a' + seed % 16);
    }
    __asm__ volatile("" : : "r"(p) : "memory");
    return 0;
}
