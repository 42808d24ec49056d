/* tally: the smallest stateful reactor, built into a component (guests/wit/tally.wit)
 * for the component memory-snapshot tests. Its WASI calls pull in the preview1 adapter,
 * so the component has several core instances; `add`, `get` and `ticks` hold no host
 * resource between calls, the others leave the adapter holding streams and descriptors.
 *   int add(int n)          adds n to a static total, returns the new total
 *   int get(void)           returns the total
 *   long long ticks(void)   CLOCK_MONOTONIC in nanoseconds
 *   int say(int n)          prints "say N" on stdout, returns n: from then on the adapter
 *                           holds the stdout stream, a host resource
 *   int log-open(void)      opens /tally.log for writing and keeps it open (a descriptor)
 *   int log-write(int n)    writes "N\n" to it (then a write stream at its position too)
 *   int src-open(void)      opens /input.txt for reading and keeps it open
 *   int src-next(void)      reads one byte from it (then a read stream), -1 at the end
 *   int touch(int kib)      mallocs kib KiB, fills it with non-zero bytes and keeps it
 *                           (linear memory grows); 0, or -1 if malloc failed
 * The descriptors are raw (no stdio buffering), so every byte moves when it is asked for. */
#include <fcntl.h>
#include "heap.h"
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static int log_fd = -1, src_fd = -1;

__attribute__((export_name("log-open"))) int log_open(void) {
    log_fd = open("/tally.log", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    return log_fd;
}

__attribute__((export_name("log-write"))) int log_write(int n) {
    char line[16];
    int len = snprintf(line, sizeof line, "%d\n", n);
    return (int)write(log_fd, line, (size_t)len);
}

__attribute__((export_name("src-open"))) int src_open(void) {
    src_fd = open("/input.txt", O_RDONLY);
    return src_fd;
}

__attribute__((export_name("src-next"))) int src_next(void) {
    unsigned char c;
    return read(src_fd, &c, 1) == 1 ? c : -1;
}

__attribute__((export_name("say"))) int say(int n) {
    printf("say %d\n", n);
    fflush(stdout);
    return n;
}

static int total = 0;

__attribute__((export_name("ticks"))) long long ticks(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

__attribute__((export_name("add"))) int add(int n) {
    total += n;
    return total;
}

__attribute__((export_name("get"))) int get(void) { return total; }

__attribute__((export_name("touch"))) int touch(int kib) { return grow_heap(kib, 0x5A); }

/* CPU-bound: n rounds of xorshift over a 1 KiB table (what a call costs by engine). */
__attribute__((export_name("crunch"))) int crunch(int n) {
    static unsigned table[256];
    unsigned x = 2463534242u;
    for (int i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        table[x & 255] += x;
    }
    unsigned sum = 0;
    for (int i = 0; i < 256; i++) sum += table[i];
    return (int)sum;
}
