/* uexp: what the kernel does with FUSE-over-io_uring ring entries when their process goes.
 * Experiments E1..E4 of zramfs docs/fuse-protocol.md section 5.1, run on Linux 6.18.
 * Written for this experiment; build: gcc -O2 -Wall -o uexp uexp.c -luring
 * Run only through run.sh (machine lock, enable_uring saved/restored, cleanup).
 *
 *   uexp e1 [watch]   two servers on one ring, A exits, does B serve?  (watch: a child keeps
 *                     A's ring fd open and reads the CQEs A's entries get when A exits)
 *   uexp e2           the same under continuous load, stranded requests counted
 *   uexp e3           SIGKILL of the server, a new server registers, backlog per CPU
 *   uexp e4 a|b|c     commit of A's request by process B:
 *                     a = B's buffers elsewhere, A's addresses unmapped in B
 *                     b = A's buffers in a MAP_SHARED memfd mapped at the same VA in both
 *                     c = B forked from A: same VA, but B's private copy of the memory
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/fuse.h>

/* ---- protocol bits newer than Debian's <linux/fuse.h> 7.38 (values from the 7.42+ ABI) ---- */
#define X_OVER_IO_URING_FLAGS2 (1u << 9) /* FUSE_OVER_IO_URING = 1ULL << 41 */
#define X_CMD_REGISTER 1
#define X_CMD_COMMIT_AND_FETCH 2
struct x_ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct x_req_header { char in_out[128]; char op_in[128]; struct x_ent_in_out ent; };
struct x_cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };
_Static_assert(sizeof(struct x_req_header) == 288, "hdr");
_Static_assert(sizeof(struct x_cmd_req) == 24, "cmd");

#define MAX_WRITE (128 * 1024)
#define MAX_PAGES 32
#define PAYLOAD (128 * 1024)            /* = max(8192, max_write, max_pages*4096) */
#define HDRSZ 4096                      /* header buffer slot, >= 288 */
#define SLOT (HDRSZ + PAYLOAD)
#define FSIZE (1024 * 1024)
#define MAXQ 8
#define MAXS 4
#define MAXR 32
#define MAXP 64

/* ---- shared state between the supervisor and its children ---- */
struct shared {
    volatile int ctl[MAXS];            /* 0 serve, 1 exit now, 2 hold the next READ */
    volatile int ready[MAXS];
    volatile int pid[MAXS];
    volatile long served[MAXS];
    volatile long served_q[MAXS][MAXQ];
    volatile long cqe_enotconn[MAXS], cqe_ecanceled[MAXS], cqe_other[MAXS];
    volatile int cqe_other_res[MAXS];
    volatile int unreaped_at_exit[MAXS];
    volatile int reg_err[MAXS];
    /* E1 watch: CQEs on A's ring after A exited, read by a child holding A's ring fd */
    volatile int watch_go, watch_done, watch_pid;
    volatile int watch_n, watch_res[64];
    /* classic /dev/fuse reader */
    volatile long classic_served, classic_forget, classic_interrupt;
    volatile int intr_reply_errno[16];
    volatile int intr_n;
    /* readers */
    volatile int rstop;
    volatile int rpid[MAXR], rcpu[MAXR];
    volatile long rops[MAXR];
    volatile int rerr[MAXR];          /* errno that ended the reader, 0 still running */
    volatile long rbad[MAXR];
    /* E4 */
    volatile int held;
    volatile uint64_t held_commit_id, held_unique, held_hdr, held_payload;
    volatile int held_qid, held_size;
    volatile int64_t held_off;
    volatile int b_go, b_go2, b_phase, b_pid, b_commit, b_stop;
    volatile long b_commit_ms;
    volatile int b_ms2[16];
    volatile int b_submit_ret, b_cqe1, b_cqe1_res;
    volatile int b_n2;
    volatile int b_res2[16], b_op2[16];
    volatile int b_final_n, b_final_res[8];
    volatile uint64_t b_hdr, b_payload;
    volatile int probe_ret[4], probe_errno[4], probe_open_errno[4], probe_done[4];
    volatile unsigned char probe_first[4];
    volatile int probe_pid[4];
};
static struct shared* sh;

static int devfd = -1;
static int nq;                          /* possible CPUs = ring queues */
static char mnt[64] = "";
static char fpath[96];
static char conndir[96] = "";
static int mounted = 0, fusectl_mounted = 0;
static int children[MAXP];
static int nchildren;
static struct timespec t0;
static void* shared_region;             /* E4 b: memfd buffers at one VA in all processes */

static long ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
}
static void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("[%6ld ms] ", ms());
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
    va_end(ap);
}
static void track(int pid) {
    if (pid <= 0) return;
    for (int i = 0; i < nchildren; i++) if (children[i] == pid) return;
    if (nchildren < MAXP) children[nchildren++] = pid;
}
/* forget a pid once reaped, so nothing is ever sent to a pid that may have been reused */
static void reaped(int pid) {
    for (int i = 0; i < nchildren; i++) if (children[i] == pid) children[i] = 0;
}
static void reap(void) {
    int p;
    while ((p = waitpid(-1, NULL, WNOHANG)) > 0) reaped(p);
}
static void on_alarm(int s);
/* fork; the child forgets the supervisor's duties (no alarm clean-up, no children to kill) */
static int xfork(void) {
    fflush(stdout);
    int p = fork();
    if (p == 0) {
        signal(SIGALRM, SIG_DFL);
        nchildren = 0;
        mounted = 0;
        fusectl_mounted = 0;
        mnt[0] = 0;
        conndir[0] = 0;
    }
    return p;
}

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof(s), &s);
}

static unsigned char pat(uint64_t off) { return (unsigned char)(off * 131 + (off >> 10) + 7); }

/* ---- sysfs ---- */
static long read_waiting(void) {
    char p[128], b[32];
    snprintf(p, sizeof(p), "%s/waiting", conndir);
    int fd = open(p, O_RDONLY);
    if (fd < 0) return -1;
    int n = read(fd, b, sizeof(b) - 1);
    close(fd);
    if (n <= 0) return -1;
    b[n] = 0;
    return atol(b);
}
static void abort_conn(void) {
    char p[128];
    snprintf(p, sizeof(p), "%s/abort", conndir);
    int fd = open(p, O_WRONLY);
    if (fd >= 0) { if (write(fd, "1", 1) < 0) {} close(fd); }
}

/* state letter, wchan, and the top kernel frames of a process */
static void proc_state(int pid, char* st, char* wchan, size_t wn, char* stack, size_t sn) {
    char p[64], b[512];
    *st = '?';
    wchan[0] = stack[0] = 0;
    snprintf(p, sizeof(p), "/proc/%d/stat", pid);
    int fd = open(p, O_RDONLY);
    if (fd >= 0) {
        int n = read(fd, b, sizeof(b) - 1);
        close(fd);
        if (n > 0) { b[n] = 0; char* c = strrchr(b, ')'); if (c && c[1]) *st = c[2]; }
    }
    snprintf(p, sizeof(p), "/proc/%d/wchan", pid);
    fd = open(p, O_RDONLY);
    if (fd >= 0) { int n = read(fd, wchan, wn - 1); wchan[n > 0 ? n : 0] = 0; close(fd); }
    snprintf(p, sizeof(p), "/proc/%d/stack", pid);
    fd = open(p, O_RDONLY);
    if (fd >= 0) {
        char sb[4096];
        int n = read(fd, sb, sizeof(sb) - 1);
        close(fd);
        if (n > 0) {
            sb[n] = 0;
            /* keep function names of the first 5 frames */
            char* s = sb; size_t o = 0; int k = 0;
            while (*s && k < 5 && o + 2 < sn) {
                char* f = strchr(s, ' ');
                char* e = strchr(s, '\n');
                if (!e) break;
                if (f && f < e) {
                    f++;
                    char* plus = memchr(f, '+', e - f);
                    size_t l = (plus ? plus : e) - f;
                    if (o + l + 2 < sn) { memcpy(stack + o, f, l); o += l; stack[o++] = '<'; }
                }
                s = e + 1; k++;
            }
            if (o) o--;
            stack[o] = 0;
        }
    }
}
static int alive(int pid) {
    char st, w[64], s[8];
    proc_state(pid, &st, w, sizeof(w), s, sizeof(s));
    return st != '?' && st != 'Z' && st != 'X';
}

/* ---- cleanup: only syscalls, usable from the SIGALRM handler ---- */
static void cleanup(void) {
    if (conndir[0]) abort_conn();
    for (int i = 0; i < nchildren; i++) if (children[i] > 0) kill(children[i], SIGKILL);
    for (int round = 0; round < 50; round++) {
        int left = 0;
        reap();
        for (int i = 0; i < nchildren; i++) if (children[i] > 0 && kill(children[i], 0) == 0) left++;
        if (!left) break;
        usleep(100000);
    }
    if (devfd >= 0) { close(devfd); devfd = -1; }
    if (mounted) { umount2(mnt, MNT_DETACH); mounted = 0; }
    if (mnt[0]) rmdir(mnt);
    if (fusectl_mounted) { umount2("/sys/fs/fuse/connections", MNT_DETACH); fusectl_mounted = 0; }
}
static void on_alarm(int s) {
    (void)s;
    static const char m[] = "!!! supervisor timeout, cleaning up\n";
    if (write(1, m, sizeof(m) - 1) < 0) {}
    cleanup();
    _exit(3);
}

/* ---- the file system: root dir (1) with one file "f" (2) of FSIZE bytes ---- */
static void fill_attr(struct fuse_attr* a, uint64_t ino) {
    memset(a, 0, sizeof(*a));
    a->ino = ino;
    if (ino == 1) { a->mode = S_IFDIR | 0755; a->nlink = 2; a->size = 4096; }
    else { a->mode = S_IFREG | 0644; a->nlink = 1; a->size = FSIZE; a->blocks = FSIZE / 512; }
    a->blksize = 4096;
}
/* one request: returns the error (0 or -errno), *outlen = reply body size in out.
   fillbyte >= 0: READ data is that byte instead of the file's pattern (E4 taker). */
static int handle(uint32_t op, uint64_t nodeid, const char* op_in, const char* name, char* out,
                  uint32_t* outlen, int fillbyte) {
    *outlen = 0;
    switch (op) {
    case FUSE_LOOKUP: {
        if (nodeid != 1 || strcmp(name, "f") != 0) return -ENOENT;
        struct fuse_entry_out e;
        memset(&e, 0, sizeof(e));
        e.nodeid = 2; e.generation = 1;
        fill_attr(&e.attr, 2);
        memcpy(out, &e, sizeof(e));
        *outlen = sizeof(e);
        return 0;
    }
    case FUSE_GETATTR: {
        struct fuse_attr_out a;
        memset(&a, 0, sizeof(a));
        fill_attr(&a.attr, nodeid);
        memcpy(out, &a, sizeof(a));
        *outlen = sizeof(a);
        return 0;
    }
    case FUSE_OPEN: case FUSE_OPENDIR: {
        struct fuse_open_out o;
        memset(&o, 0, sizeof(o));
        o.fh = 1;
        o.open_flags = op == FUSE_OPEN ? FOPEN_DIRECT_IO : 0;
        memcpy(out, &o, sizeof(o));
        *outlen = sizeof(o);
        return 0;
    }
    case FUSE_READ: {
        const struct fuse_read_in* r = (const void*)op_in;
        uint64_t off = r->offset;
        uint32_t n = r->size;
        if (off >= FSIZE) n = 0; else if (off + n > FSIZE) n = FSIZE - off;
        for (uint32_t i = 0; i < n; i++) out[i] = fillbyte >= 0 ? (char)fillbyte : (char)pat(off + i);
        *outlen = n;
        return 0;
    }
    case FUSE_RELEASE: case FUSE_RELEASEDIR: case FUSE_FLUSH:
        return 0;
    default:
        return -ENOSYS;
    }
}

/* ---- a ring server ---- */
struct ent {
    struct x_req_header* hdr;
    char* payload;
    struct iovec iov[2];
    int qid;
    int dead;
};

static void prep_cmd(struct io_uring* r, uint32_t op, int qid, uint64_t commit_id, struct iovec* iov,
                     uint64_t ud) {
    struct io_uring_sqe* sqe = io_uring_get_sqe(r);
    if (!sqe) { io_uring_submit(r); sqe = io_uring_get_sqe(r); }
    memset(sqe, 0, 128);
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = devfd;
    sqe->cmd_op = op;
    if (iov) { sqe->addr = (uint64_t)(uintptr_t)iov; sqe->len = 2; }
    struct x_cmd_req* c = (struct x_cmd_req*)sqe->cmd;
    c->commit_id = commit_id;
    c->qid = qid;
    sqe->user_data = ud;
}
static int ring_init(struct io_uring* r) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_SQE128;
    return io_uring_queue_init_params(64, r, &p);
}

/* Answer the request in entry buffers h/p; returns the opcode. */
static uint32_t answer_in(struct x_req_header* h, char* p, int fillbyte) {
    struct fuse_in_header ih;
    memcpy(&ih, h->in_out, sizeof(ih));
    char name[256] = "";
    if (ih.opcode == FUSE_LOOKUP) {
        uint32_t n = h->ent.payload_sz < 255 ? h->ent.payload_sz : 255;
        memcpy(name, p, n);
        name[n] = 0;
    }
    uint32_t outlen;
    int err = handle(ih.opcode, ih.nodeid, h->op_in, name, p, &outlen, fillbyte);
    struct fuse_out_header oh = { .len = sizeof(oh) + (err ? 0 : outlen), .error = err,
                                  .unique = ih.unique };
    memcpy(h->in_out, &oh, sizeof(oh));
    h->ent.payload_sz = err ? 0 : outlen;
    return ih.opcode;
}

static void watcher(struct io_uring* r) {
    /* holds A's ring fd; after A is gone, reads the CQEs A's entries got */
    alarm(40);
    while (!sh->watch_go) usleep(10000);
    long until = ms() + 1500;
    for (;;) {     /* until killed */
        struct io_uring_cqe* c;
        while (io_uring_peek_cqe(r, &c) == 0) {
            if (sh->watch_n < 64) sh->watch_res[sh->watch_n++] = c->res;
            io_uring_cqe_seen(r, c);
        }
        usleep(10000);
        if (ms() > until) sh->watch_done = 1;
    }
}

static void e4_taker(int variant);

static void server(int id, int depth, int use_region, int watch) {
    alarm(50);
    struct io_uring ring;
    int ret = ring_init(&ring);
    if (ret < 0) { sh->reg_err[id] = ret; _exit(1); }
    int n = nq * depth;
    struct ent* e = calloc(n, sizeof(*e));
    for (int i = 0; i < n; i++) {
        char* b;
        if (use_region) b = (char*)shared_region + (size_t)i * SLOT;
        else b = mmap(NULL, SLOT, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(b, 0, SLOT);
        e[i].hdr = (void*)b;
        e[i].payload = b + HDRSZ;
        e[i].iov[0].iov_base = e[i].hdr;
        e[i].iov[0].iov_len = sizeof(struct x_req_header);
        e[i].iov[1].iov_base = e[i].payload;
        e[i].iov[1].iov_len = PAYLOAD;
        e[i].qid = i % nq;
        prep_cmd(&ring, X_CMD_REGISTER, e[i].qid, 0, e[i].iov, i);
    }
    ret = io_uring_submit(&ring);
    if (ret != n) { sh->reg_err[id] = ret; }
    /* a REGISTER that fails completes at once with res < 0 */
    struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 100 * 1000000 };
    struct io_uring_cqe* c;
    if (io_uring_wait_cqe_timeout(&ring, &c, &ts) == 0) {
        sh->reg_err[id] = c->res;
        io_uring_cqe_seen(&ring, c);
    }
    if (watch) {
        int w = xfork();
        if (w == 0) watcher(&ring);
        sh->watch_pid = w;
    }
    sh->ready[id] = 1;
    int held_done = 0;
    for (;;) {
        ts.tv_nsec = 20 * 1000000;
        ret = io_uring_wait_cqe_timeout(&ring, &c, &ts);
        if (sh->ctl[id] == 1) {
            sh->unreaped_at_exit[id] = io_uring_cq_ready(&ring);
            _exit(0);
        }
        unsigned head, cnt = 0;
        io_uring_for_each_cqe(&ring, head, c) {
            cnt++;
            int i = (int)c->user_data;
            if (i < 0 || i >= n) continue;
            if (c->res != 0) {
                if (c->res == -ENOTCONN) sh->cqe_enotconn[id]++;
                else if (c->res == -ECANCELED) sh->cqe_ecanceled[id]++;
                else { sh->cqe_other[id]++; sh->cqe_other_res[id] = c->res; }
                e[i].dead = 1;
                continue;
            }
            struct fuse_in_header* ih = (void*)e[i].hdr->in_out;
            if (sh->ctl[id] == 2 && !held_done && ih->opcode == FUSE_READ) {
                const struct fuse_read_in* r = (const void*)e[i].hdr->op_in;
                held_done = 1;
                sh->held_commit_id = e[i].hdr->ent.commit_id;
                sh->held_unique = ih->unique;
                sh->held_qid = e[i].qid;
                sh->held_hdr = (uintptr_t)e[i].hdr;
                sh->held_payload = (uintptr_t)e[i].payload;
                sh->held_size = r->size;
                sh->held_off = r->offset;
                sh->held = 1;
                continue;   /* never committed by A */
            }
            answer_in(e[i].hdr, e[i].payload, -1);
            prep_cmd(&ring, X_CMD_COMMIT_AND_FETCH, e[i].qid, e[i].hdr->ent.commit_id, NULL, i);
            sh->served[id]++;
            sh->served_q[id][e[i].qid]++;
        }
        io_uring_cq_advance(&ring, cnt);
        if (cnt) io_uring_submit(&ring);
        if (held_done == 1 && sh->b_go == 3) {     /* E4 c: the taker is a fork of A */
            held_done = 2;
            int b = xfork();
            if (b == 0) e4_taker('c');
            sh->b_pid = b;
        }
    }
}

/* ---- the classic /dev/fuse reader (FORGET, INTERRUPT, any fallback) ---- */
static void devreader(void) {
    alarm(50);
    size_t bs = MAX_WRITE + 8192;
    char* buf = malloc(bs);
    char* out = malloc(bs);
    for (;;) {
        ssize_t n = read(devfd, buf, bs);
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN) continue;
            _exit(0);
        }
        struct fuse_in_header* ih = (void*)buf;
        if (ih->opcode == FUSE_FORGET || ih->opcode == FUSE_BATCH_FORGET) { sh->classic_forget++; continue; }
        if (ih->opcode == FUSE_INTERRUPT) {
            /* answer the interrupted request here with EINTR: a ring request cannot be found */
            struct fuse_interrupt_in* ii = (void*)(buf + sizeof(*ih));
            struct fuse_out_header oh = { sizeof(oh), -EINTR, ii->unique };
            int r = write(devfd, &oh, sizeof(oh));
            int k = sh->intr_n;
            if (k < 16) { sh->intr_reply_errno[k] = r < 0 ? errno : 0; sh->intr_n = k + 1; }
            sh->classic_interrupt++;
            continue;
        }
        const char* arg = buf + sizeof(*ih);
        uint32_t outlen;
        int err = handle(ih->opcode, ih->nodeid, arg, arg, out + sizeof(struct fuse_out_header), &outlen, -1);
        struct fuse_out_header* oh = (void*)out;
        oh->len = sizeof(*oh) + (err ? 0 : outlen);
        oh->error = err;
        oh->unique = ih->unique;
        if (write(devfd, out, oh->len) < 0) {}
        sh->classic_served++;
    }
}

/* ---- a reader: pread loop on one CPU ---- */
static void reader(int k, int cpu) {
    alarm(50);
    pin(cpu);
    int fd = open(fpath, O_RDONLY);
    if (fd < 0) { sh->rerr[k] = errno; _exit(1); }
    char b[4096];
    uint64_t off = (uint64_t)k * 4096 * 7;
    while (!sh->rstop) {
        off = (off + 4096 * 13) % FSIZE;
        ssize_t r = pread(fd, b, sizeof(b), off);
        if (r != (ssize_t)sizeof(b)) { sh->rerr[k] = r < 0 ? errno : 10000 + (int)r; _exit(1); }
        for (int i = 0; i < 4096; i += 512) if ((unsigned char)b[i] != pat(off + i)) { sh->rbad[k]++; break; }
        sh->rops[k]++;
    }
    _exit(0);
}
static int nreaders;
static void start_reader(int cpu) {
    int k = nreaders++;
    sh->rcpu[k] = cpu;
    int p = xfork();
    if (p == 0) reader(k, cpu);
    sh->rpid[k] = p;
    track(p);
}

/* one request on a CPU: stat of the file (LOOKUP, entry_valid 0). Returns the child's pid. */
static int one_stat(int cpu) {
    int p = xfork();
    if (p == 0) {
        alarm(30);
        pin(cpu);
        struct stat st;
        if (stat(fpath, &st) < 0) _exit(errno & 0x7f);
        _exit(st.st_size == FSIZE ? 0 : 126);
    }
    track(p);
    return p;
}
/* wait for a pid up to ms; returns exit status, -1 still running */
static int wait_for(int pid, int tmo) {
    long until = ms() + tmo;
    int st;
    do {
        int r = waitpid(pid, &st, WNOHANG);
        if (r == pid) reaped(pid);
        if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(5000);
    } while (ms() < until);
    return -1;
}

/* ---- set-up: fusectl, mount, INIT ---- */
static void setup(void) {
    FILE* f = fopen("/sys/devices/system/cpu/possible", "r");
    int a = 0, b = 0;
    if (f) { if (fscanf(f, "%d-%d", &a, &b) < 2) b = a; fclose(f); }
    nq = b + 1;
    if (nq > MAXQ) { say("too many CPUs"); exit(2); }
    /* fusectl for waiting/abort; mounted here only if it is not */
    struct stat s1, s2;
    stat("/sys/fs/fuse/connections", &s1);
    stat("/sys/fs/fuse", &s2);
    if (s1.st_dev == s2.st_dev) {
        if (mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL) == 0) fusectl_mounted = 1;
        else say("fusectl mount: %s", strerror(errno));
    }
    strcpy(mnt, "/tmp/uexp.XXXXXX");
    if (!mkdtemp(mnt)) { perror("mkdtemp"); exit(2); }
    snprintf(fpath, sizeof(fpath), "%s/f", mnt);
    devfd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (devfd < 0) { perror("/dev/fuse"); cleanup(); exit(2); }
    char opts[128];
    snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", devfd);
    if (mount("uexp", mnt, "fuse", MS_NOSUID | MS_NODEV, opts) < 0) { perror("mount"); cleanup(); exit(2); }
    mounted = 1;
    /* connection number = minor of the new mount's st_dev, from mountinfo (a stat would block) */
    FILE* mi = fopen("/proc/self/mountinfo", "r");
    char line[1024];
    while (mi && fgets(line, sizeof(line), mi)) {
        unsigned ma, mn;
        char mp[512];
        if (sscanf(line, "%*d %*d %u:%u %*s %511s", &ma, &mn, mp) == 3 && strcmp(mp, mnt) == 0)
            snprintf(conndir, sizeof(conndir), "/sys/fs/fuse/connections/%u", mn);
    }
    if (mi) fclose(mi);
    char buf[8192];
    ssize_t n = read(devfd, buf, sizeof(buf));
    struct fuse_in_header* ih = (void*)buf;
    struct fuse_init_in* ii = (void*)(buf + sizeof(*ih));
    if (n < (ssize_t)sizeof(*ih) || ih->opcode != FUSE_INIT) { say("no INIT"); cleanup(); exit(2); }
    say("mounted %s conn %s possible CPUs %d; INIT 7.%u flags=%#x flags2=%#x (OVER_IO_URING offered: %s)",
        mnt, conndir, nq, ii->minor, ii->flags, ii->flags2,
        (ii->flags2 & X_OVER_IO_URING_FLAGS2) ? "yes" : "NO");
    struct { struct fuse_out_header h; struct fuse_init_out o; } rep;
    memset(&rep, 0, sizeof(rep));
    rep.h.len = sizeof(rep);
    rep.h.unique = ih->unique;
    rep.o.major = 7;
    rep.o.minor = ii->minor;
    rep.o.max_readahead = ii->max_readahead;
    rep.o.flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_INIT_EXT;
    rep.o.flags2 = X_OVER_IO_URING_FLAGS2;
    rep.o.max_background = 16;
    rep.o.congestion_threshold = 12;
    rep.o.max_write = MAX_WRITE;
    rep.o.time_gran = 1;
    rep.o.max_pages = MAX_PAGES;
    if (write(devfd, &rep, sizeof(rep)) != sizeof(rep)) { say("INIT reply: %s", strerror(errno)); cleanup(); exit(2); }
    int p = xfork();
    if (p == 0) devreader();
    track(p);
}

static int start_server(int id, int depth, int use_region, int watch) {
    int p = xfork();
    if (p == 0) server(id, depth, use_region, watch);
    track(p);
    sh->pid[id] = p;
    long until = ms() + 3000;
    while (!sh->ready[id] && ms() < until) usleep(2000);
    say("server %c pid %d: %d entries per queue registered on %d queues, REGISTER error %d",
        'A' + id, p, depth, nq, sh->reg_err[id]);
    return p;
}

static void show_counts(const char* tag) {
    char b[512];
    int o = 0;
    for (int s = 0; s < MAXS; s++) {
        if (!sh->pid[s]) continue;
        o += snprintf(b + o, sizeof(b) - o, " %c=%ld(", 'A' + s, sh->served[s]);
        for (int q = 0; q < nq; q++) o += snprintf(b + o, sizeof(b) - o, "%sq%d:%ld", q ? "," : "", q, sh->served_q[s][q]);
        o += snprintf(b + o, sizeof(b) - o, ")");
    }
    say("%s: served%s classic=%ld forget=%ld interrupt=%ld waiting=%ld", tag, b, sh->classic_served,
        sh->classic_forget, sh->classic_interrupt, read_waiting());
}
static void show_cqe_errs(int id) {
    say("server %c CQE errors seen: -ENOTCONN %ld, -ECANCELED %ld, other %ld (last %d)", 'A' + id,
        sh->cqe_enotconn[id], sh->cqe_ecanceled[id], sh->cqe_other[id], sh->cqe_other_res[id]);
}
static long total_rops(void) { long t = 0; for (int k = 0; k < nreaders; k++) t += sh->rops[k]; return t; }

/* readers that made no progress for `quiet` ms */
static int stuck_readers(int quiet, int* list, int verbose) {
    long before[MAXR];
    for (int k = 0; k < nreaders; k++) before[k] = sh->rops[k];
    usleep(quiet * 1000);
    int n = 0;
    for (int k = 0; k < nreaders; k++) {
        if (sh->rops[k] != before[k] || !alive(sh->rpid[k])) continue;
        list[n++] = k;
        if (verbose) {
            char st, w[64], stk[256];
            proc_state(sh->rpid[k], &st, w, sizeof(w), stk, sizeof(stk));
            say("  reader %d (pid %d, cpu %d, ops %ld) stuck: state %c wchan %s stack %s", k, sh->rpid[k],
                sh->rcpu[k], sh->rops[k], st, w, stk);
        }
    }
    return n;
}

static void reader_summary(void) {
    for (int k = 0; k < nreaders; k++) {
        char st, w[64], stk[256];
        proc_state(sh->rpid[k], &st, w, sizeof(w), stk, sizeof(stk));
        say("  reader %d cpu %d: ops %ld bad %ld err %d (%s) state %c", k, sh->rcpu[k], sh->rops[k], sh->rbad[k],
            sh->rerr[k], sh->rerr[k] && sh->rerr[k] < 10000 ? strerror(sh->rerr[k]) : "-", st);
    }
}

/* SIGKILL the given readers, then see which die */
static void kill_test(int* list, int n) {
    for (int i = 0; i < n; i++) kill(sh->rpid[list[i]], SIGKILL);
    usleep(1000000);
    reap();
    int left = 0;
    for (int i = 0; i < n; i++) {
        int k = list[i];
        char st, w[64], stk[256];
        proc_state(sh->rpid[k], &st, w, sizeof(w), stk, sizeof(stk));
        int dead = (st == '?' || st == 'Z');
        if (!dead) left++;
        say("  SIGKILLed reader %d (cpu %d): %s%s%c %s", k, sh->rcpu[k], dead ? "died" : "STILL ALIVE, state ",
            "", dead ? ' ' : st, dead ? "" : stk);
    }
    say("after SIGKILL: %d of %d stuck readers survive (unkillable), waiting=%ld", left, n, read_waiting());
}

static void final_abort(void) {
    long w = read_waiting();
    abort_conn();
    usleep(300000);
    reap();
    int left = 0;
    for (int k = 0; k < nreaders; k++) if (alive(sh->rpid[k])) left++;
    say("abort: waiting before %ld, after %ld; readers still alive after abort: %d", w, read_waiting(), left);
}

/* ======================= E1 ======================= */
static void e1(int watch, int bfirst) {
    setup();
    if (bfirst) start_server(1, 2, 0, 0);
    start_server(0, 2, 0, watch);
    if (watch) track(sh->watch_pid);
    if (!bfirst) start_server(1, 2, 0, 0);
    int bad = 0;
    for (int i = 0; i < 20; i++) if (wait_for(one_stat(i % nq), 3000) != 0) bad++;
    show_counts("phase 1, A and B registered, 20 stats (10 per CPU)");
    say("phase 1 failed stats: %d", bad);
    long a0 = sh->served[0], b0 = sh->served[1];
    sh->ctl[0] = 1;
    int st = wait_for(sh->pid[0], 3000);
    say("A told to exit: exit status %d, CQEs ready and unreaped at exit %d", st, sh->unreaped_at_exit[0]);
    if (watch) {
        sh->watch_go = 1;
        while (!sh->watch_done) usleep(10000);
        char b[512] = ""; int o = 0;
        for (int i = 0; i < sh->watch_n; i++) o += snprintf(b + o, sizeof(b) - o, " %d", sh->watch_res[i]);
        say("watcher (holds A's ring fd): %d CQEs on A's ring after A's exit, res:%s", sh->watch_n, b);
    }
    usleep(200000);
    bad = 0;
    int stuck = 0;
    for (int i = 0; i < 20; i++) {
        int r = wait_for(one_stat(i % nq), 3000);
        if (r == -1) stuck++; else if (r) { bad++; say("  stat %d on cpu %d failed: exit %d (%s)", i, i % nq, r, strerror(r)); }
    }
    show_counts("phase 2, after A exited, 20 stats (10 per CPU)");
    say("phase 2: A answered %ld, B answered %ld, failed %d, stuck %d", sh->served[0] - a0, sh->served[1] - b0, bad, stuck);
    if (watch) {
        char b[512] = ""; int o = 0;
        for (int i = 0; i < sh->watch_n; i++) o += snprintf(b + o, sizeof(b) - o, " %d", sh->watch_res[i]);
        say("watcher total CQEs on A's ring: %d, res:%s", sh->watch_n, b);
    }
    final_abort();
    usleep(200000);
    show_cqe_errs(1);
}

/* ======================= E2 ======================= */
static void e2(int per_cpu) {
    setup();
    start_server(0, 2, 0, 0);
    start_server(1, 2, 0, 0);
    for (int q = 0; q < nq; q++) for (int i = 0; i < per_cpu; i++) start_reader(q);
    usleep(1000000);
    show_counts("after 1 s of load, A and B serving");
    say("reader ops so far %ld", total_rops());
    long b0 = sh->served[1];
    sh->ctl[0] = 1;
    int st = wait_for(sh->pid[0], 3000);
    say("A exited under load: status %d, CQEs ready and unreaped at A's exit: %d", st, sh->unreaped_at_exit[0]);
    for (int i = 0; i < 4; i++) {
        long r0 = total_rops();
        usleep(500000);
        say("  +%d ms: reader ops +%ld, B served total %ld (+%ld since A exit), waiting=%ld", (i + 1) * 500,
            total_rops() - r0, sh->served[1], sh->served[1] - b0, read_waiting());
    }
    int list[MAXR];
    int n = stuck_readers(1000, list, 1);
    say("stuck readers while B serves: %d of %d; waiting=%ld", n, nreaders, read_waiting());
    show_counts("counts");
    sh->rstop = 1;
    usleep(500000);
    reap();
    int rem = 0;
    for (int k = 0; k < nreaders; k++) if (alive(sh->rpid[k])) rem++;
    say("readers told to stop: %d still alive after 0.5 s; waiting=%ld", rem, read_waiting());
    kill_test(list, n);
    show_counts("before abort");
    say("INTERRUPTs answered on /dev/fuse: %d, write() errnos:", sh->intr_n);
    for (int i = 0; i < sh->intr_n; i++) say("   interrupt reply %d: %s", i, sh->intr_reply_errno[i] ? strerror(sh->intr_reply_errno[i]) : "ok");
    final_abort();
    reader_summary();
}

/* ======================= E3 ======================= */
static void e3(int per_cpu) {
    setup();
    start_server(0, 2, 0, 0);
    for (int q = 0; q < nq; q++) for (int i = 0; i < per_cpu; i++) start_reader(q);
    usleep(1000000);
    show_counts("after 1 s of load, A serving");
    kill(sh->pid[0], SIGKILL);
    int st = wait_for(sh->pid[0], 3000);
    say("A SIGKILLed: status %d; supervisor still holds the /dev/fuse fd", st);
    usleep(500000);
    int list[MAXR];
    int n = stuck_readers(1000, list, 1);
    say("after the kill: %d of %d readers stuck, waiting=%ld, conn dir %s", n, nreaders, read_waiting(),
        access(conndir, F_OK) == 0 ? "present (not aborted)" : "gone");
    /* is a new request queued, and killable? */
    int probe = one_stat(0);
    usleep(500000);
    char pst, w[64], stk[256];
    proc_state(probe, &pst, w, sizeof(w), stk, sizeof(stk));
    say("probe stat on cpu 0 (new request after the kill): %s, state %c wchan %s stack %s; waiting=%ld",
        wait_for(probe, 1) == -1 ? "blocked" : "returned", pst, w, stk, read_waiting());
    kill(probe, SIGKILL);
    int pr = wait_for(probe, 1000);
    say("probe SIGKILLed: %s (status %d); waiting=%ld", pr == -1 ? "STILL ALIVE" : "died", pr, read_waiting());
    /* a new server registers */
    start_server(2, 2, 0, 0);
    for (int i = 0; i < 4; i++) {
        usleep(500000);
        say("  +%d ms after C registered: C served %ld, reader ops %ld, waiting=%ld", (i + 1) * 500, sh->served[2],
            total_rops(), read_waiting());
    }
    n = stuck_readers(500, list, 0);
    say("without a kick: %d of %d readers stuck, C served %ld", n, nreaders, sh->served[2]);
    for (int q = 0; q < nq; q++) {
        long c0 = sh->served[2], r0 = total_rops();
        int p = one_stat(q);
        int r = wait_for(p, 2000);
        usleep(700000);
        say("kick: one stat pinned to cpu %d -> %s; C served +%ld (q%d now %ld), reader ops +%ld, waiting=%ld", q,
            r == 0 ? "ok" : "fail/stuck", sh->served[2] - c0, q, sh->served_q[2][q], total_rops() - r0, read_waiting());
        /* which readers move now */
        int l2[MAXR];
        int m = stuck_readers(500, l2, 0);
        char b[256] = ""; int o = 0;
        for (int i = 0; i < m; i++) o += snprintf(b + o, sizeof(b) - o, " r%d(cpu%d)", l2[i], sh->rcpu[l2[i]]);
        say("  still stuck after kick on cpu %d: %d:%s", q, m, b);
    }
    n = stuck_readers(1000, list, 1);
    say("after kicks on every CPU: %d readers stuck; waiting=%ld; C served %ld", n, read_waiting(), sh->served[2]);
    show_counts("counts");
    {   /* FUSE_NOTIFY_RESEND on /dev/fuse: does it bring back the requests the dead server held? */
        long cl0 = sh->classic_served, c0 = sh->served[2];
        struct fuse_out_header nh = { sizeof(nh), 7 /* FUSE_NOTIFY_RESEND */, 0 };
        int w = write(devfd, &nh, sizeof(nh));
        int we = w < 0 ? errno : 0;
        n = stuck_readers(1000, list, 0);
        say("NOTIFY_RESEND written to /dev/fuse: write() = %d (%s); 1 s later: %d readers stuck, classic served +%ld, "
            "C served +%ld, waiting=%ld", w, we ? strerror(we) : "ok", n, sh->classic_served - cl0, sh->served[2] - c0,
            read_waiting());
    }
    sh->rstop = 1;
    usleep(500000);
    reap();
    kill_test(list, n);
    final_abort();
    reader_summary();
    usleep(200000);
    show_cqe_errs(2);
}

/* ======================= E4 ======================= */
static void probe_read(int slot, int cpu, int64_t off) {
    int p = xfork();
    if (p == 0) {
        alarm(30);
        pin(cpu);
        int fd = open(fpath, O_RDONLY);
        if (fd < 0) { sh->probe_open_errno[slot] = errno; sh->probe_done[slot] = 1; _exit(1); }
        unsigned char b[4096];
        memset(b, 0xEE, sizeof(b));
        ssize_t r = pread(fd, b, sizeof(b), off);
        sh->probe_ret[slot] = (int)r;
        sh->probe_errno[slot] = r < 0 ? errno : 0;
        sh->probe_first[slot] = b[0];
        sh->probe_done[slot] = 1;
        close(fd);
        _exit(0);
    }
    sh->probe_pid[slot] = p;
    track(p);
}
static void probe_report(int slot, int64_t off) {
    long until = ms() + 2000;
    while (!sh->probe_done[slot] && ms() < until) usleep(5000);
    if (!sh->probe_done[slot]) {
        char st, w[64], stk[256];
        proc_state(sh->probe_pid[slot], &st, w, sizeof(w), stk, sizeof(stk));
        say("probe %d: NOT finished after 2 s, state %c stack %s", slot, st, stk);
        return;
    }
    unsigned char f = sh->probe_first[slot];
    say("probe %d: open errno %d (%s), pread ret %d errno %d (%s), first byte %#x = %s", slot,
        sh->probe_open_errno[slot], strerror(sh->probe_open_errno[slot]), sh->probe_ret[slot], sh->probe_errno[slot],
        strerror(sh->probe_errno[slot]), f,
        f == 0x42 ? "B's reply (0x42)" : f == 0x43 ? "B's 2nd-phase reply (0x43)" : f == pat(off) ? "file pattern (A's data)" :
        f == 0xEE ? "buffer untouched" : "other");
}

static void e4_taker(int variant) {
    alarm(40);
    struct io_uring r;
    while (!sh->held) usleep(2000);
    struct x_req_header* h;
    char* p;
    if (variant == 'a') {
        /* own buffers elsewhere; A's buffers are not mapped in B */
        munmap((void*)(uintptr_t)sh->held_hdr, SLOT);
        char* mine = mmap((void*)0x7e0000000000ULL, SLOT, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        h = (void*)mine;
        p = mine + HDRSZ;
        unsigned char v;
        int mapped = mincore((void*)(uintptr_t)sh->held_hdr, 4096, &v) == 0;
        printf("[taker a] own header %p payload %p; A's header %#llx payload %#llx; A's range mapped in B: %s\n",
               (void*)h, (void*)p, (unsigned long long)sh->held_hdr, (unsigned long long)sh->held_payload,
               mapped ? "yes" : "no (mincore ENOMEM)");
        fflush(stdout);
    } else {
        h = (void*)(uintptr_t)sh->held_hdr;
        p = (void*)(uintptr_t)sh->held_payload;
    }
    ring_init(&r);
    sh->b_hdr = (uintptr_t)h;
    sh->b_payload = (uintptr_t)p;
    while (!sh->b_commit) usleep(2000);
    /* the reply: 0x42 bytes */
    memset(p, 0x42, sh->held_size);
    struct fuse_out_header oh = { sizeof(oh) + sh->held_size, 0, sh->held_unique };
    memcpy(h->in_out, &oh, sizeof(oh));
    h->ent.payload_sz = sh->held_size;
    h->ent.commit_id = sh->held_commit_id;
    prep_cmd(&r, X_CMD_COMMIT_AND_FETCH, sh->held_qid, sh->held_commit_id, NULL, 1000);
    sh->b_submit_ret = io_uring_submit(&r);
    sh->b_commit_ms = ms();
    /* serve whatever the taken-over entry gets (READ data 0x43), until told to stop */
    struct __kernel_timespec ts;
    struct io_uring_cqe* c;
    while (!sh->b_stop) {
        ts.tv_sec = 0; ts.tv_nsec = 50 * 1000000;
        if (io_uring_wait_cqe_timeout(&r, &c, &ts) != 0) continue;
        int res = c->res;
        io_uring_cqe_seen(&r, c);
        int k = sh->b_n2;
        struct fuse_in_header* ih = (void*)h->in_out;
        if (k < 16) {
            sh->b_res2[k] = res; sh->b_op2[k] = res == 0 ? (int)ih->opcode : -1;
            sh->b_ms2[k] = (int)(ms() - sh->b_commit_ms);
            sh->b_n2 = k + 1;
        }
        if (res != 0) break;
        answer_in(h, p, 0x43);
        prep_cmd(&r, X_CMD_COMMIT_AND_FETCH, sh->held_qid, h->ent.commit_id, NULL, 1001);
        io_uring_submit(&r);
    }
    /* after the abort: the final CQE of B's command */
    long until = ms() + 3000;
    while (ms() < until) {
        ts.tv_sec = 0; ts.tv_nsec = 50 * 1000000;
        if (io_uring_wait_cqe_timeout(&r, &c, &ts) != 0) continue;
        int k = sh->b_final_n;
        if (k < 8) { sh->b_final_res[k] = c->res; sh->b_final_n = k + 1; }
        io_uring_cqe_seen(&r, c);
    }
    _exit(0);
}

static void b_cqes(const char* tag) {
    char b[1024] = ""; int o = 0;
    for (int i = 0; i < sh->b_n2; i++)
        o += snprintf(b + o, sizeof(b) - o, " (res %d, opcode %d, +%d ms)", sh->b_res2[i], sh->b_op2[i], sh->b_ms2[i]);
    say("%s: B's CQEs since its commit: %d%s", tag, sh->b_n2, b);
}

static void e4(int variant) {
    if (variant == 'b') {
        int mfd = memfd_create("uexp-ring", MFD_CLOEXEC);
        size_t sz = (size_t)SLOT * MAXQ * 2;
        if (ftruncate(mfd, sz) < 0) { perror("ftruncate"); exit(2); }
        shared_region = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        say("memfd region mapped at %p in the supervisor; A and B inherit it at the same VA", shared_region);
    }
    setup();
    if (variant == 'a' || variant == 'b') {
        int b = xfork();
        if (b == 0) e4_taker(variant);
        sh->b_pid = b;
        track(b);
    }
    start_server(0, 1, variant == 'b', 0);
    sh->ctl[0] = 2;            /* hold the next READ */
    if (variant == 'c') sh->b_go = 3;
    int64_t off = 8192;
    probe_read(0, 0, off);
    long until = ms() + 3000;
    while (!sh->held && ms() < until) usleep(2000);
    say("A holds READ unique %llu (commit_id %llu) qid %d size %d off %lld; A's header %#llx payload %#llx",
        (unsigned long long)sh->held_unique, (unsigned long long)sh->held_commit_id, sh->held_qid, sh->held_size,
        (long long)sh->held_off, (unsigned long long)sh->held_hdr, (unsigned long long)sh->held_payload);
    usleep(500000);
    if (variant == 'c') track(sh->b_pid);
    say("before B's commit: probe 0 done=%d; waiting=%ld; B pid %d ready, will write its reply at header %#llx payload %#llx",
        sh->probe_done[0], read_waiting(), sh->b_pid, (unsigned long long)sh->b_hdr, (unsigned long long)sh->b_payload);
    sh->b_commit = 1;
    until = ms() + 2000;
    while (!sh->b_commit_ms && ms() < until) usleep(2000);
    usleep(1000000);
    say("B (variant %c) submitted COMMIT_AND_FETCH(commit_id %llu, qid %d): io_uring_submit() = %d",
        variant, (unsigned long long)sh->held_commit_id, sh->held_qid, sh->b_submit_ret);
    probe_report(0, off);
    b_cqes("1 s after B's commit");
    show_counts("after B's commit");
    /* more reads on the same CPU: the entry B committed is first on queue 0's list */
    probe_read(1, 0, off);
    probe_report(1, off);
    probe_read(2, 0, off + 4096);
    probe_report(2, off + 4096);
    usleep(300000);
    b_cqes("after probes 1 and 2");
    show_counts("before abort");
    sh->b_stop = 1;
    final_abort();
    usleep(2000000);
    {
        char b[256] = ""; int o = 0;
        for (int i = 0; i < sh->b_final_n; i++) o += snprintf(b + o, sizeof(b) - o, " %d", sh->b_final_res[i]);
        say("B's CQEs after the abort: %d:%s", sh->b_final_n, b);
    }
    b_cqes("final");
    for (int i = 0; i < 3; i++) if (!sh->probe_done[i]) say("probe %d never finished (ended by the abort)", i);
    show_cqe_errs(0);
}

int main(int argc, char** argv) {
    clock_gettime(CLOCK_MONOTONIC, &t0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) { fprintf(stderr, "usage: uexp e1 [watch] | e2 [n] | e3 [n] | e4 a|b|c\n"); return 2; }
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    memset((void*)sh, 0, sizeof(*sh));
    signal(SIGALRM, on_alarm);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    alarm(45);
    if (!strcmp(argv[1], "e1")) {
        int watch = 0, bfirst = 0;
        for (int i = 2; i < argc; i++) { if (!strcmp(argv[i], "watch")) watch = 1; if (!strcmp(argv[i], "bfirst")) bfirst = 1; }
        e1(watch, bfirst);
    }
    else if (!strcmp(argv[1], "e2")) e2(argc > 2 ? atoi(argv[2]) : 4);
    else if (!strcmp(argv[1], "e3")) e3(argc > 2 ? atoi(argv[2]) : 3);
    else if (!strcmp(argv[1], "e4") && argc > 2) e4(argv[2][0]);
    else { fprintf(stderr, "bad args\n"); return 2; }
    alarm(0);
    cleanup();
    say("cleaned up: %s unmounted and removed", mnt);
    return 0;
}
