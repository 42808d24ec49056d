/* hostile: what a guest set on hurting its host tries (tests/tests/hostile.rs).
 *   hostile sparse PATH BYTES [OFFSET TEXT]
 *       create PATH as a sparse file of BYTES bytes (fd_filestat_set_size), then
 *       write TEXT at OFFSET if given; prints "sparse BYTES"
 *   hostile spew BYTES     write BYTES bytes of 'x' to stdout and no newline
 *                          (0: forever); prints nothing else
 *   hostile spin           loop forever without a call (no point where a checkpoint
 *                          can stop it: a memory snapshot of it waits, then fails)
 *   hostile relink TARGET LINK
 *       move LINK aside (to LINK.moved) if it exists, then make LINK a symlink to
 *       TARGET (relative targets may climb out of the tree); prints "linked"
 *   hostile openall PATH   open PATH again and again without closing until an open
 *                          fails; prints "opened N: <strerror>", then closes them all
 *                          and prints "reopened" if PATH opens again
 *   hostile fill PATH      append 64 KiB blocks to PATH until a write fails; prints
 *                          "filled N: <strerror>" (N bytes written), then deletes PATH
 *                          and prints "rewrote" if a 64 KiB file can be written again
 *   hostile seekwrite PATH OFFSET
 *                          seek PATH's descriptor to OFFSET and write one byte there
 *                          (a hole before it); prints "wrote"
 *   hostile shrinkwrite F G BYTES
 *                          write BYTES to F, truncate F through a second descriptor,
 *                          write BYTES to G, then one byte through the first descriptor
 *                          (still at BYTES: F grows back to BYTES + 1); prints "wrote"
 * Errors print "error: <strerror> WHAT" on stderr and exit 1; bad usage exits 2. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int fail(const char *what) {
    fprintf(stderr, "error: %s %s\n", strerror(errno), what);
    return 1;
}

static int usage(void) {
    fprintf(stderr,
            "usage: hostile sparse PATH BYTES [OFFSET TEXT] | spew BYTES | spin | relink TARGET LINK"
            " | openall PATH | fill PATH | seekwrite PATH OFFSET | shrinkwrite F G BYTES\n");
    return 2;
}

static int sparse(int argc, char **argv) {
    if (argc != 4 && argc != 6) return usage();
    long long size = strtoll(argv[3], NULL, 10);
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail(argv[2]);
    if (ftruncate(fd, (off_t)size) != 0) return fail("ftruncate");
    if (argc == 6) {
        long long offset = strtoll(argv[4], NULL, 10);
        size_t len = strlen(argv[5]);
        if (pwrite(fd, argv[5], len, (off_t)offset) != (ssize_t)len) return fail("pwrite");
    }
    if (close(fd) != 0) return fail(argv[2]);
    printf("sparse %lld\n", size);
    return 0;
}

static int spew(long long bytes) {
    static char buf[65536];
    memset(buf, 'x', sizeof buf);
    long long left = bytes;
    while (bytes == 0 || left > 0) {
        size_t n = sizeof buf;
        if (bytes != 0 && (long long)n > left) n = (size_t)left;
        ssize_t w = write(1, buf, n);
        if (w < 0) return fail("stdout");
        left -= w;
    }
    return 0;
}

static int spin(void) {
    volatile unsigned x = 1;
    for (;;) x = x * 31u + 7u;
    return 0;
}

static int relink(const char *target, const char *link) {
    char moved[4096];
    snprintf(moved, sizeof moved, "%s.moved", link);
    if (rename(link, moved) != 0 && errno != ENOENT) return fail(link);
    if (symlink(target, link) != 0) return fail(link);
    printf("linked\n");
    return 0;
}

static int openall(const char *path) {
    static int fds[1 << 16];
    int n = 0;
    while (n < (int)(sizeof fds / sizeof fds[0])) {
        int fd = open(path, O_RDONLY | O_CREAT, 0644);
        if (fd < 0) break;
        fds[n++] = fd;
    }
    printf("opened %d: %s\n", n, strerror(errno));
    for (int i = 0; i < n; i++) close(fds[i]);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail(path);
    close(fd);
    printf("reopened\n");
    return 0;
}

static int fill(const char *path) {
    static char block[65536];
    memset(block, 'f', sizeof block);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return fail(path);
    long long total = 0;
    for (;;) {
        ssize_t w = write(fd, block, sizeof block);
        if (w <= 0) break;
        total += w;
    }
    printf("filled %lld: %s\n", total, strerror(errno));
    close(fd);
    if (unlink(path) != 0) return fail(path);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail(path);
    if (write(fd, block, sizeof block) != (ssize_t)sizeof block) return fail("rewrite");
    close(fd);
    printf("rewrote\n");
    return 0;
}

static int seekwrite(const char *path, long long offset) {
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd < 0) return fail(path);
    if (lseek(fd, (off_t)offset, SEEK_SET) < 0) return fail("lseek");
    if (write(fd, "x", 1) != 1) return fail("write");
    close(fd);
    printf("wrote\n");
    return 0;
}

static int write_all(int fd, long long bytes) {
    static char block[65536];
    memset(block, 'w', sizeof block);
    while (bytes > 0) {
        size_t n = bytes < (long long)sizeof block ? (size_t)bytes : sizeof block;
        ssize_t w = write(fd, block, n);
        if (w <= 0) return -1;
        bytes -= w;
    }
    return 0;
}

static int shrinkwrite(const char *f, const char *g, long long bytes) {
    int a = open(f, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (a < 0 || write_all(a, bytes) != 0) return fail(f);
    int b = open(f, O_WRONLY | O_TRUNC);
    if (b < 0) return fail(f);
    close(b);
    int c = open(g, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (c < 0 || write_all(c, bytes) != 0) return fail(g);
    close(c);
    if (write(a, "x", 1) != 1) return fail("shrinkwrite");
    close(a);
    printf("wrote\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage();
    if (strcmp(argv[1], "sparse") == 0) return sparse(argc, argv);
    if (strcmp(argv[1], "spew") == 0 && argc == 3) return spew(strtoll(argv[2], NULL, 10));
    if (strcmp(argv[1], "spin") == 0) return spin();
    if (strcmp(argv[1], "relink") == 0 && argc == 4) return relink(argv[2], argv[3]);
    if (strcmp(argv[1], "openall") == 0 && argc == 3) return openall(argv[2]);
    if (strcmp(argv[1], "fill") == 0 && argc == 3) return fill(argv[2]);
    if (strcmp(argv[1], "seekwrite") == 0 && argc == 4) return seekwrite(argv[2], strtoll(argv[3], NULL, 10));
    if (strcmp(argv[1], "shrinkwrite") == 0 && argc == 5)
        return shrinkwrite(argv[2], argv[3], strtoll(argv[4], NULL, 10));
    return usage();
}
