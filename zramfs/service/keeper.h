/* The keeper: a process that shares the daemon's address space (clone with CLONE_VM, not a
   thread of it) and does nothing but exist, so that the daemon's memory, its mlock'ed
   mappings of the pools' memfds included, outlives the daemon. A SIGKILL'd daemon's pages
   then stay locked, out of reach of reclaim, until its successor has mapped (and locked) them
   itself and ends the keeper (hazard 6 across a live restart: reclaim must never put a kept
   page on a swap device that only the successor can serve).

   The keeper runs on a stack of its own with the daemon's thread pointer, so it must not touch
   libc (errno, locks): it makes raw system calls only. It holds no descriptor of the
   daemon's but a pidfd of it; once the daemon's thread group is gone it waits `grace`
   seconds for a successor to end it, then ends itself, so a daemon that nobody restarts
   does not leave its memory behind. An exec (a graceful restart) keeps the pid: the
   successor is the one to end it then. */
#ifndef ZRAMFS_KEEPER_H
#define ZRAMFS_KEEPER_H
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#define ZRAM_KEEPER 1
static inline long keeper_raw4(long n, long a, long b, long c, long d) {
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
#define ZRAM_KEEPER 1
static inline long keeper_raw4(long n, long a, long b, long c, long d) {
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
}
#else
#define ZRAM_KEEPER 0
#endif

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define KEEPER_STACK (16 * 1024)

struct keeper_args {
    int pidfd;              /* the daemon's */
    long grace;             /* seconds to wait for a successor after the daemon's end */
};

#if ZRAM_KEEPER
static int keeper_main(void* arg) {
    struct keeper_args* a = (struct keeper_args*)arg;
    int pidfd = a->pidfd;
    struct timespec grace = {a->grace, 0};
    struct pollfd p = {pidfd, POLLIN, 0};
    if (pidfd > 0)
        keeper_raw4(SYS_close_range, 0, pidfd - 1, 0, 0);
    keeper_raw4(SYS_close_range, pidfd + 1, ~0U, 0, 0);
    /* Every signal is blocked (see keeper_start): only SIGKILL ends it early. */
    while (keeper_raw4(SYS_ppoll, (long)&p, 1, 0, 0) <= 0) {}
    keeper_raw4(SYS_ppoll, 0, 0, (long)&grace, 0);
    keeper_raw4(SYS_exit_group, 0, 0, 0, 0);
    return 0;
}
#endif

/* Starts the keeper; its pid, or -errno. Called with the GIL, from any thread. */
static int keeper_start(long grace) {
#if ZRAM_KEEPER
    sigset_t all, old;
    struct keeper_args* a;
    char* stack;
    int pid, err;
    int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (pidfd < 0)
        return -errno;
    /* Never freed: the keeper may outlive everything of this process that could free it. */
    stack = mmap(NULL, KEEPER_STACK, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        err = errno;
        close(pidfd);
        return -err;
    }
    a = (struct keeper_args*)stack;
    a->pidfd = pidfd;
    a->grace = grace;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = clone(keeper_main, stack + KEEPER_STACK, CLONE_VM | SIGCHLD, a);
    err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(pidfd);
    return pid < 0 ? -err : pid;
#else
    (void)grace;
    return -ENOSYS;
#endif
}
#endif
