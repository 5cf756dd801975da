/* streamchat's native CPU kernels for the decode step (and prefill, and batched decode): built by native.py.
 *
 * 1. sc_q4_matmul: y = x W^T over 4-bit weights in Q4_1 blocks (32 inputs: fp16 step d, fp16 minimum m, 16 bytes of
 *    nibbles; w = q * d + m, the GGUF's own format), with x quantized per 32-block to 8 bits (Q8_1: scale a and
 *    sum), so each block is one integer dot product: sum_j w_j x_j ~= d a sum_j q_j r_j + m (a sum_j r_j).
 *    llama.cpp's ggml_vec_dot_q4_1_q8_1 computes the same; unlike torch's weight-only int4 kernel it never widens
 *    the weights to floats, which AVX2 (no bf16 arithmetic) pays dearly for. Any number of rows M: decode (1),
 *    a batched step (B) or a prefill chunk; each weight tile is read once for all rows.
 * 2. sc_q8_matmul: the same over 8-bit weights with one fp32 scale per output row (the output projection), also
 *    8 rows interleaved per block.
 * 3. sc_attention / sc_attention_many: one query per sequence over a cache of keys and values (fp32 or fp16),
 *    grouped-query heads.
 * 4. sc_decode: a whole decode step (or prefill chunk) of a Llama-layout model for B rows, no Python between layers.
 * 5. sc_compact_layers: sink_window's eviction, the kept run moved down and its keys re-rotated (also up: the window
 *    making room for conversation memory's recalled region).
 * 6. sc_greedy / sc_sample: the next token from the logits, as transformers' logits processors choose it.
 *
 * Compiled twice: AVX2+FMA+F16C (vpmaddubsw) and AVX-512 VNNI (vpdpbusd; the matmuls take 16 output rows per
 * 512-bit vector, the rest stays on 256-bit vectors); native.py picks the one torch's own CPU capability names, so
 * ATEN_CPU_CAPABILITY=avx2 selects the AVX2 build here too.
 * Threads: a small pool of its own (below), as many as torch.get_num_threads() of the calling thread.
 */
#define _GNU_SOURCE /* clock_gettime under -std=c11 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32

/* ---------------------------------------------------------------------------------------------------------------
 * Threads: streamchat's own small pool, not OpenMP. libgomp throttles its waiting threads to a few hundred spins
 * when it manages more threads than there are CPUs, and it counts the process's initial thread and every other
 * thread's team: on a 2-core machine, a 2-thread team started from any thread but the main one (the server's
 * scheduler) sleeps and wakes through the kernel at each of a decode step's ~150 parallel loops (measured: 2.4-12 us a
 * loop instead of 0.5, a step 3x slower). Here, as in llama.cpp's own thread pool: workers spin on a ticket for a
 * while after each loop (so the next loop of the same step starts at once), then sleep on a condition variable until
 * the next step; the calling thread takes tasks too, and takes whatever tasks remain, so a worker the OS has
 * descheduled delays a loop by at most the task it holds. One caller at a time uses the pool; a concurrent caller
 * runs its tasks alone.
 */

#define MAX_THREADS 64
#define SPIN_NS 30000 /* how long an idle worker spins before it sleeps: a step's loops are a few us apart; longer means
                       * the step's caller is away (descheduled, or between steps) and the core serves others better */

typedef void (*task_fn)(void *context, int task);

static struct {
    pthread_mutex_t use;   /* held by the caller running a loop */
    pthread_mutex_t lock;  /* guards sleeping */
    pthread_cond_t wake;
    _Alignas(64) _Atomic uint64_t ticket; /* loop number (high 32 bits) | next task (low 32 bits) */
    _Alignas(64) _Atomic int done;         /* tasks finished (its own cache line: the ticket's is busy too) */
    _Alignas(64) _Atomic int tasks, grain, sleepers, started, helpers, parked; /* grain: tasks taken at once;
                                                   helpers: workers that take part; parked: sleep now (park_workers) */
    _Atomic(task_fn) fn;
    _Atomic(void *) context;
} pool = {.use = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static _Thread_local int thread_count = 1; /* threads this calling thread's loops use, itself included (sc_set_threads) */

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

#define CLOSED 0xFFFFFFFFu /* a loop's ticket while its caller sets it up */

/* Take tasks of loop `loop` until none is left (or another loop began: a late worker never runs a task twice). */
static void take_tasks(uint32_t loop) {
    for (;;) {
        uint64_t ticket = atomic_load(&pool.ticket);
        if ((uint32_t)(ticket >> 32) != loop) return;
        if ((uint32_t)ticket == CLOSED) {
            _mm_pause();
            continue;
        }
        const uint32_t first = (uint32_t)ticket, tasks = (uint32_t)atomic_load(&pool.tasks);
        if (first >= tasks) return;
        const uint32_t end = first + (uint32_t)atomic_load(&pool.grain) < tasks ? first + (uint32_t)atomic_load(&pool.grain) : tasks;
        if (!atomic_compare_exchange_weak(&pool.ticket, &ticket, ticket + (end - first))) continue;
        const task_fn fn = atomic_load(&pool.fn);
        void *context = atomic_load(&pool.context);
        for (uint32_t t = first; t < end; t++) fn(context, (int)t);
        atomic_fetch_add(&pool.done, (int)(end - first));
    }
}

static void *worker(void *argument) {
    const int index = (int)(intptr_t)argument;
    uint32_t seen = (uint32_t)(atomic_load(&pool.ticket) >> 32);
    for (;;) {
        const uint64_t spin_until = now_ns() + SPIN_NS;
        uint32_t loop;
        for (int i = 0;; i++) {
            loop = (uint32_t)(atomic_load(&pool.ticket) >> 32);
            if (loop != seen) break;
            _mm_pause();
            if ((i & 255) == 255 && (now_ns() > spin_until || atomic_load(&pool.parked))) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleepers, 1);
                while ((uint32_t)(atomic_load(&pool.ticket) >> 32) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleepers, 1);
                pthread_mutex_unlock(&pool.lock);
            }
        }
        seen = loop;
        if (index < atomic_load(&pool.helpers)) take_tasks(loop);
    }
    return NULL;
}

/* Threads the kernels called from this thread use from now on, itself included: like OpenMP's per-thread count
 * (native.py passes torch.get_num_threads() of the calling thread). */
void sc_set_threads(int threads) {
    thread_count = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* The workers sleep now rather than spin: the caller's next loop is far off (a decode step ended; between two steps
 * the other threads, its clients included, need the cores). */
static void park_workers(void) { atomic_store(&pool.parked, 1); }

/* fn(context, t) for t in 0..tasks-1, spread over the pool; returns when all are done. */
static void run_tasks(int tasks, task_fn fn, void *context) {
    if (tasks <= 0) return;
    if (thread_count <= 1 || tasks == 1 || pthread_mutex_trylock(&pool.use) != 0) {
        for (int t = 0; t < tasks; t++) fn(context, t);
        return;
    }
    while (atomic_load(&pool.started) < thread_count - 1) { /* workers start once, and stay */
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)atomic_load(&pool.started)) != 0) break;
        pthread_detach(thread);
        atomic_fetch_add(&pool.started, 1);
    }
    atomic_store(&pool.helpers, thread_count - 1);
    const uint32_t loop = (uint32_t)(atomic_load(&pool.ticket) >> 32) + 1;
    atomic_store(&pool.ticket, ((uint64_t)loop << 32) | CLOSED); /* a late worker of the last loop takes nothing */
    atomic_store(&pool.fn, fn);
    atomic_store(&pool.context, context);
    atomic_store(&pool.tasks, tasks);
    atomic_store(&pool.grain, tasks / (4 * thread_count) > 1 ? tasks / (4 * thread_count) : 1);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.parked, 0);
    atomic_store(&pool.ticket, (uint64_t)loop << 32); /* publishes the loop: workers take tasks from here */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    take_tasks(loop);
    while (atomic_load(&pool.done) < tasks) _mm_pause();
    pthread_mutex_unlock(&pool.use);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The machine's streaming read, as the decode step reads its weights: `bytes` (a multiple of 4096) of `buffer`
 * summed as 64-bit integers over the pool, each task a contiguous run read with the kernels' prefetch 4 KB ahead.
 * The sum goes to *sum (so that nothing is optimized away). Returns 0, or -1 for a size it does not take. */
typedef struct {
    const uint8_t *buffer;
    size_t per_task, bytes;
    uint64_t *sums;
} read_job;

static void read_task(void *context, int t) {
    const read_job *job = context;
    const size_t start = (size_t)t * job->per_task, end = start + job->per_task < job->bytes ? start + job->per_task : job->bytes;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t o = start; o < end; o += 128) {
        const uint8_t *p = job->buffer + o;
        _mm_prefetch((const char *)p + 4096, _MM_HINT_T0);
        _mm_prefetch((const char *)p + 4096 + 64, _MM_HINT_T0);
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256((const __m256i *)p));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256((const __m256i *)(p + 32)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256((const __m256i *)(p + 64)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256((const __m256i *)(p + 96)));
    }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
    job->sums[t] = lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

int sc_read_bandwidth(const void *buffer, long bytes, uint64_t *sum) {
    if (bytes <= 0 || bytes % 4096) return -1;
    const int tasks = 8 * thread_count;
    size_t per_task = ((size_t)bytes / (size_t)tasks + 4095) / 4096 * 4096;
    uint64_t *sums = calloc((size_t)tasks, sizeof(uint64_t));
    if (!sums) return -1;
    read_job job = {buffer, per_task, (size_t)bytes, sums};
    run_tasks((int)(((size_t)bytes + per_task - 1) / per_task), read_task, &job);
    *sum = 0;
    for (int t = 0; t < tasks; t++) *sum += sums[t];
    free(sums);
    return 0;
}


typedef struct {
    float d;            /* scale */
    float s;            /* d * sum(qs) */
    int8_t qs[QK];
} block_q8;             /* 40 bytes */

int sc_vnni(void) {
#ifdef SC_VNNI
    return 1;
#else
    return 0;
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* x [K] fp32 -> K/32 blocks of 8-bit values, per block scale max|x| / 127 (llama.cpp's quantize_row_q8_1). */
/* 32 int32 values (4 vectors, each within int8) as 32 int8 in the same order: the packs interleave 128-bit lanes,
 * the permute undoes it. */
static inline __m256i packs_in_order(const __m256i q[4]) {
    const __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static void quantize_q8(const float *x, block_q8 *y, int K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        const float d = hmax(amax) / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        y[b].d = d;
        y[b].s = d * (float)_mm_cvtsi128_si32(t);
        _mm256_storeu_si256((__m256i *)y[b].qs, packs_in_order(q));
    }
}

/* Activation rows quantized, over the pool from 8 rows on: row m of x [M, K] by `quantize` into the `row_bytes`
 * bytes at q + m * row_bytes. Returns q (NULL where the allocation that made it failed). */
typedef void (*quantize_fn)(const float *x, void *y, int K);

typedef struct {
    quantize_fn quantize;
    const float *x;
    uint8_t *q;
    size_t row_bytes;
    int K;
} quantize_job;

static void quantize_task(void *context, int m) {
    const quantize_job *job = context;
    job->quantize(job->x + (size_t)m * job->K, job->q + (size_t)m * job->row_bytes, job->K);
}

static void *quantize_into(quantize_fn quantize, const float *x, int M, int K, size_t row_bytes, void *q) {
    if (!q) return NULL;
    quantize_job job = {quantize, x, q, row_bytes, K};
    if (M >= 8)
        run_tasks(M, quantize_task, &job);
    else
        for (int m = 0; m < M; m++) quantize_task(&job, m);
    return q;
}

static void quantize_q8_row(const float *x, void *y, int K) { quantize_q8(x, y, K); }

/* x [M, K] fp32 -> M rows of K / 32 block_q8 (64-byte aligned; the caller frees it), or NULL. */
static block_q8 *quantize_rows(const float *x, int M, int K) {
    const size_t row_bytes = (size_t)(K / QK) * sizeof(block_q8);
    void *q = aligned_alloc(64, ((size_t)M * row_bytes + 63) / 64 * 64);
    return quantize_into(quantize_q8_row, x, M, K, row_bytes, q);
}

/* 4-bit weights, 8 output rows interleaved per 32-input block (llama.cpp's "repacked" x86 layouts do the same):
 * per row group and block, the 8 rows' fp16 steps, their fp16 minimums, then 4 chunks of 32 bytes; byte 4r+i of
 * chunk j holds, for row r, element 4j+i (low nibble) and element 4(j+4)+i (high nibble). One integer multiply-add
 * (vpdpbusd, or vpmaddubsw on AVX2) of a chunk's nibbles with 4 activation bytes broadcast then adds 4 products
 * into each row's own lane: no horizontal sums, and each block's scales apply to 8 rows in one vector. */
typedef struct {
    uint16_t d[8], m[8];
    uint8_t qs[4][32];
} block_q4x8; /* 160 bytes: 8 rows x 32 inputs */

int sc_block_q4x8_bytes(void) { return (int)sizeof(block_q4x8); }

/* The 8 rows' nibbles of one 32-input block in block_q4x8's order (4 chunks of 32 bytes) as 8 vectors of bytes:
 * chunk j's low nibbles (inputs 4j..4j+3 of each row) in wg[j], its high ones (inputs 16+4j..) in wg[j + 4], the
 * order group_dot takes them in. block_q4_Kx8's sub-blocks are laid out the same. */
static inline void q4x8_nibbles(const uint8_t qs[4][32], __m256i wg[8]) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)qs[j]);
        wg[j] = _mm256_and_si256(raw, low);
        wg[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    }
}

/* int32 per row lane: sum over the block of weight nibble x activation byte. */
static inline __m256i group_dot(const __m256i wg[8], const int8_t *aq) {
#ifdef SC_VNNI
    __m256i acc = _mm256_setzero_si256();
    _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++)
        acc = _mm256_dpbusd_epi32(acc, wg[g], _mm256_set1_epi32(*(const int32_t *)(aq + 4 * g)));
    return acc;
#else
    /* products of a nibble (<= 15) and a byte (|a| <= 127): 8 pair sums stay within int16 (8 * 3810) */
    __m256i pairs = _mm256_setzero_si256();
    _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++)
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(wg[g], _mm256_set1_epi32(*(const int32_t *)(aq + 4 * g))));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
#endif
}

#define Q4X8_TILE(C)                                                                                              \
    static inline void q4x8_tile_##C(const block_q4x8 *w, int nb, const float *bias, const block_q8 *a,         \
                                     float *out, size_t ostride) {                                               \
        __m256 acc[C];                                                                                           \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();                        \
        for (int b = 0; b < nb; b++) {                                                                           \
            const block_q4x8 *block = w + b;                                                                     \
            __m256i wg[8];                                                                                       \
            q4x8_nibbles(block->qs, wg);                                                                         \
            const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->d));                      \
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->m));                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                                                \
                const block_q8 *ab = a + (size_t)c * nb + b;                                                     \
                const __m256 products = _mm256_cvtepi32_ps(group_dot(wg, ab->qs));                               \
                acc[c] = _mm256_fmadd_ps(products, _mm256_mul_ps(dw, _mm256_set1_ps(ab->d)), acc[c]);            \
                acc[c] = _mm256_fmadd_ps(mw, _mm256_set1_ps(ab->s), acc[c]);                                     \
            }                                                                                                    \
        }                                                                                                        \
        const __m256 add = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();                                   \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)                                                      \
            _mm256_storeu_ps(out + (size_t)c * ostride, _mm256_add_ps(acc[c], add));                             \
    }
Q4X8_TILE(1)
Q4X8_TILE(2)
Q4X8_TILE(4)

#ifdef SC_VNNI
/* int32 per lane of 16 rows: the block's 8 weight chunks (two row groups side by side) times the activation bytes,
 * 4 at a time broadcast (vpdpbusd), as group_dot and q8x8_dot do for 8 rows. */
static inline __m512i dot16(const __m512i wg[8], const int8_t *aq) {
    __m512i dot = _mm512_setzero_si512();
    _Pragma("GCC unroll 8") for (int g = 0; g < 8; g++)
        dot = _mm512_dpbusd_epi32(dot, wg[g], _mm512_set1_epi32(*(const int32_t *)(aq + 4 * g)));
    return dot;
}

/* Two row groups (16 rows: w0's 8, then w1's) in 512-bit vectors: the same per-lane arithmetic as q4x8_tile (so
 * the same bits), half the instructions per activation row, which counts where a batched step or a prefill chunk
 * is bound by arithmetic rather than by reading the weights (on the Intel Xeon measured, docs/speed-cpu.md: a
 * step's matmuls 10% faster for one row, 16% for four). Zen 4 splits 512-bit operations in two. */
#define Q4X16_TILE(C)                                                                                             \
    static inline void q4x16_tile_##C(const block_q4x8 *w0, const block_q4x8 *w1, int nb, const float *bias,     \
                                      const block_q8 *a, float *out, size_t ostride) {                           \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                              \
        __m512 acc[C];                                                                                           \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();                        \
        for (int b = 0; b < nb; b++) {                                                                           \
            const block_q4x8 *b0 = w0 + b, *b1 = w1 + b;                                                         \
            __m512i wg[8];                                                                                       \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) {                                                \
                const __m512i raw = _mm512_inserti64x4(                                                          \
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)b0->qs[j])),                      \
                    _mm256_loadu_si256((const __m256i *)b1->qs[j]), 1);                                          \
                wg[j] = _mm512_and_si512(raw, low);                                                              \
                wg[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);                                    \
            }                                                                                                    \
            const __m512 dw = _mm512_cvtph_ps(_mm256_inserti128_si256(                                           \
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0->d)), _mm_loadu_si128((const __m128i *)b1->d), 1)); \
            const __m512 mw = _mm512_cvtph_ps(_mm256_inserti128_si256(                                           \
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0->m)), _mm_loadu_si128((const __m128i *)b1->m), 1)); \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                                                \
                const block_q8 *ab = a + (size_t)c * nb + b;                                                     \
                const __m512 products = _mm512_cvtepi32_ps(dot16(wg, ab->qs));                                   \
                acc[c] = _mm512_fmadd_ps(products, _mm512_mul_ps(dw, _mm512_set1_ps(ab->d)), acc[c]);            \
                acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(ab->s), acc[c]);                                     \
            }                                                                                                    \
        }                                                                                                        \
        const __m512 add = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();                                   \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)                                                      \
            _mm512_storeu_ps(out + (size_t)c * ostride, _mm512_add_ps(acc[c], add));                             \
    }
Q4X16_TILE(1)
Q4X16_TILE(2)
Q4X16_TILE(4)
#endif

/* 8-bit weights, 8 output rows interleaved per 32-input block (the output projection, and int8 linears): per row
 * group and block, 8 chunks of 32 bytes; byte 4r+i of chunk j holds row r's element 4j+i (signed, one fp32 scale
 * per row kept apart). As with block_q4x8, one integer multiply-add of a chunk with 4 activation bytes broadcast
 * adds 4 products into each of the 8 rows' own lanes: no horizontal sums, and a loaded group serves C activation
 * rows. A row r of the matrix is gathered back as group r / 8, lane r % 8 of every chunk (the tied embedding reads
 * its rows so: streamchat/native.py, q8_rows). Rows past N in the last group are zero. */
typedef struct {
    int8_t qs[8][32];
} block_q8x8; /* 256 bytes: 8 rows x 32 inputs */

int sc_block_q8x8_bytes(void) { return (int)sizeof(block_q8x8); }

/* The weight chunks of one block as the dot product wants them: VNNI's vpdpbusd multiplies unsigned by signed
 * bytes, so the weights become w + 128 (w ^ 0x80: 1..255, as |w| <= 127), corrected by 128 x the activations'
 * sum after; AVX2 keeps them signed (see q8x8_dot). */
static inline void q8x8_load(const block_q8x8 *block, __m256i wg[8]) {
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
        wg[j] = _mm256_loadu_si256((const __m256i *)block->qs[j]);
#ifdef SC_VNNI
        wg[j] = _mm256_xor_si256(wg[j], _mm256_set1_epi8((char)0x80));
#endif
    }
}

/* int32 per row lane: sum over the block of weight byte x activation byte (VNNI: with the +128 offset). */
static inline __m256i q8x8_dot(const __m256i wg[8], const int8_t *aq) {
    __m256i acc = _mm256_setzero_si256();
#ifdef SC_VNNI
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++)
        acc = _mm256_dpbusd_epi32(acc, wg[j], _mm256_set1_epi32(*(const int32_t *)(aq + 4 * j)));
#else
    /* signed x signed as |a| x (w sign(a)): vpmaddubsw's pair sums stay within int16 (2 x 127 x 127), where an
     * offset byte (up to 255) would saturate them */
    _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t *)(aq + 4 * j));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(wg[j], a));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    }
#endif
    return acc;
}

/* One row group (8 rows, scales [8]) against C activation rows: out[c * ostride + r] for r < 8. */
#define Q8X8_TILE(C)                                                                                              \
    static inline void q8x8_tile_##C(const block_q8x8 *w, int nb, const float *scale, const block_q8 *a,        \
                                     float *out, size_t ostride) {                                               \
        __m256 acc[C];                                                                                           \
        float sums[C]; /* activation sums (the d-scaled block sums), for the VNNI offset */                      \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps(), sums[c] = 0.0f;        \
        for (int b = 0; b < nb; b++) {                                                                           \
            __m256i wg[8];                                                                                       \
            q8x8_load(w + b, wg);                                                                                \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                                                \
                const block_q8 *ab = a + (size_t)c * nb + b;                                                     \
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8x8_dot(wg, ab->qs)), _mm256_set1_ps(ab->d), acc[c]); \
                sums[c] += ab->s;                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        const __m256 scales = _mm256_loadu_ps(scale);                                                            \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                                                    \
            const __m256 offset = VNNI_OFFSET ? _mm256_set1_ps(128.0f * sums[c]) : _mm256_setzero_ps();          \
            _mm256_storeu_ps(out + (size_t)c * ostride, _mm256_mul_ps(_mm256_sub_ps(acc[c], offset), scales));  \
        }                                                                                                        \
    }
#ifdef SC_VNNI
#define VNNI_OFFSET 1
#else
#define VNNI_OFFSET 0
#endif
Q8X8_TILE(1)
Q8X8_TILE(2)
Q8X8_TILE(4)

#ifdef SC_VNNI
/* Two row groups (16 rows) in 512-bit vectors, as q4x16_tile: the same per-lane arithmetic as q8x8_tile. */
#define Q8X16_TILE(C)                                                                                             \
    static inline void q8x16_tile_##C(const block_q8x8 *w0, const block_q8x8 *w1, int nb, const float *scale,    \
                                      const block_q8 *a, float *out, size_t ostride) {                           \
        const __m512i offset_bytes = _mm512_set1_epi8((char)0x80);                                               \
        __m512 acc[C];                                                                                           \
        float sums[C];                                                                                           \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps(), sums[c] = 0.0f;        \
        for (int b = 0; b < nb; b++) {                                                                           \
            __m512i wg[8];                                                                                       \
            _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++)                                                  \
                wg[j] = _mm512_xor_si512(_mm512_inserti64x4(                                                     \
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w0[b].qs[j])),                    \
                    _mm256_loadu_si256((const __m256i *)w1[b].qs[j]), 1), offset_bytes);                         \
            _Pragma("GCC unroll 8") for (int c = 0; c < C; c++) {                                                \
                const block_q8 *ab = a + (size_t)c * nb + b;                                                     \
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot16(wg, ab->qs)), _mm512_set1_ps(ab->d), acc[c]);  \
                sums[c] += ab->s;                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        const __m512 scales = _mm512_loadu_ps(scale);                                                            \
        _Pragma("GCC unroll 8") for (int c = 0; c < C; c++)                                                      \
            _mm512_storeu_ps(out + (size_t)c * ostride,                                                          \
                             _mm512_mul_ps(_mm512_sub_ps(acc[c], _mm512_set1_ps(128.0f * sums[c])), scales));   \
    }
Q8X16_TILE(1)
Q8X16_TILE(2)
Q8X16_TILE(4)
#endif

#define ROW_TILE 16 /* output rows per parallel task */
#define M_TILE 32   /* activation rows swept per weight tile (kept in L1/L2) */

/* One task's share: output units u0..u1 (row groups or rows) against all M activation rows, C rows at a time. */
#define SWEEP(TILE, W_AT, EXTRA_AT, OUT_AT)                                                                       \
    for (int m0 = 0; m0 < M; m0 += M_TILE) {                                                                     \
        const int m1 = m0 + M_TILE < M ? m0 + M_TILE : M;                                                        \
        for (int u = u0; u < u1; u++) {                                                                          \
            int m = m0;                                                                                          \
            for (; m + 4 <= m1; m += 4) TILE##_4(W_AT(u), nb, EXTRA_AT(u), a + (size_t)m * nb, OUT_AT(m, u), N); \
            for (; m + 2 <= m1; m += 2) TILE##_2(W_AT(u), nb, EXTRA_AT(u), a + (size_t)m * nb, OUT_AT(m, u), N); \
            for (; m < m1; m++) TILE##_1(W_AT(u), nb, EXTRA_AT(u), a + (size_t)m * nb, OUT_AT(m, u), N);         \
        }                                                                                                        \
    }

/* A matmul's operands, shared by its tasks: task t computes output units (row groups) t*per_task.. against all M
 * activation rows (quantized: `a`). */
typedef struct {
    const void *w;
    const float *extra; /* bias (Q4) or scales (Q8) */
    const block_q8 *a;
    float *out;
    int M, N, nb, units, per_task;
} matmul_job;

#define JOB_UNITS(job, t)                                                                                        \
    const int M = job->M, N = job->N, nb = job->nb;                                                              \
    const block_q8 *a = job->a;                                                                                  \
    const int u0 = t * job->per_task, u1 = u0 + job->per_task < job->units ? u0 + job->per_task : job->units;

#define Q4_W(u) ((const block_q4x8 *)job->w + (size_t)(u) * nb)
#define Q4_BIAS(u) (job->extra ? job->extra + 8 * (u) : NULL)
#define Q4_OUT(m, u) (job->out + (size_t)(m) * N + 8 * (u))
#define Q8_W(u) ((const block_q8x8 *)job->w + (size_t)(u) * nb)
#define Q8_SCALE(u) (job->extra + 8 * (u))
#define Q8_OUT(m, u) (job->out + (size_t)(m) * N + 8 * (u))

#ifdef SC_VNNI
/* As SWEEP, for a task of exactly two units: one 16-row tile in 512-bit vectors. */
#define SWEEP_PAIR(TILE, W_AT, EXTRA_AT, OUT_AT)                                                                  \
    for (int m0 = 0; m0 < M; m0 += M_TILE) {                                                                     \
        const int m1 = m0 + M_TILE < M ? m0 + M_TILE : M;                                                        \
        int m = m0;                                                                                              \
        for (; m + 4 <= m1; m += 4) TILE##_4(W_AT(u0), W_AT(u0 + 1), nb, EXTRA_AT(u0), a + (size_t)m * nb, OUT_AT(m, u0), N); \
        for (; m + 2 <= m1; m += 2) TILE##_2(W_AT(u0), W_AT(u0 + 1), nb, EXTRA_AT(u0), a + (size_t)m * nb, OUT_AT(m, u0), N); \
        for (; m < m1; m++) TILE##_1(W_AT(u0), W_AT(u0 + 1), nb, EXTRA_AT(u0), a + (size_t)m * nb, OUT_AT(m, u0), N); \
    }
#define WIDE(u0, u1) ((u1) - (u0) == 2)
#else
#define WIDE(u0, u1) 0
#define SWEEP_PAIR(TILE, W_AT, EXTRA_AT, OUT_AT)
#endif

static void q4_task(void *context, int t) {
    const matmul_job *job = context;
    JOB_UNITS(job, t)
    if (WIDE(u0, u1)) {
        SWEEP_PAIR(q4x16_tile, Q4_W, Q4_BIAS, Q4_OUT)
    } else {
        SWEEP(q4x8_tile, Q4_W, Q4_BIAS, Q4_OUT)
    }
}

static void q8_task(void *context, int t) {
    const matmul_job *job = context;
    JOB_UNITS(job, t)
    if (WIDE(u0, u1)) {
        SWEEP_PAIR(q8x16_tile, Q8_W, Q8_SCALE, Q8_OUT)
    } else {
        SWEEP(q8x8_tile, Q8_W, Q8_SCALE, Q8_OUT)
    }
}

/* x [M, K] fp32, w: N/8 row groups of K/32 `block_q4x8`, out [M, N] fp32 (+ bias [N] when not NULL).
 * Returns 0, or -1 when K is not a multiple of 32, N not of 8, or memory ran out. */
int sc_q4_matmul(const float *x, int M, int K, const void *weights, int N, const float *bias, float *out) {
    if (K % QK || N % 8 || M <= 0) return -1;
    const int nb = K / QK, units = N / 8, per_task = ROW_TILE / 8;
    block_q8 *a = quantize_rows(x, M, K);
    if (!a) return -1;
    const matmul_job job = {weights, bias, a, out, M, N, nb, units, per_task};
    run_tasks((units + per_task - 1) / per_task, q4_task, (void *)&job);
    free(a);
    return 0;
}

/* x [M, K] fp32, w: ceil(N / 8) row groups of K/32 `block_q8x8`, scales [ceil(N / 8) * 8] fp32 (zero past N),
 * out [M, N] fp32. Returns 0, or -1 when K is not a multiple of 32 or memory ran out. */
int sc_q8_matmul(const float *x, int M, int K, const void *weights, const float *scales, int N, float *out) {
    if (K % QK || M <= 0 || N <= 0) return -1;
    const int nb = K / QK, units = N / 8, per_task = ROW_TILE / 8;
    block_q8 *a = quantize_rows(x, M, K);
    if (!a) return -1;
    const matmul_job job_ = {weights, scales, a, out, M, N, nb, units, per_task}, *job = &job_;
    run_tasks((units + per_task - 1) / per_task, q8_task, (void *)job);
    if (N % 8) { /* the last, partial group: through a row of 8, of which N % 8 are kept */
        float last[8];
        for (int m = 0; m < M; m++) {
            q8x8_tile_1(Q8_W(units), nb, Q8_SCALE(units), a + (size_t)m * nb, last, 8);
            memcpy(Q8_OUT(m, units), last, sizeof(float) * (N % 8));
        }
    }
    free(a);
    return 0;
}

#include "kernels_ggml.c" /* ggml's block types as a GGUF file stores them */

static inline __m256 load8(const void *base, size_t index, int half) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + index)));
    return _mm256_loadu_ps((const float *)base + index);
}

/* exp(x), 8 lanes: Cephes' expf polynomial; x clamped to [-87, 88] (0 and 1.6e38 at the ends: what softmax and
 * SiLU need). */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#define CHUNK 128     /* most cached places per attention task */
#define MIN_CHUNK 32  /* fewest places per task when sequences are split further to give every thread work */
#define MAX_GROUP 16  /* query heads per kv head */
#define MAX_DIM 256
/* Query heads of a group handled together: each key and value row is read (and converted from fp16) once per slice
 * of this many heads. Bounded by the registers: 4 keys x SLICE heads score accumulators, SLICE heads x PV_VECTORS
 * output accumulators (AVX2 has 16 ymm registers, AVX-512 32). */
#ifdef SC_VNNI
#define SLICE 4
#define PV_VECTORS 4
#else
#define SLICE 3
#define PV_VECTORS 2
#endif
#define PREFETCH_ROWS 8 /* cached keys read ahead */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* The sums of 4 vectors' lanes, as one vector (lane k: the sum of a[k]). */
static inline __m128 hsum4(const __m256 a[4]) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* scores[g][k] = scale * (q_g . key k) for `hs` query heads (q: [hs, D]) and keys at base + k * D, k < n.
 * 4 keys at a time, each key vector converted once for all hs heads; a last partial step re-reads key n - 1 and
 * writes up to 3 scores past n (the rows have CHUNK + 8 places). */
ALWAYS_INLINE void qk_slice(const float *q, int hs, const void *keys, const void *values, int half, size_t base, int n, int D,
                            float scale, float (*scores)[CHUNK + 8]) {
    const size_t bytes = (size_t)D * (half ? 2 : 4), element = half ? 2 : 4; /* per row */
    for (int k0 = 0; k0 < n; k0 += 4) {
        /* the cache rows come from memory (a step's weights evict them): prefetch keys a few rows ahead, and the
         * same rows' values, which the weighted sum reads next */
        const char *ahead = (const char *)keys + (base + (size_t)(k0 + PREFETCH_ROWS) * D) * element;
        const char *value = (const char *)values + (base + (size_t)k0 * D) * element;
        for (size_t b = 0; b < 4 * bytes; b += 64) {
            if (k0 + PREFETCH_ROWS < n) _mm_prefetch(ahead + b, _MM_HINT_T0);
            _mm_prefetch(value + b, _MM_HINT_T0);
        }
        size_t row[4];
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) row[k] = base + (size_t)(k0 + k < n ? k0 + k : n - 1) * D;
        __m256 acc[SLICE][4];
        _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++)
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) acc[g][k] = _mm256_setzero_ps();
        for (int i = 0; i < D; i += 8) {
            _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {
                const __m256 key = load8(keys, row[k] + i, half);
                _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++)
                    acc[g][k] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)g * D + i), key, acc[g][k]);
            }
        }
        _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++)
            _mm_storeu_ps(scores[g] + k0, _mm_mul_ps(hsum4(acc[g]), _mm_set1_ps(scale)));
    }
}

/* In place, scores [n] -> exp(score - max); returns the max and sets *total to the sum of the exponentials. */
static float softmax_parts(float *scores, int n, float *total) {
    for (int j = n; j < (n + 7) / 8 * 8; j++) scores[j] = -INFINITY;
    __m256 tops = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 8) tops = _mm256_max_ps(tops, _mm256_loadu_ps(scores + j));
    const float top = hmax(tops);
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) {
        const __m256 p = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + j, p);
        sum = _mm256_add_ps(sum, p);
    }
    *total = hsum(sum);
    return top;
}

/* out[g][i0 .. i0 + 8 ds) = factor[g] * sum_k p[g][k] value_k[i0 ..] for hs heads: each value vector converted once
 * for all hs heads, ds vectors of the row per pass over the keys. */
ALWAYS_INLINE void pv_slice(const float (*p)[CHUNK + 8], int hs, const void *values, int half, size_t base, int n,
                            int D, int i0, int ds, const float *factor, float *const *out) {
    __m256 acc[SLICE][PV_VECTORS];
    _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++)
        _Pragma("GCC unroll 4") for (int v = 0; v < ds; v++) acc[g][v] = _mm256_setzero_ps();
    for (int k = 0; k < n; k++) {
        const size_t row = base + (size_t)k * D + i0;
        __m256 weight[SLICE];
        _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++) weight[g] = _mm256_broadcast_ss(p[g] + k);
        _Pragma("GCC unroll 4") for (int v = 0; v < ds; v++) {
            const __m256 value = load8(values, row + 8 * v, half);
            _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++) acc[g][v] = _mm256_fmadd_ps(weight[g], value, acc[g][v]);
        }
    }
    _Pragma("GCC unroll 4") for (int g = 0; g < hs; g++)
        _Pragma("GCC unroll 4") for (int v = 0; v < ds; v++)
            _mm256_storeu_ps(out[g] + i0 + 8 * v, _mm256_mul_ps(acc[g][v], _mm256_set1_ps(factor[g])));
}

/* One slice of hs query heads (q [hs, D]) over places base + k * D, k < n: scores, softmax parts, weighted values.
 * Per head g: out[g] [D] = factor * unnormalized output, where factor = 1 / sum of exponentials when `direct`
 * (the final output), else 1 with tops[g] and totals[g] set (a partial result, merged later). */
ALWAYS_INLINE void attend_slice(const float *q, int hs, const void *keys, const void *values, int half, size_t base,
                                int n, int D, float scale, int direct, float *const *out, float *tops, float *totals) {
    float scores[SLICE][CHUNK + 8] __attribute__((aligned(32)));
    float factor[SLICE];
    qk_slice(q, hs, keys, values, half, base, n, D, scale, scores);
    for (int g = 0; g < hs; g++) {
        tops[g] = softmax_parts(scores[g], n, totals + g);
        factor[g] = direct ? 1.0f / totals[g] : 1.0f;
    }
    int i0 = 0;
    for (; i0 + 8 * PV_VECTORS <= D; i0 += 8 * PV_VECTORS)
        pv_slice((const float(*)[CHUNK + 8])scores, hs, values, half, base, n, D, i0, PV_VECTORS, factor, out);
    for (; i0 < D; i0 += 8)
        pv_slice((const float(*)[CHUNK + 8])scores, hs, values, half, base, n, D, i0, 1, factor, out);
}

/* One attention task: the `group` query heads of kv head `kv` (q: the sequence's [heads, D]) over places j0..j1 of
 * its cache (the kv head's rows start at element `base`), SLICE heads at a time. direct: the task covers all places,
 * so it writes the normalized output of each head at out + h * D (out: the sequence's [heads, D]); else per query
 * head a record of group x (D + 2) floats at `record`: partial maximum, sum of exponentials, unnormalized output. */
static void attention_task(const float *q, const void *keys, const void *values, int half, size_t base, int j0,
                           int j1, int kv, int group, int D, float scale, float *out, float *record) {
    base += (size_t)j0 * D;
    const int n = j1 - j0, direct = record == NULL;
    for (int g0 = 0; g0 < group; g0 += SLICE) {
        const int hs = group - g0 < SLICE ? group - g0 : SLICE, h0 = kv * group + g0;
        float *targets[SLICE], tops[SLICE], totals[SLICE];
        for (int g = 0; g < hs; g++)
            targets[g] = direct ? out + (size_t)(h0 + g) * D : record + (size_t)(g0 + g) * (D + 2) + 2;
        const float *qs = q + (size_t)h0 * D;
        switch (hs) { /* constant slice sizes: the accumulators stay in registers */
        case 1: attend_slice(qs, 1, keys, values, half, base, n, D, scale, direct, targets, tops, totals); break;
        case 2: attend_slice(qs, 2, keys, values, half, base, n, D, scale, direct, targets, tops, totals); break;
        case 3: attend_slice(qs, 3, keys, values, half, base, n, D, scale, direct, targets, tops, totals); break;
#if SLICE > 3
        default: attend_slice(qs, SLICE, keys, values, half, base, n, D, scale, direct, targets, tops, totals); break;
#endif
        }
        if (!direct)
            for (int g = 0; g < hs; g++) record[(size_t)(g0 + g) * (D + 2)] = tops[g], record[(size_t)(g0 + g) * (D + 2) + 1] = totals[g];
    }
}

/* How many chunks each sequence's places are split into (chunks[S]); returns the number of tasks (kv heads x
 * chunks). At most CHUNK places per chunk, and a sequence alone gives every thread two tasks where its length
 * allows (chunks of at least MIN_CHUNK places). Each sequence's split depends on its own length and the thread
 * count only, never on the other sequences of the batch: its partial softmaxes merge in the same order batched or
 * alone, so a conversation's logits are the same bits either way (greedy replies equal, tests/test_server.py). */
static int plan_chunks(int S, const int *length, int kv_heads, int threads, int *chunks) {
    int sum = 0;
    const int wanted = (2 * threads + kv_heads - 1) / kv_heads; /* chunks per kv head for 2 tasks per thread */
    for (int s = 0; s < S; s++) {
        int c = (length[s] + CHUNK - 1) / CHUNK;
        const int most = length[s] / MIN_CHUNK > 1 ? length[s] / MIN_CHUNK : 1;
        if (c < wanted) c = wanted < most ? wanted : most;
        sum += chunks[s] = c;
    }
    return kv_heads * sum;
}

/* Merges one query head's partial results of `chunks` tasks (records `step` floats apart: max, sum, output [D])
 * into out [D]: each rescaled by exp(its max - the overall max). */
static void merge_records(const float *records, size_t step, int chunks, int D, float *out) {
    float top = -INFINITY, total = 0.0f;
    for (int c = 0; c < chunks; c++) top = records[c * step] > top ? records[c * step] : top;
    for (int i = 0; i < D; i += 8) _mm256_storeu_ps(out + i, _mm256_setzero_ps());
    for (int c = 0; c < chunks; c++) {
        const float *record = records + c * step, weight = expf(record[0] - top);
        total += record[1] * weight;
        for (int i = 0; i < D; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_loadu_ps(record + 2 + i), _mm256_set1_ps(weight),
                                                      _mm256_loadu_ps(out + i)));
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / total);
    for (int i = 0; i < D; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), inverse));
}

/* Attention for one query per sequence at decode (softmax(q K^T * scale) V over places 0..length-1) for S sequences
 * at once, split over (sequence, kv head, chunk of places) tasks (`plan_chunks`): every query head of a group reads
 * its kv head's keys and values while they are in cache, and all threads have work whatever the number of heads or
 * sequences. A sequence in one chunk is written directly; else its chunks' partial softmaxes are merged after
 * (flash-decoding, Dao et al. 2023).
 * Sequence s: q[s] [heads, D] fp32; keys[s]/values[s] [kv_heads, capacity, D] (fp32, or fp16 when half), each kv
 * head stride[s] elements apart; length[s] places; out[s] [heads, D] fp32. Query head h reads kv head
 * h / (heads / kv_heads) (transformers' repeat_kv pairing). Returns 0, or -1 on sizes it does not take (D a
 * multiple of 8 up to 256, groups up to 16) or when memory ran out. */
/* sc_attention_many's operands, shared by its tasks. */
typedef struct {
    const float *const *q;
    const void *const *keys, *const *values;
    int half;
    const long *stride;
    const int *length, *chunks, *first;
    int group, D;
    float scale;
    float *const *out;
    float *partial;
    size_t record;
} attention_job;

static void attention_job_task(void *context, int t) {
    const attention_job *job = context;
    const int *chunks = job->chunks, *first = job->first, *length = job->length;
    int s = 0;
    while (first[s + 1] <= t) s++;
    const int local = t - first[s], kv = local / chunks[s], c = local % chunks[s];
    const int j0 = (int)((long)length[s] * c / chunks[s]), j1 = (int)((long)length[s] * (c + 1) / chunks[s]);
    attention_task(job->q[s], job->keys[s], job->values[s], job->half, (size_t)kv * job->stride[s], j0, j1, kv,
                   job->group, job->D, job->scale, job->out[s],
                   chunks[s] > 1 ? job->partial + (size_t)t * job->record : NULL);
}

int sc_attention_many(int S, const float *const *q, const void *const *keys, const void *const *values, int half,
                      const long *stride, const int *length, int heads, int kv_heads, int D, float scale,
                      float *const *out) {
    if (D % 8 || D > MAX_DIM || kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || S <= 0) return -1;
    for (int s = 0; s < S; s++)
        if (length[s] <= 0) return -1;
    const int group = heads / kv_heads;
    int small[2 * 64 + 1], *chunks = S <= 64 ? small : malloc(sizeof(int) * (2 * (size_t)S + 1));
    if (!chunks) return -1;
    int *first = chunks + S; /* first task of each sequence; its task t covers kv head t / chunks, chunk t % chunks */
    const int tasks = plan_chunks(S, length, kv_heads, thread_count, chunks);
    first[0] = 0;
    int split = 0;
    for (int s = 0; s < S; s++) first[s + 1] = first[s] + kv_heads * chunks[s], split |= chunks[s] > 1;
    const size_t record = (size_t)group * (D + 2); /* floats per task's records */
    float *partial = split ? malloc(sizeof(float) * tasks * record) : NULL;
    if (split && !partial) return chunks != small ? free(chunks) : (void)0, -1;
    const attention_job job = {q, keys, values, half, stride, length, chunks, first, group, D, scale, out, partial,
                               record};
    run_tasks(tasks, attention_job_task, (void *)&job);
    for (int s = 0; s < S; s++) {
        if (chunks[s] == 1) continue;
        for (int kv = 0; kv < kv_heads; kv++)
            for (int g = 0; g < group; g++)
                merge_records(partial + (size_t)(first[s] + kv * chunks[s]) * record + (size_t)g * (D + 2), record,
                              chunks[s], D, out[s] + (size_t)(kv * group + g) * D);
    }
    free(partial);
    if (chunks != small) free(chunks);
    return 0;
}

/* One sequence: q [heads, D]; keys/values [kv_heads, capacity, D], kv heads head_stride apart; out [heads, D]. */
int sc_attention(const float *q, const void *keys, const void *values, int half, long head_stride, int length,
                 int heads, int kv_heads, int D, float scale, float *out) {
    return sc_attention_many(1, &q, &keys, &values, half, &head_stride, &length, heads, kv_heads, D, scale, &out);
}

/* The attention probabilities of one query per sequence that a scoring policy observes (H2O, TOVA: the attention
 * each cached token receives), averaged over each GQA group's query heads, as streamchat.attention's
 * grouped_probabilities computes them: out[kv * out_stride + j] = mean over the group's heads h of
 * softmax_j(scale q_h . k_j), j < length. q [heads, D] fp32; keys [kv_heads, stride] fp32 or fp16. A second pass over
 * the keys, one task per kv head, after the attention itself. */
typedef struct {
    const float *q;
    const void *keys;
    int half, length, group, D;
    long stride, out_stride;
    float scale;
    float *out;
} probs_job;

static void probs_task(void *context, int kv) {
    const probs_job *job = context;
    const int n = job->length, D = job->D;
    float *out = job->out + (size_t)kv * job->out_stride;
    for (int j = 0; j < n; j++) out[j] = 0.0f; /* zeros, not whatever the buffer held, should memory run out */
    float *scores = malloc(sizeof(float) * ((size_t)n + 8)); /* softmax_parts pads to a multiple of 8 */
    if (!scores) return;
    for (int g = 0; g < job->group; g++) {
        const float *q = job->q + (size_t)(kv * job->group + g) * D;
        for (int j = 0; j < n; j++) {
            __m256 acc = _mm256_setzero_ps();
            for (int i = 0; i < D; i += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(job->keys, (size_t)kv * job->stride + (size_t)j * D + i, job->half), acc);
            scores[j] = hsum(acc) * job->scale;
        }
        float total;
        softmax_parts(scores, n, &total);
        const float weight = 1.0f / (total * (float)job->group);
        for (int j = 0; j < n; j++) out[j] += scores[j] * weight;
    }
    free(scores);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The whole decode step of a Llama-layout model for B sequences, one call: no Python between the layers.
 * Per layer, as streamchat/fastpath/decoder.py's FastDecoder._forward (the reference it is tested against):
 * RMSNorm; fused q/k/v matmul; q and k rotated at each sequence's own place (cache-relative RoPE, rotate-half
 * convention); the new raw key, rotated key, value and stream index written at that place of the sequence's cache;
 * attention over places 0..place; output projection added to the residual stream; RMSNorm; fused gate/up matmul;
 * SiLU(gate) * up; down projection added. Then the final RMSNorm and the 8-bit output projection.
 */
#define SC_Q4X8 100 /* streamchat's own layouts beside ggml's type numbers: block_q4x8, block_q8x8 (scales in extra) */
#define SC_Q8X8 101

/* A linear's weights: up to 3 row-parts side by side in the output (q, k and v; gate and up), each a GGUF tensor
 * of its own type (kernels_ggml.c) or one streamchat-packed matrix (SC_Q4X8 or SC_Q8X8, the only part). */
typedef struct {
    const void *data;
    const float *extra; /* SC_Q8X8: row scales; else NULL */
    int type, rows;
} sc_part;

typedef struct {
    sc_part parts[3];
    int count;
} sc_linear;

typedef struct {
    sc_linear qkv, out, gate_up, down;
    const float *qkv_bias;               /* [q + k + v rows] or NULL */
    const float *input_norm, *post_norm; /* [hidden] */
    const float *q_norm, *k_norm;        /* [D] per-head RMSNorm of queries and keys before RoPE (Qwen3), or NULL */
} sc_layer;

int sc_linear_bytes(void) { return (int)sizeof(sc_linear); }

/* x [M, K] times the linear's parts: out [M, N], N the parts' rows together, + bias [N] when not NULL.
 * Returns 0, or -1 on sizes or types the kernels do not take. */
int sc_linear_matmul(const float *x, int M, int K, const sc_linear *linear, int N, const float *bias, float *out) {
    if (linear->count < 1 || linear->count > 3) return -1;
    const sc_part *first = linear->parts;
    if (first->type == SC_Q4X8 || first->type == SC_Q8X8) {
        if (linear->count != 1 || first->rows != N) return -1;
        if (first->type == SC_Q4X8) return sc_q4_matmul(x, M, K, first->data, N, bias, out);
        if (sc_q8_matmul(x, M, K, first->data, first->extra, N, out)) return -1;
    } else {
        int offset = 0;
        for (int p = 0; p < linear->count; p++) {
            const sc_part *part = linear->parts + p;
            if (offset + part->rows > N || sc_ggml_matmul(part->type, x, M, K, part->data, part->rows, out + offset, N))
                return -1;
            offset += part->rows;
        }
        if (offset != N) return -1;
    }
    if (bias)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) out[(size_t)m * N + n] += bias[n];
    return 0;
}

typedef struct {
    void *keys, *raw_keys, *values; /* [kv_heads, capacity, D] fp32 or fp16 */
    int64_t *origins;               /* [kv_heads, capacity] */
} sc_cache_layer;

int sc_layer_bytes(void) { return (int)sizeof(sc_layer); }
int sc_cache_layer_bytes(void) { return (int)sizeof(sc_cache_layer); }

static void rms_norm(const float *x, const float *weight, float *out, int n, float eps) {
    __m256 squares = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        squares = _mm256_add_ps(squares, _mm256_mul_ps(v, v));
    }
    double total = hsum(squares);
    for (; i < n; i++) total += (double)x[i] * x[i];
    const float inverse = 1.0f / sqrtf((float)(total / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inverse * weight[i];
}

/* x [D] rotated in place at a place whose cos/sin rows are given: x * cos + rotate_half(x) * sin. */
static void rotate(float *x, const float *cos, const float *sin, int D) {
    const int half = D / 2;
    float rotated[MAX_DIM];
    for (int i = 0; i < half; i++) rotated[i] = x[i] * cos[i] + -x[i + half] * sin[i]; /* two loops: vectorized */
    for (int i = half; i < D; i++) rotated[i] = x[i] * cos[i] + x[i - half] * sin[i];
    memcpy(x, rotated, sizeof(float) * D);
}

static void store(void *buffer, int half, size_t index, const float *x, int D) {
    if (half) {
        uint16_t *target = (uint16_t *)buffer + index;
        for (int i = 0; i < D; i += 8)
            _mm_storeu_si128((__m128i *)(target + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    } else {
        memcpy((float *)buffer + index, x, sizeof(float) * D);
    }
}

/* B rows, each one new token of some sequence: a decode step has one row per sequence; a prefill chunk of n tokens
 * is n rows of one sequence at consecutive places (each row's key and value are stored before any row attends, and a
 * row attends over its sequence's places 0..its own place: causal, as a forward over the chunk).
 * x [B, hidden]: the embedded tokens in, the residual stream (overwritten); places [B]: where each row's token goes
 * in its sequence's cache; origins [B]: its stream index; cos/sin [B, D]: RoPE rows at those places; caches
 * [B * layers] (row-major: rows of one sequence repeat its layers); capacity [B]; half: K/V stored as fp16; head,
 * head_scales: the output projection (`block_q8x8` groups, scales [groups * 8]); logits [L, vocab] out for rows
 * logit_rows [L] (a prefill chunk needs only its last row's); probs: NULL, or per row NULL or [layers, kv_heads,
 * capacity] fp32 that receives the row's GQA-averaged attention probabilities at places 0..place of every layer
 * (`probs_task`), for a policy that observes them. Returns 0, or -1 on sizes the kernels do not take or when memory
 * ran out. */
int sc_decode(int B, int n_layers, const sc_layer *layers, int hidden, int heads, int kv_heads, int D,
              int intermediate, float eps, float scale, float *x, const int *places, const int64_t *origins,
              const float *cos, const float *sin, const sc_cache_layer *caches, const int *capacity, int half,
              const float *final_norm, const sc_linear *head, int vocab, int L,
              const int *logit_rows, float *logits, float *const *probs) {
    if (D % 8 || D > MAX_DIM || heads % kv_heads || L < 0 || L > B) return -1;
    const int rows = (heads + 2 * kv_heads) * D;
    float *normed = malloc(sizeof(float) * (size_t)B * (hidden > intermediate ? hidden : intermediate));
    float *qkv = malloc(sizeof(float) * (size_t)B * rows);
    float *attended = malloc(sizeof(float) * (size_t)B * heads * D);
    float *gate_up = malloc(sizeof(float) * (size_t)B * 2 * intermediate);
    float *delta = malloc(sizeof(float) * (size_t)B * hidden);
    float **queries = malloc(sizeof(float *) * B), **outputs = malloc(sizeof(float *) * B);
    void **key_buffers = malloc(sizeof(void *) * B), **value_buffers = malloc(sizeof(void *) * B);
    long *strides = malloc(sizeof(long) * B);
    int *lengths = malloc(sizeof(int) * B);
    int status = (normed && qkv && attended && gate_up && delta && queries && outputs && key_buffers && value_buffers
                  && strides && lengths) ? 0 : -1;
    for (int l = 0; l < n_layers && !status; l++) {
        const sc_layer *layer = layers + l;
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * hidden, layer->input_norm, normed + (size_t)b * hidden, hidden, eps);
        status |= sc_linear_matmul(normed, B, hidden, &layer->qkv, rows, layer->qkv_bias, qkv);
        for (int b = 0; b < B && !status; b++) {
            float *row = qkv + (size_t)b * rows;
            const float *c = cos + (size_t)b * D, *s = sin + (size_t)b * D;
            const sc_cache_layer *cache = caches + (size_t)b * n_layers + l;
            const size_t stride = (size_t)capacity[b] * D, place = (size_t)places[b];
            if (layer->q_norm)
                for (int h = 0; h < heads; h++) rms_norm(row + (size_t)h * D, layer->q_norm, row + (size_t)h * D, D, eps);
            if (layer->k_norm)
                for (int h = 0; h < kv_heads; h++)
                    rms_norm(row + (size_t)(heads + h) * D, layer->k_norm, row + (size_t)(heads + h) * D, D, eps);
            for (int h = 0; h < kv_heads; h++) { /* raw key first: the rotation is in place */
                float *key = row + (size_t)(heads + h) * D;
                store(cache->raw_keys, half, h * stride + place * D, key, D);
                rotate(key, c, s, D);
                store(cache->keys, half, h * stride + place * D, key, D);
                store(cache->values, half, h * stride + place * D, row + (size_t)(heads + kv_heads + h) * D, D);
                cache->origins[(size_t)h * capacity[b] + place] = origins[b];
            }
            for (int h = 0; h < heads; h++) rotate(row + (size_t)h * D, c, s, D);
            queries[b] = row, key_buffers[b] = cache->keys, value_buffers[b] = cache->values;
            strides[b] = (long)stride, lengths[b] = places[b] + 1, outputs[b] = attended + (size_t)b * heads * D;
        }
        if (!status)
            status |= sc_attention_many(B, (const float *const *)queries, (const void *const *)key_buffers,
                                        (const void *const *)value_buffers, half, strides, lengths, heads, kv_heads, D,
                                        scale, outputs);
        for (int b = 0; probs && b < B && !status; b++) /* rows whose cache's policy observes attention */
            if (probs[b]) {
                const probs_job job = {queries[b], key_buffers[b], half, lengths[b], heads / kv_heads, D, strides[b],
                                       capacity[b], scale, probs[b] + (size_t)l * kv_heads * capacity[b]};
                run_tasks(kv_heads, probs_task, (void *)&job);
            }
        status |= sc_linear_matmul(attended, B, heads * D, &layer->out, hidden, NULL, delta);
        for (size_t i = 0; i < (size_t)B * hidden; i++) x[i] += delta[i];
        for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * hidden, layer->post_norm, normed + (size_t)b * hidden, hidden, eps);
        status |= sc_linear_matmul(normed, B, hidden, &layer->gate_up, 2 * intermediate, NULL, gate_up);
        for (int b = 0; b < B; b++) { /* SiLU(gate) * up, packed into the first half of each row */
            float *g = gate_up + (size_t)b * 2 * intermediate;
            float *h = normed + (size_t)b * intermediate;
            int i = 0;
            for (; i + 8 <= intermediate; i += 8) {
                const __m256 gate = _mm256_loadu_ps(g + i);
                const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gate));
                const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
                _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, _mm256_loadu_ps(g + intermediate + i)));
            }
            for (; i < intermediate; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * g[intermediate + i];
        }
        status |= sc_linear_matmul(normed, B, intermediate, &layer->down, hidden, NULL, delta);
        for (size_t i = 0; i < (size_t)B * hidden; i++) x[i] += delta[i];
    }
    if (!status && L > 0) {
        for (int l = 0; l < L; l++)
            rms_norm(x + (size_t)logit_rows[l] * hidden, final_norm, normed + (size_t)l * hidden, hidden, eps);
        status |= sc_linear_matmul(normed, L, hidden, head, vocab, NULL, logits);
    }
    park_workers();
    free(normed), free(qkv), free(attended), free(gate_up), free(delta);
    free(queries), free(outputs), free(key_buffers), free(value_buffers), free(strides), free(lengths);
    return status ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Eviction's compaction (streamchat/cache.py, BoundedLayer.compact and BoundedCache.make_room) when the kept places
 * after the protected prefix are one contiguous run, as sink_window's are: places src..src+count-1 move down to
 * dst..dst+count-1 (or up) for every kv head of every layer given. Raw keys, values and stream indices are copied;
 * keys become the raw keys rotated at their new places (`rotate`, rope.py's formula x cos + rotate_half(x) sin, in
 * fp32 and without fused multiply-adds: -ffp-contract=off, so the result equals torch's bit for bit). Buffers
 * [kv_heads, capacity, D] (fp32, or fp16 when half), origins [kv_heads, capacity]; cos/sin [capacity, D] fp32.
 * Returns 0, or -1 on sizes it does not take (D a multiple of 8 up to 256). One task per layer and kv head over the
 * pool: its runs move in one memmove per buffer (overlapping runs either way), then its keys are re-rotated (a full
 * 1,024-token cache of 30 layers: 7 ms per compaction row by row on one thread, a decode step's worth every
 * `slack` + 1 tokens; all layers in one call, both threads: 4 ms on an AVX2 EPYC, bound by its ~60 MB of traffic). */
typedef struct {
    const sc_cache_layer *layers;
    int half, kv_heads, capacity, D, src, dst, count;
    const float *cos, *sin;
} compact_job;

static void compact_task(void *context, int t) {
    const compact_job *job = context;
    const sc_cache_layer *layer = job->layers + t / job->kv_heads;
    const int D = job->D, h = t % job->kv_heads;
    const size_t row = (size_t)D * (job->half ? 2 : 4), count = (size_t)job->count;
    const size_t from = (size_t)h * job->capacity + job->src, to = (size_t)h * job->capacity + job->dst;
    memmove((char *)layer->raw_keys + to * row, (char *)layer->raw_keys + from * row, count * row);
    memmove((char *)layer->values + to * row, (char *)layer->values + from * row, count * row);
    memmove((int64_t *)layer->origins + to, (int64_t *)layer->origins + from, sizeof(int64_t) * count);
    float key[MAX_DIM];
    for (size_t j = 0; j < count; j++) {
        for (int i = 0; i < D; i += 8) _mm256_storeu_ps(key + i, load8(layer->raw_keys, (to + j) * D + i, job->half));
        const size_t place = (size_t)job->dst + j;
        rotate(key, job->cos + place * D, job->sin + place * D, D); /* the step's RoPE */
        store(layer->keys, job->half, (to + j) * D, key, D);
    }
}

int sc_compact_layers(const sc_cache_layer *layers, int n_layers, int half, int kv_heads, int capacity, int D, int src,
                      int dst, int count, const float *cos, const float *sin) {
    if (D % 8 || D > MAX_DIM || dst < 0 || src < 0 || count < 0 || src + count > capacity || dst + count > capacity ||
        n_layers < 0 || kv_heads <= 0)
        return -1;
    if (count == 0 || n_layers == 0) return 0;
    const compact_job job = {layers, half, kv_heads, capacity, D, src, dst, count, cos, sin};
    run_tasks(n_layers * kv_heads, compact_task, (void *)&job);
    return 0;
}


/* ---------------------------------------------------------------------------------------------------------------
 * Sampling the next token: transformers' logits processors as ChatSession applies them (session.py), one pass per
 * row, no Python between the steps.
 *
 * The repetition penalty of CTRL (Keskar et al. 2019) as transformers' RepetitionPenaltyLogitsProcessor applies it
 * to one row [V] (changed in place): each distinct id in history [W] (ids outside 0..V-1 are padding) has its logit
 * v replaced by v < 0 ? v * penalty : v / penalty, once however often it occurs (every original is read, into
 * `saved` [W], before any is written). */
static void repetition_penalty(float *row, int V, const int64_t *ids, int W, float penalty, float *saved) {
    if (penalty == 1.0f) return;
    for (int w = 0; w < W; w++) saved[w] = ids[w] >= 0 && ids[w] < V ? row[ids[w]] : 0.0f;
    for (int w = 0; w < W; w++)
        if (ids[w] >= 0 && ids[w] < V) row[ids[w]] = saved[w] < 0.0f ? saved[w] * penalty : saved[w] / penalty;
}

/* Greedy choice for B rows of logits [B, V] (modified in place) after the repetition penalty over each row's
 * history [W]. out[b]: the first index of the row's maximum, torch.argmax's choice. Returns 0, or -1 when memory
 * ran out. */
int sc_greedy(float *logits, int B, int V, const int64_t *history, int W, float penalty, int64_t *out) {
    float *saved = W > 0 ? malloc(sizeof(float) * (size_t)W) : NULL;
    if (W > 0 && !saved) return -1;
    for (int b = 0; b < B; b++) {
        float *row = logits + (size_t)b * V;
        repetition_penalty(row, V, history + (size_t)b * W, W, penalty, saved);
        __m256 top = _mm256_set1_ps(-INFINITY);
        int i = 0;
        for (; i + 8 <= V; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(row + i));
        float best = hmax(top);
        for (; i < V; i++) best = row[i] > best ? row[i] : best;
        const __m256 target = _mm256_set1_ps(best);
        for (i = 0; i + 8 <= V; i += 8) {
            const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), target, _CMP_EQ_OQ));
            if (mask) break;
        }
        for (; i < V; i++)
            if (row[i] == best) break;
        out[b] = i < V ? i : 0;
    }
    free(saved);
    return 0;
}

#define MAX_TOP_K 1024 /* most candidates sc_sample keeps (top_k beyond it: torch's path, session.py) */
#define SC_BAD_ARGUMENT -1
#define SC_NOT_FINITE -2
#define SC_NO_MEMORY -3

/* The k largest logits of row [V], in descending order (equal values: lower id first), into values/ids; returns
 * how many it kept (k, fewer only where the row has fewer numbers than k: NaN is skipped). One pass: 8 logits at a
 * time are skipped unless one beats the k-th kept so far. */
static int largest(const float *row, int V, int k, float *values, int *ids) {
    int kept = 0;
    float floor = -INFINITY; /* the k-th largest kept once k are kept: only a larger logit gets in */
    for (int i = 0; i < V; i += 8) {
        int mask = 0xFF;
        if (i + 8 <= V && kept == k)
            mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(floor), _CMP_GT_OQ));
        for (int j = i; mask && j < i + 8 && j < V; j++) {
            const float v = row[j];
            if (v != v || (kept == k && !(v > floor))) continue; /* NaN: never a candidate */
            int at = kept < k ? kept++ : k - 1; /* a full list drops its last */
            while (at > 0 && values[at - 1] < v) values[at] = values[at - 1], ids[at] = ids[at - 1], at--;
            values[at] = v, ids[at] = j;
            if (kept == k) floor = values[k - 1];
        }
    }
    return kept;
}

/* A draw for B rows of logits [B, V] (modified in place), as ChatSession._sample makes it with transformers'
 * processors: the repetition penalty over the row's history [W]; the logits divided by `temperature` (> 0,
 * TemperatureLogitsWarper); the top_k (1..MAX_TOP_K) largest kept (torch.topk); of those, top-p (nucleus sampling,
 * Holtzman et al. 2020, as TopPLogitsWarper: the most likely candidates while the ones before them hold less than
 * top_p of the probability, the first always); then candidate i drawn with probability p_i / sum p over the kept,
 * by the inverse of their cumulative sum at uniform[b] in [0, 1) (the session's generator draws it, so seeded
 * replies repeat; torch.multinomial draws otherwise, so a seed gives other replies on torch's path). The softmax
 * takes exp((v_i - v_max) / temperature): the same numbers as after the division, without the overflow a tiny
 * temperature would cause. out[b]: the token id. Returns 0; SC_BAD_ARGUMENT on a bad top_k or temperature;
 * SC_NOT_FINITE where a row's largest logit is infinite or every one NaN (torch's multinomial refuses those too);
 * SC_NO_MEMORY. */
int sc_sample(float *logits, int B, int V, const int64_t *history, int W, float penalty, float temperature,
              int top_k, float top_p, const float *uniform, int64_t *out) {
    if (top_k < 1 || top_k > MAX_TOP_K || !(temperature > 0.0f) || V < 1) return SC_BAD_ARGUMENT;
    float *saved = W > 0 ? malloc(sizeof(float) * (size_t)W) : NULL;
    if (W > 0 && !saved) return SC_NO_MEMORY;
    float values[MAX_TOP_K];
    int ids[MAX_TOP_K];
    for (int b = 0; b < B; b++) {
        float *row = logits + (size_t)b * V;
        repetition_penalty(row, V, history + (size_t)b * W, W, penalty, saved);
        const int k = largest(row, V, top_k < V ? top_k : V, values, ids);
        if (k == 0 || !isfinite(values[0])) {
            free(saved);
            return SC_NOT_FINITE;
        }
        const float top = values[0];
        float total = 0.0f;
        for (int i = 0; i < k; i++) total += values[i] = expf((values[i] - top) / temperature);
        int kept = 1; /* top-p: rank r stays while the ranks before it hold less than top_p */
        if (top_p < 1.0f) {
            float before = values[0] / total;
            while (kept < k && before < top_p) before += values[kept++] / total;
        } else {
            kept = k;
        }
        float mass = 0.0f;
        for (int i = 0; i < kept; i++) mass += values[i];
        const float target = uniform[b] * mass;
        int chosen = -1, last = 0; /* last: the least likely kept candidate of weight > 0 (if the sum rounds short) */
        float running = 0.0f;
        for (int i = 0; i < kept && chosen < 0; i++) {
            running += values[i];
            last = values[i] > 0.0f ? i : last;
            if (running > target) chosen = i;
        }
        chosen = chosen < 0 ? last : chosen;
        out[b] = ids[chosen];
    }
    free(saved);
    return 0;
}
