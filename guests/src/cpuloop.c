/* cpuloop: deterministic CPU-bound guest for fuel / epoch / timeout tests.
 *   cpuloop [ITERATIONS] [EVERY]
 * Runs ITERATIONS (default 10) outer iterations of INNER xorshift-mixing steps,
 * printing "progress i/N hash=HEX" (flushed) after every EVERY-th outer
 * iteration (default 1) and the last one, then "done hash=HEX". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define INNER 10000000u

/* The loop-carried dependency through the hash (and printing it) keeps the
 * compiler from folding or removing the work. */
static uint64_t mix(uint64_t h, uint64_t iter) {
    uint64_t x = h ^ (iter * 0x9E3779B97F4A7C15ull);
    for (uint32_t i = 0; i < INNER; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x += i;
    }
    return x;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 10;
    long every = argc > 2 ? strtol(argv[2], NULL, 10) : 1;
    if (n < 0) n = 0;
    if (every < 1) every = 1;
    uint64_t h = 0x0123456789ABCDEFull;
    for (long i = 1; i <= n; i++) {
        h = mix(h, (uint64_t)i);
        if (i % every == 0 || i == n) {
            printf("progress %ld/%ld hash=%016llx\n", i, n, (unsigned long long)h);
            fflush(stdout);
        }
    }
    printf("done hash=%016llx\n", (unsigned long long)h);
    fflush(stdout);
    return 0;
}
