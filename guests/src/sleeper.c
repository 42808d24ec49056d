/* sleeper: wall-clock guest for timeout / wall-time tests.
 *   sleeper MS   prints "sleeping", sleeps MS milliseconds, prints "awake" */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long ms = argc > 1 ? strtol(argv[1], NULL, 10) : 1000;
    if (ms < 0) ms = 0;
    printf("sleeping\n");
    fflush(stdout);
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
    printf("awake\n");
    fflush(stdout);
    return 0;
}
