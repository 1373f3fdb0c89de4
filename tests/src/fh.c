// File handles of a mount (issue 16 item 5), used by tests/generic/023.
//   fh save PATH FILE        name_to_handle_at(PATH) into FILE
//   fh open MOUNTDIR FILE    open_by_handle_at(FILE) and print what it opened: a
//                            directory's path relative to MOUNTDIR, or a file's first line
// Prints the errno name of a failure ("ESTALE") instead.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *ename(int e) {
    switch (e) {
    case ESTALE: return "ESTALE";
    case ENOENT: return "ENOENT";
    case EINVAL: return "EINVAL";
    case EPERM: return "EPERM";
    case EACCES: return "EACCES";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return strerror(e);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: fh save PATH FILE | fh open MOUNTDIR FILE\n"); return 2; }
    struct file_handle *fh = malloc(sizeof(*fh) + MAX_HANDLE_SZ);
    if (!strcmp(argv[1], "save")) {
        int mnt_id;
        fh->handle_bytes = MAX_HANDLE_SZ;
        if (name_to_handle_at(AT_FDCWD, argv[2], fh, &mnt_id, 0)) { printf("name_to_handle_at: %s\n", ename(errno)); return 1; }
        FILE *f = fopen(argv[3], "w");
        if (!f || fwrite(fh, sizeof(*fh) + fh->handle_bytes, 1, f) != 1 || fclose(f)) { perror(argv[3]); return 2; }
        return 0;
    }
    FILE *f = fopen(argv[3], "r");
    if (!f || fread(fh, 1, sizeof(*fh) + MAX_HANDLE_SZ, f) < sizeof(*fh)) { perror(argv[3]); return 2; }
    fclose(f);
    int mfd = open(argv[2], O_RDONLY | O_DIRECTORY);
    if (mfd < 0) { perror(argv[2]); return 2; }
    int fd = open_by_handle_at(mfd, fh, O_RDONLY);
    if (fd < 0) { printf("%s\n", ename(errno)); return 0; }
    struct stat st;
    fstat(fd, &st);
    if (S_ISDIR(st.st_mode)) {
        char link[4096] = {0}, proc[64], root[4096] = {0};
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        if (readlink(proc, link, sizeof link - 1) < 0 || !realpath(argv[2], root)) { perror("readlink"); return 2; }
        size_t n = strlen(root);
        printf("directory %s\n", strncmp(link, root, n) ? link : link[n] ? link + n + 1 : ".");
    } else {
        char buf[256] = {0};
        ssize_t n = read(fd, buf, sizeof buf - 1);
        if (n < 0) { printf("read: %s\n", ename(errno)); return 0; }
        char *nl = strchr(buf, '\n');
        if (nl) *nl = 0;
        printf("file: %s\n", buf);
    }
    return 0;
}
