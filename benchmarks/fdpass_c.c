/* The C reference for the fdpass benchmark: a sender child and a receiver parent over a
 * socketpair, BATCH fds per sendmsg, MESSAGES messages. The sender reuses one prebuilt
 * message (as the Python senders do) and starts when the receiver is ready. The receiver
 * closes what it gets: SINK "close" is one close() per fd, "close_range" one close_range()
 * per contiguous run of fd numbers (as pyautofs.close_fds does).
 * Prints the receiver's elapsed seconds. Usage: fdpass_c BATCH MESSAGES SINK */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

static void close_runs(const int *fds, int n) {
    int i = 0;
    while (i < n) {
        int j = i;
        while (j + 1 < n && fds[j + 1] == fds[j] + 1) j++;
        if (j - i + 1 >= 4)
            syscall(SYS_close_range, (unsigned)fds[i], (unsigned)fds[j], 0u);
        else
            for (int k = i; k <= j; k++) close(fds[k]);
        i = j + 1;
    }
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int batch = atoi(argv[1]), messages = atoi(argv[2]);
    int use_range = strcmp(argv[3], "close_range") == 0;
    int sv[2], pfd[2], gate[2];
    if (batch < 1 || batch > 253 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(pfd) ||
        pipe(gate))
        return 2;
    size_t space = CMSG_SPACE(sizeof(int) * batch);
    char *cbuf = calloc(1, space);
    char byte = 'x';
    struct iovec iov = {&byte, 1};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    pid_t pid = fork();
    if (pid == 0) {
        close(sv[0]);
        close(gate[1]);
        msg.msg_control = cbuf;
        msg.msg_controllen = space;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * batch);
        int *fds = (int *)CMSG_DATA(c);
        for (int j = 0; j < batch; j++) fds[j] = pfd[j & 1];
        char go;
        if (read(gate[0], &go, 1) != 1) _exit(1);
        for (int i = 0; i < messages; i++)
            if (sendmsg(sv[1], &msg, 0) < 0) _exit(1);
        _exit(0);
    }
    close(sv[1]);
    close(gate[0]);
    char *rbuf = calloc(1, CMSG_SPACE(sizeof(int) * 253));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (write(gate[1], "g", 1) != 1) return 3;
    for (int i = 0; i < messages; i++) {
        msg.msg_control = rbuf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * 253);
        if (recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC) <= 0) return 3;
        if (msg.msg_flags & MSG_CTRUNC) return 4;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            int n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *fds = (int *)CMSG_DATA(c);
            if (use_range)
                close_runs(fds, n);
            else
                for (int j = 0; j < n; j++) close(fds[j]);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    waitpid(pid, NULL, 0);
    printf("%.9f\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
