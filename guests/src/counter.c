/* counter: stdin-driven stateful guest.
 * Each non-blank stdin line is an integer added to a running total; after each
 * one it prints "total=N" (flushed). Non-integer lines print "bad input: LINE"
 * on stderr and are skipped. At EOF it prints "final=N" and exits 0. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    long long total = 0;
    char line[4096];
    while (fgets(line, sizeof line, stdin) != NULL) {
        size_t len = strlen(line);
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) {
            line[--len] = '\0';
        }
        const char *p = line;
        while (isspace((unsigned char)*p)) p++;
        if (*p == '\0') continue; /* blank line */
        char *end;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        while (isspace((unsigned char)*end)) end++;
        if (end == p || *end != '\0' || errno == ERANGE) {
            fprintf(stderr, "bad input: %s\n", line);
            fflush(stderr);
            continue;
        }
        total += v;
        printf("total=%lld\n", total);
        fflush(stdout);
    }
    printf("final=%lld\n", total);
    fflush(stdout);
    return 0;
}
