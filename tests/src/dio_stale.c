// Stale page cache after AIO O_DIRECT writes (issue 16 item 1; the scenario of xfstests
// generic/451 / aio-dio-cycle-write: a backup tool reading an InnoDB file that the
// database writes with native AIO + O_DIRECT). Used by tests/generic/020.
//
// A writer cycles AIO O_DIRECT writes of 0x55 / 0xaa over the whole file and checks each
// with a buffered read; N reader processes keep doing buffered reads of the file.
//   dio_stale FILE [-s SECONDS] [-r READERS] [-b BYTES] [-k] [-S]
//   -k  the checking read goes through one buffered descriptor kept open for the whole run
//       (a long-lived reader) instead of a fresh open per check (generic/451's way)
//   -S  synchronous O_DIRECT pwrite instead of io_submit
//   -q N  split each write into N AIO requests submitted at once (N FUSE WRITEs in flight)
// Exit 0: no stale data in SECONDS; exit 1: stale data seen (prints when and what).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(2); }

int main(int argc, char **argv) {
    const char *path = NULL;
    int secs = 30, readers = 4, keep = 0, sync_dio = 0, depth = 1;
    size_t size = 640 * 1024;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-s")) secs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r")) readers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-b")) size = strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "-k")) keep = 1;
        else if (!strcmp(argv[i], "-S")) sync_dio = 1;
        else if (!strcmp(argv[i], "-q")) depth = atoi(argv[++i]);
        else path = argv[i];
    }
    if (!path) { fprintf(stderr, "usage: dio_stale FILE [-s S] [-r N] [-b BYTES] [-k] [-S] [-q N]\n"); return 2; }
    unsigned char *pat[2], *cmp;
    if (posix_memalign((void **)&pat[0], 4096, size) || posix_memalign((void **)&pat[1], 4096, size) ||
        posix_memalign((void **)&cmp, 4096, size))
        die("posix_memalign");
    memset(pat[0], 0x55, size);
    memset(pat[1], 0xaa, size);
    int fd = open(path, O_DIRECT | O_CREAT | O_RDWR | O_TRUNC, 0644);
    if (fd < 0) die("open");
    if (pwrite(fd, pat[0], size, 0) != (ssize_t)size) die("initial pwrite");
    fsync(fd);
    close(fd);

    pid_t kids[64];
    for (int r = 0; r < readers && r < 64; r++) {
        kids[r] = fork();
        if (kids[r] == 0) {
            unsigned char *b = malloc(size);
            for (;;) {
                int rfd = open(path, O_RDONLY);
                if (rfd < 0) _exit(0);
                for (int k = 0; k < 16; k++) pread(rfd, b, size, 0);
                close(rfd);
            }
        }
    }

    aio_context_t ctx = 0;
    if (depth < 1 || depth > 256 || size % (4096 * depth)) { fprintf(stderr, "bad -q\n"); return 2; }
    if (syscall(SYS_io_setup, depth, &ctx)) die("io_setup");
    int kfd = keep ? open(path, O_RDONLY) : -1;
    double t0 = now();
    long iter = 0;
    int rc = 0;
    while (now() - t0 < secs) {
        int i = (int)(++iter % 2);
        int wfd = open(path, O_DIRECT | O_RDWR);
        if (wfd < 0) die("open O_DIRECT");
        if (sync_dio) {
            if (pwrite(wfd, pat[i], size, 0) != (ssize_t)size) die("pwrite O_DIRECT");
        } else {
            struct iocb cb[256];
            struct iocb *cbs[256];
            size_t chunk = size / depth;
            for (int q = 0; q < depth; q++) {
                memset(&cb[q], 0, sizeof cb[q]);
                cb[q].aio_fildes = wfd;
                cb[q].aio_lio_opcode = IOCB_CMD_PWRITE;
                cb[q].aio_buf = (unsigned long)(pat[i] + q * chunk);
                cb[q].aio_nbytes = chunk;
                cb[q].aio_offset = q * chunk;
                cbs[q] = &cb[q];
            }
            if (syscall(SYS_io_submit, ctx, depth, cbs) != depth) die("io_submit");
            struct io_event ev[256];
            int got = 0;
            while (got < depth) {
                long r = syscall(SYS_io_getevents, ctx, 1, depth - got, ev + got, NULL);
                if (r < 0) die("io_getevents");
                got += r;
            }
            for (int q = 0; q < depth; q++)
                if (ev[q].res != (long long)chunk) { fprintf(stderr, "aio write res %lld\n", (long long)ev[q].res); exit(2); }
        }
        close(wfd);
        int cfd = keep ? kfd : open(path, O_RDONLY);
        if (cfd < 0) die("open check");
        if (pread(cfd, cmp, size, 0) != (ssize_t)size) die("pread check");
        if (!keep) close(cfd);
        if (memcmp(cmp, pat[i], size)) {
            size_t off = 0;
            while (off < size && cmp[off] == pat[i][off]) off++;
            size_t end = off;
            while (end < size && cmp[end] != pat[i][end]) end++;
            printf("STALE after %.2f s, iteration %ld: expected 0x%02x, buffered read has 0x%02x at "
                   "[%zu, %zu) (first differing run)\n", now() - t0, iter, pat[i][0], cmp[off], off, end);
            int dfd = open(path, O_RDONLY | O_DIRECT);
            if (dfd >= 0 && pread(dfd, cmp, size, 0) == (ssize_t)size)
                printf("O_DIRECT read of the same range: %s\n", memcmp(cmp, pat[i], size) ? "also stale" : "correct");
            rc = 1;
            break;
        }
    }
    if (!rc) printf("no stale data in %ld iterations (%d s)\n", iter, secs);
    for (int r = 0; r < readers && r < 64; r++) kill(kids[r], SIGKILL);
    while (wait(NULL) > 0) {}
    return rc;
}
