/* hello: smoke-test guest.
 * Prints a greeting, its arguments, GREETING from the environment, a line on
 * stderr, and exits with $EXIT_CODE (default 0). */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    printf("hello from stasis\n");
    for (int i = 1; i < argc; i++) {
        printf("arg[%d]=%s\n", i, argv[i]);
    }
    const char *greeting = getenv("GREETING");
    if (greeting != NULL) {
        printf("GREETING=%s\n", greeting);
    }
    fflush(stdout);
    fprintf(stderr, "to stderr\n");
    fflush(stderr);
    const char *code = getenv("EXIT_CODE");
    return code != NULL ? atoi(code) : 0;
}
