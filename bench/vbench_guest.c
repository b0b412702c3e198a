/* vbench: the guest side of bench/virtio.py.
 *
 * Built on the host as a static binary (gcc -static -O2) and added to a copy
 * of the guest kit's initramfs as /bin/vbench, so vireo and QEMU run the very
 * same program in the very same guest. One process does all the I/O of a
 * test: a busybox `dd` per 4 KiB request would measure fork+exec in the
 * guest, not the disk.
 *
 * Every test prints one line:
 *   bench-result NAME bytes=B ops=N ns=T [flush_ns=F] busy_ticks=U idle_ticks=I
 * timed with CLOCK_MONOTONIC in the guest; U and I are the guest's CPU ticks
 * (/proc/stat, USER_HZ) spent busy and idle (idle + iowait) during the test:
 * a guest that is mostly idle while its I/O is slow is waiting on the device
 * or on the interrupt, not on its own instructions. All disk I/O is O_DIRECT (no guest
 * page cache), one request at a time (queue depth 1).
 *
 *   vbench seqwrite DEV MIB            1 MiB pwrites from offset 0, then fsync
 *   vbench seqread  DEV MIB            1 MiB preads from offset 0
 *   vbench randread  DEV SPAN_MIB OPS SEED   4 KiB preads at random 4 KiB-aligned offsets < SPAN
 *   vbench randwrite DEV SPAN_MIB OPS SEED   the same with pwrite, then fsync
 *   vbench tcpsend IP PORT MIB         connect, send MIB MiB in 64 KiB writes, close
 *   vbench tcprecv PORT                listen, accept one connection, count bytes to EOF
 *   vbench spin N                      N xorshift rounds in user space (CPU calibration)
 *   vbench syscalls N                  N getppid() system calls (CPU calibration)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024ULL * 1024ULL)
#define BLK 4096ULL

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Guest CPU ticks (all CPUs) from /proc/stat: busy and idle (idle+iowait). */
static void cpu_ticks(unsigned long long *busy, unsigned long long *idle) {
    unsigned long long v[10] = {0};
    *busy = *idle = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return;
    if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
               &v[5], &v[6], &v[7]) >= 5) {
        *idle = v[3] + v[4];
        *busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    }
    fclose(f);
}

static unsigned long long busy0, idle0;
static void cpu_start(void) { cpu_ticks(&busy0, &idle0); }
/* Appended to a result line: guest CPU busy/idle ticks during the test. */
static void cpu_end(void) {
    unsigned long long b, i;
    cpu_ticks(&b, &i);
    printf(" busy_ticks=%llu idle_ticks=%llu\n", b - busy0, i - idle0);
}

static void die(const char *what) {
    printf("bench-error %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* xorshift64*: the same offsets for every VMM (and for the host baseline,
 * which bench/virtio.py computes with the same generator). */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static void *aligned_buf(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 4096, n) != 0) die("posix_memalign");
    for (size_t i = 0; i < n; i++) ((unsigned char *)p)[i] = (unsigned char)(i * 7 + 1);
    return p;
}

static int open_dev(const char *dev, int wr) {
    int fd = open(dev, (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) die(dev);
    return fd;
}

static void full_pwrite(int fd, const void *buf, size_t n, off_t off) {
    ssize_t r = pwrite(fd, buf, n, off);
    if (r != (ssize_t)n) {
        if (r >= 0) errno = EIO;
        die("pwrite");
    }
}

static void full_pread(int fd, void *buf, size_t n, off_t off) {
    ssize_t r = pread(fd, buf, n, off);
    if (r != (ssize_t)n) {
        if (r >= 0) errno = EIO;
        die("pread");
    }
}

static int seq(const char *name, const char *dev, uint64_t mib, int wr) {
    int fd = open_dev(dev, wr);
    void *buf = aligned_buf(MIB);
    cpu_start();
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < mib; i++) {
        if (wr) full_pwrite(fd, buf, MIB, (off_t)(i * MIB));
        else full_pread(fd, buf, MIB, (off_t)(i * MIB));
    }
    uint64_t t1 = now_ns(), t2 = t1;
    if (wr) {
        if (fsync(fd) != 0) die("fsync");
        t2 = now_ns();
    }
    printf("bench-result %s bytes=%llu ops=%llu ns=%llu flush_ns=%llu", name,
           (unsigned long long)(mib * MIB), (unsigned long long)mib,
           (unsigned long long)(t2 - t0), (unsigned long long)(t2 - t1));
    cpu_end();
    close(fd);
    return 0;
}

static int rnd(const char *name, const char *dev, uint64_t span_mib, uint64_t ops,
               uint64_t seed, int wr) {
    int fd = open_dev(dev, wr);
    void *buf = aligned_buf(BLK);
    uint64_t blocks = span_mib * MIB / BLK;
    rng_state = seed ? seed : 1;
    cpu_start();
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < ops; i++) {
        off_t off = (off_t)((rng_next() % blocks) * BLK);
        if (wr) full_pwrite(fd, buf, BLK, off);
        else full_pread(fd, buf, BLK, off);
    }
    uint64_t t1 = now_ns(), t2 = t1;
    if (wr) {
        if (fsync(fd) != 0) die("fsync");
        t2 = now_ns();
    }
    /* ns excludes the final flush for random I/O: IOPS of the requests. */
    printf("bench-result %s bytes=%llu ops=%llu ns=%llu flush_ns=%llu", name,
           (unsigned long long)(ops * BLK), (unsigned long long)ops,
           (unsigned long long)(t1 - t0), (unsigned long long)(t2 - t1));
    cpu_end();
    close(fd);
    return 0;
}

static int tcpsend(const char *ip, int port, uint64_t mib) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) die("inet_pton");
    int tries = 0;
    while (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        if (++tries > 50) die("connect");
        close(s);
        s = socket(AF_INET, SOCK_STREAM, 0);
        usleep(200000);
    }
    size_t chunk = 64 * 1024;
    char *buf = aligned_buf(chunk);
    uint64_t total = mib * MIB, sent = 0;
    cpu_start();
    uint64_t t0 = now_ns();
    while (sent < total) {
        size_t n = total - sent < chunk ? (size_t)(total - sent) : chunk;
        ssize_t r = write(s, buf, n);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        sent += (uint64_t)r;
    }
    shutdown(s, SHUT_WR);
    /* Wait for the peer's close so the time covers delivery, not buffering. */
    char c;
    while (read(s, &c, 1) > 0) {}
    uint64_t t1 = now_ns();
    printf("bench-result tcp_tx bytes=%llu ops=0 ns=%llu", (unsigned long long)sent,
           (unsigned long long)(t1 - t0));
    cpu_end();
    close(s);
    return 0;
}

static int tcprecv(int port) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0) die("socket");
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0) die("bind");
    if (listen(l, 1) != 0) die("listen");
    printf("bench-listening %d\n", port);
    fflush(stdout);
    int s = accept(l, NULL, NULL);
    if (s < 0) die("accept");
    size_t chunk = 256 * 1024;
    char *buf = malloc(chunk);
    uint64_t got = 0, t0 = 0;
    for (;;) {
        ssize_t r = read(s, buf, chunk);
        if (r < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (r == 0) break;
        if (got == 0) {
            cpu_start();
            t0 = now_ns();
        }
        got += (uint64_t)r;
    }
    uint64_t t1 = now_ns();
    printf("bench-result tcp_rx bytes=%llu ops=0 ns=%llu", (unsigned long long)got,
           (unsigned long long)(t1 - t0));
    cpu_end();
    close(s);
    close(l);
    return 0;
}

/* CPU calibration, no device involved: how fast the VMM runs the guest's own
 * code. cpu_user: N rounds of xorshift in user space; cpu_syscall: N getppid()
 * system calls (kernel entry and exit with this kernel's mitigations). */
static int spin(uint64_t n) {
    cpu_start();
    rng_state = 99;
    volatile uint64_t sink = 0;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) sink += rng_next();
    uint64_t t1 = now_ns();
    printf("bench-result cpu_user bytes=0 ops=%llu ns=%llu", (unsigned long long)n,
           (unsigned long long)(t1 - t0));
    cpu_end();
    return 0;
}

static int syscalls(uint64_t n) {
    cpu_start();
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) getppid();
    uint64_t t1 = now_ns();
    printf("bench-result cpu_syscall bytes=0 ops=%llu ns=%llu", (unsigned long long)n,
           (unsigned long long)(t1 - t0));
    cpu_end();
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && !strcmp(argv[1], "seqwrite")) return seq("seq_write", argv[2], strtoull(argv[3], 0, 0), 1);
    if (argc >= 4 && !strcmp(argv[1], "seqread")) return seq("seq_read", argv[2], strtoull(argv[3], 0, 0), 0);
    if (argc >= 6 && !strcmp(argv[1], "randread"))
        return rnd("rand_read", argv[2], strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0), strtoull(argv[5], 0, 0), 0);
    if (argc >= 6 && !strcmp(argv[1], "randwrite"))
        return rnd("rand_write", argv[2], strtoull(argv[3], 0, 0), strtoull(argv[4], 0, 0), strtoull(argv[5], 0, 0), 1);
    if (argc >= 5 && !strcmp(argv[1], "tcpsend")) return tcpsend(argv[2], atoi(argv[3]), strtoull(argv[4], 0, 0));
    if (argc >= 3 && !strcmp(argv[1], "tcprecv")) return tcprecv(atoi(argv[2]));
    if (argc >= 3 && !strcmp(argv[1], "spin")) return spin(strtoull(argv[2], 0, 0));
    if (argc >= 3 && !strcmp(argv[1], "syscalls")) return syscalls(strtoull(argv[2], 0, 0));
    fprintf(stderr, "usage: see bench/vbench_guest.c\n");
    return 2;
}
