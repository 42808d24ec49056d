/* fileio: filesystem guest for preopen / permission tests.
 *   fileio write  PATH TEXT   create/truncate PATH, write TEXT, print "wrote N bytes"
 *   fileio append PATH TEXT   append TEXT to PATH (creating it), print "wrote N bytes"
 *   fileio read   PATH        copy PATH verbatim to stdout
 *   fileio ls     DIR         entry names of DIR, sorted, one per line (no . and ..)
 * Errors print "error: <strerror> PATH" on stderr and exit 1; bad usage exits 2. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *path) {
    fprintf(stderr, "error: %s %s\n", strerror(errno), path);
    return 1;
}

static int usage(void) {
    fprintf(stderr,
            "usage: fileio write PATH TEXT | append PATH TEXT | read PATH | ls DIR\n");
    return 2;
}

static int write_file(const char *path, const char *text, const char *mode) {
    FILE *f = fopen(path, mode);
    if (f == NULL) return fail(path);
    size_t len = strlen(text);
    if (fwrite(text, 1, len, f) != len) {
        int saved = errno;
        fclose(f);
        errno = saved;
        return fail(path);
    }
    if (fclose(f) != 0) return fail(path);
    printf("wrote %zu bytes\n", len);
    return 0;
}

static int read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return fail(path);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        fwrite(buf, 1, n, stdout);
    }
    if (ferror(f)) {
        int saved = errno;
        fclose(f);
        errno = saved;
        return fail(path);
    }
    fclose(f);
    return 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int list_dir(const char *path) {
    DIR *d = opendir(path);
    if (d == NULL) return fail(path);
    char **names = NULL;
    size_t count = 0, cap = 0;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 16;
            char **grown = realloc(names, cap * sizeof *names);
            if (grown == NULL) {
                closedir(d);
                return fail(path);
            }
            names = grown;
        }
        names[count] = strdup(e->d_name);
        if (names[count] == NULL) {
            closedir(d);
            return fail(path);
        }
        count++;
        errno = 0;
    }
    if (errno != 0) {
        int saved = errno;
        closedir(d);
        errno = saved;
        return fail(path);
    }
    closedir(d);
    qsort(names, count, sizeof *names, cmp_names);
    for (size_t i = 0; i < count; i++) {
        printf("%s\n", names[i]);
        free(names[i]);
    }
    free(names);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) return usage();
    const char *cmd = argv[1];
    if (strcmp(cmd, "write") == 0 && argc == 4) return write_file(argv[2], argv[3], "wb");
    if (strcmp(cmd, "append") == 0 && argc == 4) return write_file(argv[2], argv[3], "ab");
    if (strcmp(cmd, "read") == 0 && argc == 3) return read_file(argv[2]);
    if (strcmp(cmd, "ls") == 0 && argc == 3) return list_dir(argv[2]);
    return usage();
}
