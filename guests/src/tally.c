/* tally: the smallest stateful reactor, built into a component (guests/wit/tally.wit)
 * for the component memory-snapshot tests. Its one WASI call (the monotonic clock) pulls
 * in the preview1 adapter, so the component has several core instances, but it never
 * holds a host resource (a stream or a descriptor) between calls.
 *   int add(int n)          adds n to a static total, returns the new total
 *   int get(void)           returns the total
 *   long long ticks(void)   CLOCK_MONOTONIC in nanoseconds
 *   int say(int n)          prints "say N" on stdout, returns n: from then on the adapter
 *                           holds the stdout stream, a host resource */
#include <stdio.h>
#include <time.h>

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
