/* reactor: a WASI reactor (no main; _initialize + exports) for memory-snapshot
 * tests. Built with -mexec-model=reactor.
 *   int add(int n)      adds n to a static total, returns the new total
 *   int get(void)       returns the total
 *   int touch(int kib)  mallocs kib KiB and fills it with non-zero bytes (kept
 *                       alive, so linear memory grows); 0 on success, -1 on failure */
#include <stdlib.h>
#include <string.h>

static int total = 0;

__attribute__((export_name("add"))) int add(int n) {
    total += n;
    return total;
}

__attribute__((export_name("get"))) int get(void) { return total; }

__attribute__((export_name("touch"))) int touch(int kib) {
    if (kib < 0) return -1;
    size_t size = (size_t)kib * 1024;
    unsigned char *p = malloc(size ? size : 1);
    if (p == NULL) return -1;
    memset(p, 0x5A, size);
    /* Deliberately leaked: the memory must stay in the instance's heap. */
    __asm__ volatile("" : : "r"(p) : "memory");
    return 0;
}
