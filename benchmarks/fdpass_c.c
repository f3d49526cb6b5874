/* The C reference for the fdpass benchmark: a sender child and a receiver parent over a
 * socketpair, BATCH fds per sendmsg, MESSAGES messages; the receiver closes what it gets.
 * Prints the receiver's elapsed seconds. Usage: fdpass_c BATCH MESSAGES */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int batch = atoi(argv[1]), messages = atoi(argv[2]);
    int sv[2], pfd[2];
    if (batch < 1 || batch > 253 || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || pipe(pfd)) return 2;
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
        for (int i = 0; i < messages; i++) {
            memset(cbuf, 0, space);
            msg.msg_control = cbuf;
            msg.msg_controllen = space;
            struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
            c->cmsg_level = SOL_SOCKET;
            c->cmsg_type = SCM_RIGHTS;
            c->cmsg_len = CMSG_LEN(sizeof(int) * batch);
            int *fds = (int *)CMSG_DATA(c);
            for (int j = 0; j < batch; j++) fds[j] = pfd[j & 1];
            if (sendmsg(sv[1], &msg, 0) < 0) _exit(1);
        }
        _exit(0);
    }
    close(sv[1]);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < messages; i++) {
        msg.msg_control = cbuf;
        msg.msg_controllen = space;
        if (recvmsg(sv[0], &msg, MSG_CMSG_CLOEXEC) <= 0) return 3;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            int n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *fds = (int *)CMSG_DATA(c);
            for (int j = 0; j < n; j++) close(fds[j]);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    waitpid(pid, NULL, 0);
    printf("%.9f\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
