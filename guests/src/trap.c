/* trap: guest that dies with a wasm trap.
 *   trap                 "about to trap", then unreachable (__builtin_trap)
 *   trap divzero         integer division by zero
 *   trap stackoverflow   unbounded, non-tail recursion */
#include <stdio.h>
#include <string.h>

static volatile int zero = 0;

__attribute__((noinline)) static int recurse(volatile int depth) {
    volatile char pad[256];
    pad[0] = (char)depth;
    /* The addition after the call keeps it from being a tail call. */
    return recurse(depth + 1) + pad[0];
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "unreachable";
    if (strcmp(mode, "divzero") == 0) {
        printf("about to divide by zero\n");
        fflush(stdout);
        volatile int num = 42;
        volatile int r = num / zero;
        printf("unreachable: %d\n", r);
        return 0;
    }
    if (strcmp(mode, "stackoverflow") == 0) {
        printf("about to overflow the stack\n");
        fflush(stdout);
        return recurse(0);
    }
    printf("about to trap\n");
    fflush(stdout);
    __builtin_trap();
}
