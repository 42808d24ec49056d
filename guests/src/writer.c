/* writer: keeps changing files, for snapshot-consistency tests.
 *   writer DIR [STEPS]
 * Step i (from 1) writes i into DIR/a, then i into DIR/b, then appends "i\n" to
 * DIR/log, printing "step i" every 1000 steps. STEPS 0 (the default) never ends.
 * At any consistent moment: b <= a <= b + 1 and log's last line is b or a. */
#include <stdio.h>
#include <stdlib.h>

static void put(const char *dir, const char *name, long v, const char *mode) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, mode);
    if (f == NULL) {
        perror(path);
        exit(1);
    }
    fprintf(f, "%ld\n", v);
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: writer DIR [STEPS]\n");
        return 2;
    }
    long steps = argc > 2 ? strtol(argv[2], NULL, 10) : 0;
    for (long i = 1; steps == 0 || i <= steps; i++) {
        put(argv[1], "a", i, "w");
        put(argv[1], "b", i, "w");
        put(argv[1], "log", i, "a");
        if (i % 1000 == 0) {
            printf("step %ld\n", i);
            fflush(stdout);
        }
    }
    return 0;
}
