/*
 * counters.c - deterministic self-checking workload for prerestore tests
 * (in the spirit of CRIU's zdtm tests).
 *
 * Usage: counters sleep|busy
 * Env:   MB     buffer size in MiB (default 64)
 *        ITERS  exit 0 after that many iterations (default: run forever)
 *        UPDATES  random buffer writes per iteration, i.e. the dirty rate (default 2000)
 *
 * Every 100 iterations it prints one line
 *   it=<N> sum=<hex16> rng=<hex16> win=<idx> acc=<%.17g> tls=<u> str=<s> brk=ok|FAIL ro=ok|BAD vdso=ok|BAD OK|MISMATCH
 * whose content depends only on N (and MB), so a migrated run can be compared
 * line by line with an unmigrated reference run.  Lines that are NOT compared:
 *   start pid=<pid>
 *   SIGUSR1 count=<n>
 *
 * Build: cc -O2 -mavx2 -mfma -g -o counters counters.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <immintrin.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define REPORT_EVERY 100
#define WINDOW_MOVE_EVERY 500
#define UPDATES_PER_ITER 2000
#define HOT_WINDOW_BYTES (4UL << 20)
#define RO_SIZE (64UL << 10)
#define BRK_STEP (64L << 10)

/* TLS counter (non-static so it lives in the static TLS block, accessed via %fs). */
__thread uint64_t tls_counter;

static volatile sig_atomic_t usr1_count;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

static inline uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

static uint64_t ro_checksum(const uint8_t *p, size_t n)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 1099511628211ULL;
	}
	return h;
}

static int64_t ts_ns(const struct timespec *t)
{
	return (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec;
}

static int vdso_ok(void)
{
	struct timespec a, b, c;
	if (clock_gettime(CLOCK_MONOTONIC, &a)) /* vdso */
		return 0;
	if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &b)) /* real syscall */
		return 0;
	if (clock_gettime(CLOCK_MONOTONIC, &c))
		return 0;
	int64_t d1 = ts_ns(&b) - ts_ns(&a), d2 = ts_ns(&c) - ts_ns(&b);
	if (d1 < 0)
		d1 = -d1;
	if (d2 < 0)
		d2 = -d2;
	return d1 < 50000000LL && d2 < 50000000LL;
}

/* returns 1 when brk grows/shrinks correctly and is back at 'base' */
static int brk_ok(void *base)
{
	void *cur = sbrk(0);
	if (cur == (void *)-1 || cur != base)
		return 0;
	void *p = sbrk(BRK_STEP);
	if (p == (void *)-1 || p != cur)
		return 0;
	memset(p, 0xa5, BRK_STEP);
	if (((volatile uint8_t *)p)[BRK_STEP - 1] != 0xa5)
		return 0;
	if (sbrk(-BRK_STEP) == (void *)-1)
		return 0;
	return sbrk(0) == base;
}

int main(int argc, char **argv)
{
	if (argc != 2 || (strcmp(argv[1], "sleep") && strcmp(argv[1], "busy"))) {
		fprintf(stderr, "usage: %s sleep|busy  (env MB, ITERS, UPDATES)\n", argv[0]);
		return 2;
	}
	int do_sleep = !strcmp(argv[1], "sleep");
	const char *s;
	unsigned long mb = 64;
	if ((s = getenv("MB")) && *s)
		mb = strtoul(s, NULL, 10);
	if (mb == 0)
		mb = 1;
	unsigned long updates = UPDATES_PER_ITER; /* UPDATES: buffer writes per iteration (dirty rate) */
	if ((s = getenv("UPDATES")) && *s)
		updates = strtoul(s, NULL, 10);
	uint64_t iters = 0; /* 0 = forever */
	if ((s = getenv("ITERS")) && *s)
		iters = strtoull(s, NULL, 10);

	setvbuf(stdout, NULL, _IOLBF, 0);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL)) {
		perror("sigaction");
		return 1;
	}

	/* the big buffer, fully populated */
	size_t n = (size_t)mb << 17; /* mb MiB / 8 bytes */
	uint64_t *buf = malloc(n * sizeof(uint64_t));
	if (!buf) {
		perror("malloc");
		return 1;
	}
	uint64_t sum = 0;
	for (size_t i = 0; i < n; i++) {
		buf[i] = (uint64_t)i * 0x9E3779B97F4A7C15ULL;
		sum += buf[i];
	}
	size_t wlen = HOT_WINDOW_BYTES / sizeof(uint64_t);
	if (wlen > n)
		wlen = n;
	size_t nwin = n / wlen;

	/* heap string */
	char *str = malloc(64);
	if (!str) {
		perror("malloc");
		return 1;
	}
	strcpy(str, "prerestore-heap-string");

	/* read-only mapping with a deterministic pattern */
	uint8_t *ro = mmap(NULL, RO_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ro == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	{
		uint64_t st = 0xC0FFEE1234567ULL;
		for (size_t i = 0; i < RO_SIZE; i++)
			ro[i] = (uint8_t)(xorshift64(&st) >> 56);
	}
	const uint64_t ro_expected = ro_checksum(ro, RO_SIZE);
	if (mprotect(ro, RO_SIZE, PROT_READ)) {
		perror("mprotect");
		return 1;
	}

	/* first output allocates the stdio buffer: do it before recording brk */
	printf("start pid=%d\n", (int)getpid());
	void *brk_base = sbrk(0);

	uint64_t rng = 0x243F6A8885A308D3ULL;
	const __m256d decay = _mm256_set_pd(0.9990, 0.9995, 0.9999, 0.9980);
	const __m256d scale = _mm256_set_pd(1.0 / 3.0, 1.0 / 7.0, 1.0 / 11.0, 1.0 / 13.0);
	__m256d acc = _mm256_set_pd(1.0, 2.0, 3.0, 4.0);
	int last_usr1 = 0;

	for (uint64_t it = 1; iters == 0 || it <= iters; it++) {
		size_t wstart = ((it - 1) / WINDOW_MOVE_EVERY % nwin) * wlen;
		uint64_t *win = buf + wstart;
		/* hot loop: integer PRNG updates + AVX accumulator live in ymm regs */
		for (unsigned long k = 0; k < updates; k++) {
			uint64_t r = xorshift64(&rng);
			uint64_t delta = r >> 40;
			win[r % wlen] += delta;
			sum += delta;
			__m256d v = _mm256_set1_pd((double)(delta & 1023));
			acc = _mm256_fmadd_pd(v, scale, _mm256_mul_pd(acc, decay));
		}
		tls_counter++;

		if (do_sleep) {
			struct timespec req = {0, 1000000}, rem;
			while (nanosleep(&req, &rem) == -1 && errno == EINTR)
				req = rem;
		}

		int c = usr1_count;
		if (c != last_usr1) {
			last_usr1 = c;
			printf("SIGUSR1 count=%d\n", c);
		}

		if (it % REPORT_EVERY == 0) {
			int b = brk_ok(brk_base);
			uint64_t rs = ro_checksum(ro, RO_SIZE);
			int v = vdso_ok();
			uint64_t full = 0;
			for (size_t i = 0; i < n; i++)
				full += buf[i];
			double lanes[4];
			_mm256_storeu_pd(lanes, acc);
			double accsum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
			printf("it=%llu sum=%016llx rng=%016llx win=%zu acc=%.17g tls=%llu str=%s "
			       "brk=%s ro=%s vdso=%s %s\n",
			       (unsigned long long)it, (unsigned long long)sum,
			       (unsigned long long)rng, wstart / wlen, accsum,
			       (unsigned long long)tls_counter, str, b ? "ok" : "FAIL",
			       rs == ro_expected ? "ok" : "BAD", v ? "ok" : "BAD",
			       full == sum ? "OK" : "MISMATCH");
		}
	}
	return 0;
}
