/* memhog: memory-limit guest.
 *   memhog MIB
 * Allocates MIB 1 MiB chunks, touching every page with non-zero bytes, prints
 * "allocated N MiB" every 16 MiB and "total N MiB" at the end. If malloc fails
 * it prints "malloc failed after N MiB" on stderr and exits 2. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A "1 MiB" chunk is 64 bytes short of 1 MiB so that, with malloc's own header,
 * it fills exactly 16 wasm pages: zig's wasm malloc rounds large blocks up to a
 * power of two of 64 KiB pages, and a full 1 MiB plus header would take 2 MiB of
 * linear memory. This way `memhog N` grows memory by about N MiB. */
#define CHUNK (1024 * 1024 - 64)

int main(int argc, char **argv) {
    long mib = argc > 1 ? strtol(argv[1], NULL, 10) : 16;
    long done = 0;
    for (long i = 0; i < mib; i++) {
        unsigned char *p = malloc(CHUNK);
        if (p == NULL) {
            fprintf(stderr, "malloc failed after %ld MiB\n", done);
            fflush(stderr);
            return 2;
        }
        memset(p, 0xA5, CHUNK);
        /* Chunks are deliberately leaked: the point is to hold the memory. */
        __asm__ volatile("" : : "r"(p) : "memory");
        done++;
        if (done % 16 == 0) {
            printf("allocated %ld MiB\n", done);
            fflush(stdout);
        }
    }
    printf("total %ld MiB\n", done);
    fflush(stdout);
    return 0;
}
