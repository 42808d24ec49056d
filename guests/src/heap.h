/* Shared by the reactor guests: grows the heap by kib KiB of non-zero bytes and keeps it
 * (linear memory grows, and the pages are not zero, so snapshots must carry them). */
#ifndef STASIS_GUEST_HEAP_H
#define STASIS_GUEST_HEAP_H
#include <stdlib.h>
#include <string.h>

static int grow_heap(int kib, unsigned char fill) {
    if (kib < 0) return -1;
    size_t size = (size_t)kib * 1024;
    unsigned char *p = malloc(size ? size : 1);
    if (p == NULL) return -1;
    memset(p, fill, size);
    /* Deliberately leaked: the memory must stay in the instance's heap. */
    __asm__ volatile("" : : "r"(p) : "memory");
    return 0;
}
#endif
