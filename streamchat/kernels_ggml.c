/* ggml's block types, read as a GGUF file stores them: dequantization and matmuls over row-major blocks.
 *
 * Included by kernels.c (one translation unit: the thread pool, quantize_q8 and hsum live there). A GGUF tensor
 * of N rows and K inputs is N rows of K / block_size blocks, each block as ggml-common.h lays it out; these
 * kernels read those bytes where the file's memory map holds them, so a model loads without converting a weight.
 *
 * Types (ggml's numbers, `enum ggml_type`): F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12,
 * Q5_K 13, Q6_K 14, BF16 30. Dequantization follows ggml's dequantize_row_* (gguf-py's quants.py computes the
 * same; tests/test_ggml_blocks.py holds each against it). The matmuls quantize the activations as llama.cpp's CPU
 * backend does for each type: 32-input 8-bit blocks (Q8_0/Q8_1: scale and sum) for the 32-input types, 256-input
 * blocks with 16-input sums (Q8_K) for the K-quants, then integer dot products per block (vpmaddubsw on AVX2,
 * vpdpbusd with AVX-512 VNNI), the block scales applied in fp32: the method of ggml_vec_dot_*_q8_* (ggml-cpu's
 * x86 quants.c), written anew. F16, BF16 and F32 weights multiply fp32 activations in fp32.
 */

#define QK_K 256

enum {
    SC_F32 = 0, SC_F16 = 1, SC_Q4_0 = 2, SC_Q4_1 = 3, SC_Q5_0 = 6, SC_Q5_1 = 7, SC_Q8_0 = 8,
    SC_Q4_K = 12, SC_Q5_K = 13, SC_Q6_K = 14, SC_BF16 = 30,
};

typedef struct { uint16_t d; uint8_t qs[16]; } block_q4_0;                   /* 18 bytes, 32 weights */
typedef struct { uint16_t d, m; uint8_t qs[16]; } block_q4_1;                /* 20 */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;    /* 22 */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1; /* 24 */
typedef struct { uint16_t d; int8_t qs[32]; } block_q8_0;                    /* 34 */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;             /* 144, 256 */
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K; /* 176 */
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; uint16_t d; } block_q6_K;   /* 210 */

/* 256 activations at 8 bits: scale, values, and the sums of each 16 (llama.cpp's block_q8_K). */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K;

static inline float fp16(uint16_t h) { return _cvtsh_ss(h); }

static inline float bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Weights per block and bytes per block of a type; 0 for a type these kernels do not take. */
static int block_weights(int type) {
    switch (type) {
        case SC_F32: case SC_F16: case SC_BF16: return 1;
        case SC_Q4_0: case SC_Q4_1: case SC_Q5_0: case SC_Q5_1: case SC_Q8_0: return 32;
        case SC_Q4_K: case SC_Q5_K: case SC_Q6_K: return QK_K;
        default: return 0;
    }
}

static size_t block_bytes(int type) {
    switch (type) {
        case SC_F32: return 4;
        case SC_F16: case SC_BF16: return 2;
        case SC_Q4_0: return sizeof(block_q4_0);
        case SC_Q4_1: return sizeof(block_q4_1);
        case SC_Q5_0: return sizeof(block_q5_0);
        case SC_Q5_1: return sizeof(block_q5_1);
        case SC_Q8_0: return sizeof(block_q8_0);
        case SC_Q4_K: return sizeof(block_q4_K);
        case SC_Q5_K: return sizeof(block_q5_K);
        case SC_Q6_K: return sizeof(block_q6_K);
        default: return 0;
    }
}

int sc_ggml_block_weights(int type) { return block_weights(type); }
int sc_ggml_block_bytes(int type) { return (int)block_bytes(type); }

/* The 6-bit scale and minimum of sub-block j (0..7) of a Q4_K/Q5_K block (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *scale, uint8_t *minimum) {
    if (j < 4) {
        *scale = q[j] & 63;
        *minimum = q[j + 4] & 63;
    } else {
        *scale = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *minimum = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* All 8 scales (bytes 0-7) and minimums (bytes 8-15) of a Q4_K/Q5_K block at once: the same values as
 * scale_min_k4 for j = 0..7, by 32-bit masks and shifts (the 12 bytes hold 8 low 6-bit scales and minimums for
 * j < 4; for j >= 4, 4 low bits in bytes 8-11 and 2 high bits in the top of bytes 0-7). */
static inline void scales_mins_k4(const uint8_t *packed, uint8_t out[16]) {
    uint32_t w[4];
    memcpy(w, packed, 12);
    const uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    w[3] = ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4); /* minimums 4-7 */
    const uint32_t mins = w[1] & low6;                          /* minimums 0-3 */
    w[1] = (w[2] & low4) | (((w[0] >> 6) & low2) << 4);        /* scales 4-7 */
    w[2] = mins;
    w[0] &= low6; /* scales 0-3 */
    memcpy(out, w, 16);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Dequantization: `n` weights (a multiple of the type's block) from `src` into fp32 `out`. Returns 0, or -1 for a
 * type it does not take or a size that is not whole blocks. Scalar and plain: it serves the embedding's rows (one
 * row per token) and the tests; the matmuls never widen weights to floats.
 */
int sc_ggml_dequantize(int type, const void *src, long n, float *out) {
    const int bw = block_weights(type);
    if (bw == 0 || n < 0 || n % bw) return -1;
    const long nb = n / bw;
    for (long b = 0; b < nb; b++) {
        float *y = out + b * bw;
        switch (type) {
            case SC_F32: memcpy(y, (const float *)src + b, sizeof(float)); break;
            case SC_F16: *y = fp16(((const uint16_t *)src)[b]); break;
            case SC_BF16: *y = bf16(((const uint16_t *)src)[b]); break;
            case SC_Q4_0: {
                const block_q4_0 *x = (const block_q4_0 *)src + b;
                const float d = fp16(x->d);
                for (int j = 0; j < 16; j++) {
                    y[j] = ((x->qs[j] & 0xF) - 8) * d;
                    y[j + 16] = ((x->qs[j] >> 4) - 8) * d;
                }
                break;
            }
            case SC_Q4_1: {
                const block_q4_1 *x = (const block_q4_1 *)src + b;
                const float d = fp16(x->d), m = fp16(x->m);
                for (int j = 0; j < 16; j++) {
                    y[j] = (x->qs[j] & 0xF) * d + m;
                    y[j + 16] = (x->qs[j] >> 4) * d + m;
                }
                break;
            }
            case SC_Q5_0: case SC_Q5_1: {
                const int legacy0 = type == SC_Q5_0;
                const block_q5_0 *x0 = (const block_q5_0 *)src + b;
                const block_q5_1 *x1 = (const block_q5_1 *)src + b;
                const float d = fp16(legacy0 ? x0->d : x1->d), m = legacy0 ? 0.0f : fp16(x1->m);
                const uint8_t *qs = legacy0 ? x0->qs : x1->qs, *qhb = legacy0 ? x0->qh : x1->qh;
                uint32_t qh;
                memcpy(&qh, qhb, 4);
                for (int j = 0; j < 16; j++) {
                    const int low = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
                    const int high = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
                    y[j] = legacy0 ? (low - 16) * d : low * d + m;
                    y[j + 16] = legacy0 ? (high - 16) * d : high * d + m;
                }
                break;
            }
            case SC_Q8_0: {
                const block_q8_0 *x = (const block_q8_0 *)src + b;
                const float d = fp16(x->d);
                for (int j = 0; j < 32; j++) y[j] = x->qs[j] * d;
                break;
            }
            case SC_Q4_K: case SC_Q5_K: {
                const int five = type == SC_Q5_K;
                const block_q4_K *x4 = (const block_q4_K *)src + b;
                const block_q5_K *x5 = (const block_q5_K *)src + b;
                const float d = fp16(five ? x5->d : x4->d), dmin = fp16(five ? x5->dmin : x4->dmin);
                const uint8_t *scales = five ? x5->scales : x4->scales, *qs = five ? x5->qs : x4->qs;
                for (int j = 0; j < 4; j++) { /* 64 weights: sub-block 2j in low nibbles, 2j + 1 in high */
                    uint8_t s0, m0, s1, m1;
                    scale_min_k4(2 * j, scales, &s0, &m0);
                    scale_min_k4(2 * j + 1, scales, &s1, &m1);
                    for (int l = 0; l < 32; l++) {
                        int low = qs[32 * j + l] & 0xF, high = qs[32 * j + l] >> 4;
                        if (five) {
                            low |= ((x5->qh[l] >> (2 * j)) & 1) << 4;
                            high |= ((x5->qh[l] >> (2 * j + 1)) & 1) << 4;
                        }
                        y[64 * j + l] = d * s0 * low - dmin * m0;
                        y[64 * j + 32 + l] = d * s1 * high - dmin * m1;
                    }
                }
                break;
            }
            case SC_Q6_K: {
                const block_q6_K *x = (const block_q6_K *)src + b;
                const float d = fp16(x->d);
                for (int n = 0; n < 2; n++) {
                    const uint8_t *ql = x->ql + 64 * n, *qh = x->qh + 32 * n;
                    const int8_t *sc = x->scales + 8 * n;
                    float *yy = y + 128 * n;
                    for (int l = 0; l < 32; l++) {
                        const int is = l / 16;
                        yy[l] = d * sc[is] * (((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
                        yy[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                        yy[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                        yy[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                    }
                }
                break;
            }
            default: return -1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Activations for the K-quants: x [K] fp32 -> K / 256 `block_q8_K` (scale max|x| / 127, round to nearest, and the
 * sums of each 16 values). */
static void quantize_q8_K(const float *x, block_q8_K *y, int K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
    for (int b = 0; b < K / QK_K; b++) {
        const float *xb = x + (size_t)b * QK_K;
        __m256 peak = _mm256_setzero_ps();
        for (int i = 0; i < QK_K; i += 8) peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        const float amax = hmax(peak);
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof(block_q8_K));
            continue;
        }
        float max = amax; /* the first value of that magnitude, with its sign, as llama.cpp's scan takes it */
        for (int i = 0; i < QK_K; i += 8) {
            const __m256 v = _mm256_loadu_ps(xb + i);
            const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(amax), _CMP_EQ_OQ));
            if (hit) {
                max = xb[i + __builtin_ctz((unsigned)hit)];
                break;
            }
        }
        const float id = -127.0f / max; /* llama.cpp's quantize_row_q8_K: same roundings (nearest, ties to even) */
        y[b].d = 1.0f / id;
        const __m256 scale = _mm256_set1_ps(id);
        for (int j = 0; j < QK_K / 32; j++) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) {
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * j + 8 * i), scale));
                q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], top), bottom);
            }
            const __m256i p8 = packs_in_order(q);
            _mm256_storeu_si256((__m256i *)(y[b].qs + 32 * j), p8);
            /* the two 16-value sums: each 128-bit lane holds one group's bytes */
            __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, p8), ones16);
            sums = _mm256_hadd_epi32(sums, sums);
            sums = _mm256_hadd_epi32(sums, sums);
            y[b].bsums[2 * j] = (int16_t)_mm256_extract_epi32(sums, 0);
            y[b].bsums[2 * j + 1] = (int16_t)_mm256_extract_epi32(sums, 4);
        }
    }
}

/* int32 lanes: each the sum of 4 products of unsigned weight bytes (<= 63) and signed activation bytes. */
static inline __m256i dot_u8(__m256i u, __m256i s) {
#ifdef SC_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* As dot_u8, lanes 0-3 (inputs 0-15) times scale s0 and lanes 4-7 (inputs 16-31) times s1. */
static inline __m256i dot_u8_scaled(__m256i u, __m256i s, int s0, int s1) {
#ifdef SC_VNNI
    const __m256i scales = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
    return _mm256_mullo_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s), scales);
#else
    const __m256i scales = _mm256_setr_m128i(_mm_set1_epi16((short)s0), _mm_set1_epi16((short)s1));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scales);
#endif
}

/* 32 bytes, each 0xFF where bit i of x is set (byte i), else 0. */
static inline __m256i bits_to_bytes(uint32_t x) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)x), _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

#define ALWAYS_INLINE_G static inline __attribute__((always_inline))
#define MAX_C 4 /* activation rows per pass over a weight row */
#define PREFETCH_AHEAD 4 /* weight rows read ahead: their bytes are on the way while a row is multiplied */

/* The row kernels read block b of the row PREFETCH_AHEAD rows on (`row_bytes` apart) while they multiply block b
 * of this one: the loads overlap the arithmetic (a burst of a whole row stalls on full fill buffers). Past a
 * task's or tensor's end the hint reads lines that are not used (prefetches never fault). */
ALWAYS_INLINE_G void prefetch_ahead(const void *row, size_t row_bytes, size_t offset, size_t bytes) {
    const char *ahead = (const char *)row + PREFETCH_AHEAD * row_bytes + offset;
    for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
}

/* One weight row of nb 32-input blocks against C activation rows (block_q8, `stride` blocks apart): out[c]. The
 * unpacked weights of a block serve all C rows. */
ALWAYS_INLINE_G void dot_legacy(int type, const void *row, int nb, const block_q8 *a, size_t stride, int C,
                                float *out) {
    __m256 acc[MAX_C];
    float offset[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps(), offset[c] = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const size_t bytes = type == SC_Q8_0 ? sizeof(block_q8_0) : type == SC_Q4_0 ? sizeof(block_q4_0)
                         : type == SC_Q4_1 ? sizeof(block_q4_1) : type == SC_Q5_0 ? sizeof(block_q5_0)
                                                                  : sizeof(block_q5_1);
    for (int b = 0; b < nb; b++) {
        if ((b * bytes) % 64 < bytes) prefetch_ahead(row, nb * bytes, b * bytes, 1); /* a new line begins here */
        __m256i u;
        float d, m; /* w = d * u + m, u unsigned; Q8_0: w = d * u signed */
        if (type == SC_Q8_0) {
            const block_q8_0 *x = (const block_q8_0 *)row + b;
            u = _mm256_loadu_si256((const __m256i *)x->qs), d = fp16(x->d), m = 0.0f;
        } else {
            const uint8_t *qs;
            if (type == SC_Q4_0) {
                const block_q4_0 *x = (const block_q4_0 *)row + b;
                qs = x->qs, d = fp16(x->d), m = -8.0f * d;
            } else if (type == SC_Q4_1) {
                const block_q4_1 *x = (const block_q4_1 *)row + b;
                qs = x->qs, d = fp16(x->d), m = fp16(x->m);
            } else if (type == SC_Q5_0) {
                const block_q5_0 *x = (const block_q5_0 *)row + b;
                qs = x->qs, d = fp16(x->d), m = -16.0f * d;
            } else {
                const block_q5_1 *x = (const block_q5_1 *)row + b;
                qs = x->qs, d = fp16(x->d), m = fp16(x->m);
            }
            const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
            u = _mm256_and_si256(_mm256_setr_m128i(raw, _mm_srli_epi16(raw, 4)), low);
            if (type == SC_Q5_0 || type == SC_Q5_1) {
                uint32_t qh;
                memcpy(&qh, type == SC_Q5_0 ? ((const block_q5_0 *)row + b)->qh : ((const block_q5_1 *)row + b)->qh, 4);
                u = _mm256_or_si256(u, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(16)));
            }
        }
        for (int c = 0; c < C; c++) {
            const block_q8 *ab = a + c * stride + b;
            const __m256i s = _mm256_loadu_si256((const __m256i *)ab->qs);
            __m256i p;
            if (type == SC_Q8_0) /* signed x signed as |w| x (s sign(w)) */
                p = dot_u8(_mm256_sign_epi8(u, u), _mm256_sign_epi8(s, u));
            else
                p = dot_u8(u, s);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ab->d), acc[c]);
            offset[c] += m * ab->s;
        }
    }
    for (int c = 0; c < C; c++) out[c] = hsum(acc[c]) + offset[c];
}

/* sum of the 8 products mins[j] * (bsums[2j] + bsums[2j + 1]) (int). */
static inline int mins_dot(const uint8_t *mins, const int16_t *bsums) {
    const __m128i pairs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bsums),
                                         _mm_loadu_si128((const __m128i *)(bsums + 8)));
    const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mins));
    __m128i p = _mm_madd_epi16(m, pairs);
    p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4E));
    p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1));
    return _mm_cvtsi128_si32(p);
}

/* sum of the 16 products scales[k] * bsums[k] (Q6_K's offset of 32). */
static inline int scales_dot(const int8_t *scales, const int16_t *bsums) {
    const __m256i p = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)scales)),
                                        _mm256_loadu_si256((const __m256i *)bsums));
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4E));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xB1));
    return _mm_cvtsi128_si32(q);
}

/* Half n (0, 1) of a Q6_K block: its 128 6-bit values (0..63) as 4 vectors of 32, in ggml's order (vector j holds
 * values 128n + 32j .. 128n + 32j + 31). */
ALWAYS_INLINE_G void q6_K_half(const block_q6_K *x, int n, __m256i u[4]) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)(x->ql + 64 * n));
    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(x->ql + 64 * n + 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)(x->qh + 32 * n));
    u[0] = _mm256_or_si256(_mm256_and_si256(l0, low),
                           _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x03)), 4));
    u[1] = _mm256_or_si256(_mm256_and_si256(l1, low),
                           _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(0x0C)), 2));
    u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                           _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
    u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                           _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8((char)0xC0)), 2));
}

#ifdef SC_VNNI
/* AVX-512: 64 weights a vector (two 32-weight sub-blocks side by side, as their 64 activations lie), one vpdpbusd
 * and one scale multiply each; Q4_K's low and high nibbles of a 32-byte chunk are exactly such a pair. */
static inline __m512i pair512(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }

ALWAYS_INLINE_G void dot_q45_K_512(int type, const void *row, int nb, const block_q8_K *a, size_t stride, int C,
                                   float *out) {
    __m512 acc[MAX_C];
    float mins[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps(), mins[c] = 0.0f;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const size_t bytes = type == SC_Q5_K ? sizeof(block_q5_K) : sizeof(block_q4_K);
    for (int b = 0; b < nb; b++) {
        prefetch_ahead(row, nb * bytes, b * bytes, bytes);
        const int five = type == SC_Q5_K;
        const block_q4_K *x4 = (const block_q4_K *)row + b;
        const block_q5_K *x5 = (const block_q5_K *)row + b;
        const uint8_t *qs = five ? x5->qs : x4->qs;
        const float d = fp16(five ? x5->d : x4->d), dmin = fp16(five ? x5->dmin : x4->dmin);
        uint8_t sm[16];
        scales_mins_k4(five ? x5->scales : x4->scales, sm);
        /* per pair j: 16 int32 lanes, 8 of sub-block 2j's scale then 8 of 2j + 1's */
        const __m512i scales = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sm));
        __m512i u[4], sc[4];
        const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)x5->qh) : _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            if (five) {
                const __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * j))), b1 = _mm256_set1_epi8((char)(2 << (2 * j)));
                const __m256i sixteen = _mm256_set1_epi8(16);
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
            }
            u[j] = pair512(lo, hi);
            const int e = 2 * j, o = 2 * j + 1;
            sc[j] = _mm512_permutexvar_epi32(_mm512_setr_epi32(e, e, e, e, e, e, e, e, o, o, o, o, o, o, o, o), scales);
        }
        for (int c = 0; c < C; c++) {
            const block_q8_K *ab = a + c * stride + b;
            __m512i sum = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[j],
                                                        _mm512_loadu_si512((const void *)(ab->qs + 64 * j)));
                sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(dot, sc[j]));
            }
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * ab->d), acc[c]);
            mins[c] += dmin * ab->d * (float)mins_dot(sm + 8, ab->bsums);
        }
    }
    for (int c = 0; c < C; c++) out[c] = _mm512_reduce_add_ps(acc[c]) - mins[c];
}

ALWAYS_INLINE_G void dot_q6_K_512(const void *row, int nb, const block_q8_K *a, size_t stride, int C, float *out) {
    __m512 acc[MAX_C];
    float offsets[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps(), offsets[c] = 0.0f;
    for (int b = 0; b < nb; b++) {
        prefetch_ahead(row, nb * sizeof(block_q6_K), b * sizeof(block_q6_K), sizeof(block_q6_K));
        const block_q6_K *x = (const block_q6_K *)row + b;
        const float d = fp16(x->d);
        __m512i u[4], sc[4];
        for (int n = 0; n < 2; n++) {
            __m256i half[4];
            q6_K_half(x, n, half);
            u[2 * n] = pair512(half[0], half[1]), u[2 * n + 1] = pair512(half[2], half[3]);
        }
        /* pair p (64 weights) has 4 scales, 2p*2 .. 2p*2+3, each over 16 weights = 4 int32 lanes */
        const __m512i all = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)x->scales));
        for (int p = 0; p < 4; p++)
            sc[p] = _mm512_permutexvar_epi32(
                _mm512_setr_epi32(4 * p, 4 * p, 4 * p, 4 * p, 4 * p + 1, 4 * p + 1, 4 * p + 1, 4 * p + 1, 4 * p + 2,
                                  4 * p + 2, 4 * p + 2, 4 * p + 2, 4 * p + 3, 4 * p + 3, 4 * p + 3, 4 * p + 3),
                all);
        for (int c = 0; c < C; c++) {
            const block_q8_K *ab = a + c * stride + b;
            __m512i sum = _mm512_setzero_si512();
            for (int p = 0; p < 4; p++) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[p],
                                                        _mm512_loadu_si512((const void *)(ab->qs + 64 * p)));
                sum = _mm512_add_epi32(sum, _mm512_mullo_epi32(dot, sc[p]));
            }
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * ab->d), acc[c]);
            offsets[c] += d * ab->d * (float)(32 * scales_dot(x->scales, ab->bsums));
        }
    }
    for (int c = 0; c < C; c++) out[c] = _mm512_reduce_add_ps(acc[c]) - offsets[c];
}
#endif

/* One Q4_K or Q5_K row of nb 256-input blocks against C activation rows (block_q8_K). Per block: the 8 scales and
 * minimums unpacked at once (scales_mins_k4), Q5_K's fifth bits moved to bit 4 by a shift per sub-block, each
 * sub-block's products scaled in vpmaddwd and summed in int32; the minimums' term is one vpmaddwd of the minimums
 * (each twice) with the activations' 16 sums. */
ALWAYS_INLINE_G void dot_q45_K(int type, const void *row, int nb, const block_q8_K *a, size_t stride, int C,
                               float *out) {
    __m256 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    const size_t bytes = type == SC_Q5_K ? sizeof(block_q5_K) : sizeof(block_q4_K);
    for (int b = 0; b < nb; b++) {
        prefetch_ahead(row, nb * bytes, b * bytes, bytes);
        const int five = type == SC_Q5_K;
        const block_q4_K *x4 = (const block_q4_K *)row + b;
        const block_q5_K *x5 = (const block_q5_K *)row + b;
        const uint8_t *qs = five ? x5->qs : x4->qs;
        const float d = fp16(five ? x5->d : x4->d), dmin = fp16(five ? x5->dmin : x4->dmin);
        uint8_t sm[16]; /* scales 0-7, minimums 8-15 */
        scales_mins_k4(five ? x5->scales : x4->scales, sm);
        __m256i u[8];
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            u[2 * j] = _mm256_and_si256(raw, low);
            u[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        }
        if (five) { /* bit j of each qh byte is the fifth bit of sub-block j's weight: shifted to bit 4 */
            const __m256i qh = _mm256_loadu_si256((const __m256i *)x5->qh);
            u[0] = _mm256_or_si256(u[0], _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4));
            u[1] = _mm256_or_si256(u[1], _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4));
            u[2] = _mm256_or_si256(u[2], _mm256_and_si256(_mm256_slli_epi16(qh, 2), bit4));
            u[3] = _mm256_or_si256(u[3], _mm256_and_si256(_mm256_slli_epi16(qh, 1), bit4));
            u[4] = _mm256_or_si256(u[4], _mm256_and_si256(qh, bit4));
            u[5] = _mm256_or_si256(u[5], _mm256_and_si256(_mm256_srli_epi16(qh, 1), bit4));
            u[6] = _mm256_or_si256(u[6], _mm256_and_si256(_mm256_srli_epi16(qh, 2), bit4));
            u[7] = _mm256_or_si256(u[7], _mm256_and_si256(_mm256_srli_epi16(qh, 3), bit4));
        }
        /* the minimums, each twice (int16): lane k pairs with bsums[k] */
        const __m256i minimums = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(sm + 8)),
                                                                        _mm_loadl_epi64((const __m128i *)(sm + 8))));
        for (int c = 0; c < C; c++) {
            const block_q8_K *ab = a + c * stride + b;
            __m256i sum = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                const __m256i s = _mm256_loadu_si256((const __m256i *)(ab->qs + 32 * j));
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u[j], s), _mm256_set1_epi16(sm[j])));
            }
            const __m256i msum = _mm256_madd_epi16(minimums, _mm256_loadu_si256((const __m256i *)ab->bsums));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * ab->d), acc[c]);
            acc[c] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin * ab->d), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) out[c] = hsum(acc[c]);
}

/* One Q6_K row against C activation rows (block_q8_K): 6-bit values u in 0..63 (w = d * scale * (u - 32)), 16
 * signed 8-bit scales per block, one per 16 weights. */
ALWAYS_INLINE_G void dot_q6_K(const void *row, int nb, const block_q8_K *a, size_t stride, int C, float *out) {
    __m256 acc[MAX_C];
    float offsets[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps(), offsets[c] = 0.0f;
    for (int b = 0; b < nb; b++) {
        prefetch_ahead(row, nb * sizeof(block_q6_K), b * sizeof(block_q6_K), sizeof(block_q6_K));
        const block_q6_K *x = (const block_q6_K *)row + b;
        const float d = fp16(x->d);
        __m256i u[8];
        for (int n = 0; n < 2; n++) q6_K_half(x, n, u + 4 * n);
        for (int c = 0; c < C; c++) {
            const block_q8_K *ab = a + c * stride + b;
            __m256i sum = _mm256_setzero_si256();
            int offset = 0;
            for (int g = 0; g < 8; g++) {
                const __m256i s = _mm256_loadu_si256((const __m256i *)(ab->qs + 32 * g));
                sum = _mm256_add_epi32(sum, dot_u8_scaled(u[g], s, x->scales[2 * g], x->scales[2 * g + 1]));
            }
            for (int k = 0; k < 16; k++) offset += x->scales[k] * ab->bsums[k];
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(d * ab->d), acc[c]);
            offsets[c] += d * ab->d * (float)(32 * offset); /* the -32 of every value, once per block */
        }
    }
    for (int c = 0; c < C; c++) out[c] = hsum(acc[c]) - offsets[c];
}

/* 8 weights of a 16/32-bit float row as fp32. */
ALWAYS_INLINE_G __m256 load_float8(int type, const void *row, int i) {
    if (type == SC_F32) return _mm256_loadu_ps((const float *)row + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + i));
    if (type == SC_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* One F32/F16/BF16 row of K weights (K a multiple of 8) against C fp32 activation rows `stride` floats apart. */
ALWAYS_INLINE_G void dot_float(int type, const void *row, int K, const float *x, size_t stride, int C, float *out) {
    if (C == 1) { /* four sums (K is a multiple of 32): one FMA chain would wait on its own latency, ~12 GB/s */
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
        const size_t size = type == SC_F32 ? 4 : 2;
        for (int i = 0; i < K; i += 32) {
            prefetch_ahead(row, K * size, i * size, 32 * size);
            s0 = _mm256_fmadd_ps(load_float8(type, row, i), _mm256_loadu_ps(x + i), s0);
            s1 = _mm256_fmadd_ps(load_float8(type, row, i + 8), _mm256_loadu_ps(x + i + 8), s1);
            s2 = _mm256_fmadd_ps(load_float8(type, row, i + 16), _mm256_loadu_ps(x + i + 16), s2);
            s3 = _mm256_fmadd_ps(load_float8(type, row, i + 24), _mm256_loadu_ps(x + i + 24), s3);
        }
        out[0] = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        return;
    }
    __m256 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    const size_t size = type == SC_F32 ? 4 : 2;
    for (int i = 0; i < K; i += 8) {
        if (i % 32 == 0) prefetch_ahead(row, K * size, i * size, 32 * size);
        const __m256 w = load_float8(type, row, i);
        for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + c * stride + i), acc[c]);
    }
    for (int c = 0; c < C; c++) out[c] = hsum(acc[c]);
}

/* A row's dot products with C activation rows, one function per type and C (1 or MAX_C) so that each loop above
 * is compiled with its type and count fixed. */
typedef void (*row_dot_fn)(const void *row, int K, const void *a, size_t stride, float *out);

#define ROW_DOTS(NAME, CALL)                                                                                      \
    static void NAME##_1(const void *row, int K, const void *a, size_t stride, float *out) { CALL(1); }          \
    static void NAME##_4(const void *row, int K, const void *a, size_t stride, float *out) { CALL(MAX_C); }
#define LEGACY(T, C_) dot_legacy(T, row, K / 32, (const block_q8 *)a, stride, C_, out)
#define CALL_Q4_0(C_) LEGACY(SC_Q4_0, C_)
#define CALL_Q4_1(C_) LEGACY(SC_Q4_1, C_)
#define CALL_Q5_0(C_) LEGACY(SC_Q5_0, C_)
#define CALL_Q5_1(C_) LEGACY(SC_Q5_1, C_)
#define CALL_Q8_0(C_) LEGACY(SC_Q8_0, C_)
#ifdef SC_VNNI
#define K512 _512
#else
#define K512
#endif
#define GLUE_(a, b) a##b
#define GLUE(a, b) GLUE_(a, b)
#define CALL_Q4_K(C_) GLUE(dot_q45_K, K512)(SC_Q4_K, row, K / QK_K, (const block_q8_K *)a, stride, C_, out)
#define CALL_Q5_K(C_) GLUE(dot_q45_K, K512)(SC_Q5_K, row, K / QK_K, (const block_q8_K *)a, stride, C_, out)
#define CALL_Q6_K(C_) GLUE(dot_q6_K, K512)(row, K / QK_K, (const block_q8_K *)a, stride, C_, out)
#define CALL_F32(C_) dot_float(SC_F32, row, K, (const float *)a, stride, C_, out)
#define CALL_F16(C_) dot_float(SC_F16, row, K, (const float *)a, stride, C_, out)
#define CALL_BF16(C_) dot_float(SC_BF16, row, K, (const float *)a, stride, C_, out)
ROW_DOTS(dot_row_q4_0, CALL_Q4_0)
ROW_DOTS(dot_row_q4_1, CALL_Q4_1)
ROW_DOTS(dot_row_q5_0, CALL_Q5_0)
ROW_DOTS(dot_row_q5_1, CALL_Q5_1)
ROW_DOTS(dot_row_q8_0, CALL_Q8_0)
ROW_DOTS(dot_row_q4_K, CALL_Q4_K)
ROW_DOTS(dot_row_q5_K, CALL_Q5_K)
ROW_DOTS(dot_row_q6_K, CALL_Q6_K)
ROW_DOTS(dot_row_f32, CALL_F32)
ROW_DOTS(dot_row_f16, CALL_F16)
ROW_DOTS(dot_row_bf16, CALL_BF16)

/* The row-dot functions of a type (C = 1 and C = MAX_C); 0 when the type is not taken. */
static int row_dots(int type, row_dot_fn *one, row_dot_fn *four) {
#define PICK(T, NAME) case T: *one = NAME##_1, *four = NAME##_4; return 1;
    switch (type) {
        PICK(SC_Q4_0, dot_row_q4_0) PICK(SC_Q4_1, dot_row_q4_1) PICK(SC_Q5_0, dot_row_q5_0)
        PICK(SC_Q5_1, dot_row_q5_1) PICK(SC_Q8_0, dot_row_q8_0) PICK(SC_Q4_K, dot_row_q4_K)
        PICK(SC_Q5_K, dot_row_q5_K) PICK(SC_Q6_K, dot_row_q6_K) PICK(SC_F32, dot_row_f32)
        PICK(SC_F16, dot_row_f16) PICK(SC_BF16, dot_row_bf16)
        default: return 0;
    }
#undef PICK
}

#define GGML_ROW_TILE 16 /* weight rows per task */
#define GGML_M_TILE 16   /* activation rows swept per pass over a task's weight rows (kept in cache) */

typedef struct {
    row_dot_fn one, four;
    const uint8_t *w;
    size_t row_bytes;
    const void *a;
    size_t a_row; /* bytes per activation row */
    size_t a_stride; /* activation rows apart, in the row_dot's unit (blocks, or floats) */
    float *out;
    int M, K, N, ldo, per_task;
} ggml_job;

static void ggml_task(void *context, int t) {
    const ggml_job *job = context;
    const int n0 = t * job->per_task, n1 = n0 + job->per_task < job->N ? n0 + job->per_task : job->N;
    float results[MAX_C];
    for (int m0 = 0; m0 < job->M; m0 += GGML_M_TILE) {
        const int m1 = m0 + GGML_M_TILE < job->M ? m0 + GGML_M_TILE : job->M;
        for (int n = n0; n < n1; n++) {
            const uint8_t *row = job->w + (size_t)n * job->row_bytes;
            int m = m0;
            for (; m + MAX_C <= m1; m += MAX_C) {
                job->four(row, job->K, (const uint8_t *)job->a + (size_t)m * job->a_row, job->a_stride, results);
                for (int c = 0; c < MAX_C; c++) job->out[(size_t)(m + c) * job->ldo + n] = results[c];
            }
            for (; m < m1; m++) {
                job->one(row, job->K, (const uint8_t *)job->a + (size_t)m * job->a_row, job->a_stride, results);
                job->out[(size_t)m * job->ldo + n] = results[0];
            }
        }
    }
}

static void quantize_q8_K_row(const float *x, void *y, int K) { quantize_q8_K(x, y, K); }

/* x [M, K] fp32 -> M rows of K / 256 block_q8_K (the caller frees it), or NULL: kernels.c's quantize_into. */
static block_q8_K *quantize_rows_k(const float *x, int M, int K) {
    const size_t row_bytes = sizeof(block_q8_K) * (size_t)(K / QK_K);
    return quantize_into(quantize_q8_K_row, x, M, K, row_bytes, malloc(row_bytes * (size_t)M));
}

/* x [M, K] fp32 times the GGUF tensor w (N rows of K weights of `type`, row-major blocks) transposed:
 * out[m * ldo + n] for n < N (ldo >= N: a part of a wider output, e.g. q, k and v side by side). Returns 0, or -1
 * for a type it does not take, a K that is not whole blocks (or not a multiple of 8), or memory that ran out. */
static int kx8_matmul(int type, const float *x, int M, int K, const void *w, int N, float *out, int ldo);

int sc_ggml_matmul(int type, const float *x, int M, int K, const void *w, int N, float *out, int ldo) {
    if (type == 112 || type == 114) return kx8_matmul(type, x, M, K, w, N, out, ldo); /* SC_Q4_KX8, SC_Q6_KX8 */
    row_dot_fn one, four;
    const int bw = block_weights(type);
    if (!row_dots(type, &one, &four) || M <= 0 || N <= 0 || K <= 0 || K % bw || K % 32 || ldo < N) return -1;
    /* long runs of rows per task (about 8 tasks a thread, at least GGML_ROW_TILE rows): each thread then streams
     * contiguous weight bytes, which the hardware prefetchers follow */
    int per_task = (N + 8 * thread_count - 1) / (8 * thread_count);
    per_task = (per_task + GGML_ROW_TILE - 1) / GGML_ROW_TILE * GGML_ROW_TILE;
    ggml_job job = {one, four, w, (size_t)(K / bw) * block_bytes(type), x, sizeof(float) * K, (size_t)K, out,
                    M, K, N, ldo, per_task};
    void *activations = NULL;
    if (bw == QK_K) {
        block_q8_K *q = quantize_rows_k(x, M, K);
        if (!q) return -1;
        activations = q, job.a = q, job.a_row = sizeof(block_q8_K) * (K / QK_K), job.a_stride = K / QK_K;
    } else if (bw == 32) {
        block_q8 *q = quantize_rows(x, M, K);
        if (!q) return -1;
        activations = q, job.a = q, job.a_row = sizeof(block_q8) * (K / 32), job.a_stride = K / 32;
    }
    run_tasks((N + per_task - 1) / per_task, ggml_task, &job);
    free(activations);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * Q4_K re-laid 8 rows at a time (lossless; as llama.cpp's CPU "repack" interleaves rows): per 8-row group and
 * 256-input block, the 8 rows' d and dmin, their 6-bit scales and minimums unpacked ([sub-block][row] bytes), and
 * per 32-input sub-block the 8 rows' nibbles in block_q4x8's order (4 chunks of 32 bytes; byte 4r + i of chunk g
 * holds row r's element 4g + i in its low nibble, 4(g + 4) + i in its high one). One activation broadcast then
 * serves 8 rows (group_dot), and a block's scales apply to 8 rows in one vector. ggml_blocks.py, repack,
 * writes it; type number SC_Q4_KX8 (streamchat's own, beside ggml's). */
#define SC_Q4_KX8 112

typedef struct {
    uint16_t d[8], dmin[8];
    uint8_t scales[8][8], mins[8][8];
    uint8_t qs[8][4][32];
} block_q4_Kx8; /* 1184 bytes: 8 rows x 256 inputs (8 x 144 = 1152 in the file) */

int sc_block_q4_Kx8_bytes(void) { return (int)sizeof(block_q4_Kx8); }

/* The 8-row kernels read block b of the group two groups on (the 16-row kernels: of the next pair) while they
 * multiply this one's, 1/8 of it per sub-block s: the loads overlap the arithmetic instead of stalling in one
 * burst (AVX2, 2 threads, EPYC: Q4_K 15-17 -> 18-25 GB/s, Q6_K 14 -> 21-25 against a 24-28 GB/s read; the
 * driver's burst of whole groups ahead before). Past a task's or tensor's end the hint reads a few lines that are
 * not used (prefetches never fault). */
#define KX8_AHEAD 2
#define PREFETCH_SPREAD1(next, s, bytes)                                                                    \
    do { /* a constant count of lines (unrolled): every line of the eighth, wherever it starts */          \
        for (int k_ = 0; k_ < (int)(((bytes) / 8 + 127) / 64); k_++)                                       \
            _mm_prefetch((next) + (size_t)(s) * ((bytes) / 8) + 64 * k_, _MM_HINT_T0);                     \
    } while (0)
#define PREFETCH_SPREAD(next0, next1, s, bytes)                                                             \
    do {                                                                                                   \
        PREFETCH_SPREAD1(next0, s, bytes);                                                                 \
        PREFETCH_SPREAD1(next1, s, bytes);                                                                 \
    } while (0)

/* Lane r (int32) of two 8-byte rows p and q: the int16 pair (p[r], q[r]), sign-extended; with p == q the
 * multiplier of vpmaddwd that scales a lane's two int16 sums by p[r]. */
static inline __m256i pairs16(const void *p, const void *q) {
    return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)p), _mm_loadl_epi64((const __m128i *)q)));
}

#ifdef SC_VNNI
/* One 8-row group of nb blocks against C activation rows (block_q8_K, `stride` blocks apart): out[c * ostride + r]. */
ALWAYS_INLINE_G void q4_Kx8_rows(const block_q4_Kx8 *w, int nb, const block_q8_K *a, size_t stride, int C,
                                 float *out, size_t ostride) {
    __m256 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q4_Kx8 *block = w + b;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->dmin));
        __m256 sums[MAX_C], mins[MAX_C];
        for (int c = 0; c < C; c++) sums[c] = _mm256_setzero_ps(), mins[c] = _mm256_setzero_ps();
        const char *next = (const char *)(w + KX8_AHEAD * (size_t)nb + b);
        for (int s = 0; s < 8; s++) {
            PREFETCH_SPREAD1(next, s, sizeof(block_q4_Kx8));
            __m256i wg[8];
            q4x8_nibbles(block->qs[s], wg);
            const __m256 scale = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)block->scales[s])));
            const __m256 minimum = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)block->mins[s])));
            for (int c = 0; c < C; c++) {
                const block_q8_K *ab = a + c * stride + b;
                const __m256 dot = _mm256_cvtepi32_ps(group_dot(wg, ab->qs + 32 * s));
                sums[c] = _mm256_fmadd_ps(dot, scale, sums[c]);
                mins[c] = _mm256_fmadd_ps(minimum, _mm256_set1_ps((float)(ab->bsums[2 * s] + ab->bsums[2 * s + 1])), mins[c]);
            }
        }
        for (int c = 0; c < C; c++) {
            const __m256 dx = _mm256_set1_ps(a[c * stride + b].d);
            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), sums[c], acc[c]);
            acc[c] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), mins[c], acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out + c * ostride, acc[c]);
}

#else
/* AVX2 (16 vector registers, no vpdpbusd): a sub-block's products stay int16 per activation row (8 pair sums of
 * <= 15 x 127, within int16), one vpmaddwd applies the 8 rows' scales and the block's sums stay int32 (exact) until
 * one conversion per block; the minimums' term is an integer dot with the activations' 16-input sums. The fp32
 * accumulation per sub-block of the VNNI kernel above spills registers here once C > 1. */
ALWAYS_INLINE_G void q4_Kx8_rows(const block_q4_Kx8 *w, int nb, const block_q8_K *a, size_t stride, int C,
                                 float *out, size_t ostride) {
    __m256 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const block_q4_Kx8 *block = w + b;
        __m256i sums[MAX_C];
        for (int c = 0; c < C; c++) sums[c] = _mm256_setzero_si256();
        const char *next = (const char *)(w + KX8_AHEAD * (size_t)nb + b);
        for (int s = 0; s < 8; s++) {
            PREFETCH_SPREAD1(next, s, sizeof(block_q4_Kx8));
            __m256i wg[8]; /* chunk j's low nibbles (inputs 4j..) and high ones (16 + 4j..): group_dot's order */
            q4x8_nibbles(block->qs[s], wg);
            const __m256i scale = pairs16(block->scales[s], block->scales[s]);
            for (int c = 0; c < C; c++) {
                const int8_t *aq = a[c * stride + b].qs + 32 * s;
                __m256i p[4];
                for (int g = 0; g < 4; g++)
                    p[g] = _mm256_add_epi16(_mm256_maddubs_epi16(wg[2 * g], _mm256_set1_epi32(*(const int32_t *)(aq + 8 * g))),
                                            _mm256_maddubs_epi16(wg[2 * g + 1], _mm256_set1_epi32(*(const int32_t *)(aq + 8 * g + 4))));
                const __m256i pairs = _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]));
                sums[c] = _mm256_add_epi32(sums[c], _mm256_madd_epi16(pairs, scale));
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->d));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->dmin));
        for (int c = 0; c < C; c++) {
            const block_q8_K *ab = a + c * stride + b;
            __m256i mins = _mm256_setzero_si256(); /* per row: sum over s of mins[s] x (bsums[2s] + bsums[2s + 1]) */
            for (int s = 0; s < 8; s++)
                mins = _mm256_add_epi32(mins, _mm256_madd_epi16(pairs16(block->mins[s], block->mins[s]),
                                                                _mm256_set1_epi32(*(const int32_t *)(ab->bsums + 2 * s))));
            const __m256 dx = _mm256_set1_ps(ab->d);
            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(sums[c]), acc[c]);
            acc[c] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(mins), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out + c * ostride, acc[c]);
}
#endif

#ifdef SC_VNNI
static inline __m128i two_halves(const void *lo, const void *hi) {
    return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)lo), _mm_loadl_epi64((const __m128i *)hi));
}

/* Two adjacent 8-row groups (16 rows) in 512-bit vectors: the arithmetic of q4_Kx8_rows per lane. */
ALWAYS_INLINE_G void q4_Kx16_rows(const block_q4_Kx8 *w0, const block_q4_Kx8 *w1, int nb, const block_q8_K *a,
                                  size_t stride, int C, float *out, size_t ostride) {
    __m512 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const block_q4_Kx8 *b0 = w0 + b, *b1 = w1 + b;
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0->d)), _mm_loadu_si128((const __m128i *)b1->d), 1));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0->dmin)), _mm_loadu_si128((const __m128i *)b1->dmin), 1));
        __m512 sums[MAX_C], mins[MAX_C];
        for (int c = 0; c < C; c++) sums[c] = _mm512_setzero_ps(), mins[c] = _mm512_setzero_ps();
        const char *next0 = (const char *)(w0 + 2 * (size_t)nb + b), *next1 = (const char *)(w1 + 2 * (size_t)nb + b);
        for (int s = 0; s < 8; s++) {
            PREFETCH_SPREAD(next0, next1, s, sizeof(block_q4_Kx8));
            __m512i wg[8];
            for (int j = 0; j < 4; j++) {
                const __m512i raw = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)b0->qs[s][j])),
                                                       _mm256_loadu_si256((const __m256i *)b1->qs[s][j]), 1);
                wg[j] = _mm512_and_si512(raw, low);
                wg[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
            const __m512 scale = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(two_halves(b0->scales[s], b1->scales[s])));
            const __m512 minimum = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(two_halves(b0->mins[s], b1->mins[s])));
            for (int c = 0; c < C; c++) {
                const block_q8_K *ab = a + c * stride + b;
                sums[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot16(wg, ab->qs + 32 * s)), scale, sums[c]);
                mins[c] = _mm512_fmadd_ps(minimum, _mm512_set1_ps((float)(ab->bsums[2 * s] + ab->bsums[2 * s + 1])), mins[c]);
            }
        }
        for (int c = 0; c < C; c++) {
            const __m512 dx = _mm512_set1_ps(a[c * stride + b].d);
            acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), sums[c], acc[c]);
            acc[c] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, dx), mins[c], acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(out + c * ostride, acc[c]);
}

static void q4_Kx16_rows_1(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q4_Kx16_rows(w, (const block_q4_Kx8 *)w + nb, nb, a, stride, 1, out, o);
}
static void q4_Kx16_rows_2(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q4_Kx16_rows(w, (const block_q4_Kx8 *)w + nb, nb, a, stride, 2, out, o);
}
static void q4_Kx16_rows_4(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q4_Kx16_rows(w, (const block_q4_Kx8 *)w + nb, nb, a, stride, MAX_C, out, o);
}
#endif

static void q4_Kx8_rows_1(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q4_Kx8_rows(w, nb, a, stride, 1, out, o);
}
static void q4_Kx8_rows_2(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q4_Kx8_rows(w, nb, a, stride, 2, out, o);
}
static void q4_Kx8_rows_4(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q4_Kx8_rows(w, nb, a, stride, MAX_C, out, o);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Q6_K re-laid 8 rows at a time (lossless, the same 1680 bytes as the file's 8 rows): per 8-row group and
 * 256-input block, the 8 rows' d, their 16 scales ([16-input part][row]), then per 32-input sub-block the 8 rows'
 * low 4 bits of each value in block_q4x8's order (4 chunks: byte 4r + i of chunk g holds row r's value 4g + i in
 * its low nibble, 4(g + 4) + i in its high one) and their top 2 bits (2 chunks: byte 4r + i of chunk k holds those
 * of chunk 2k's two values in bits 0-3, chunk 2k + 1's in bits 4-7). Values 4g + i (g < 4) are the sub-block's
 * first 16, with one scale; the others the last 16. ggml_blocks.py, repack, writes it. */
#define SC_Q6_KX8 114

typedef struct {
    uint16_t d[8];
    int8_t scales[16][8];
    uint8_t ql[8][4][32];
    uint8_t qh[8][2][32];
} block_q6_Kx8; /* 1680 bytes: 8 rows x 256 inputs */

int sc_block_q6_Kx8_bytes(void) { return (int)sizeof(block_q6_Kx8); }

#ifdef SC_VNNI
/* int32 per row lane: 4 weight chunks (values 0..63) times 16 activation bytes broadcast 4 at a time. */
static inline __m256i half_dot(const __m256i wg[4], const int8_t *aq) {
    __m256i acc = _mm256_setzero_si256();
    for (int g = 0; g < 4; g++) acc = _mm256_dpbusd_epi32(acc, wg[g], _mm256_set1_epi32(*(const int32_t *)(aq + 4 * g)));
    return acc;
}

ALWAYS_INLINE_G void q6_Kx8_rows(const block_q6_Kx8 *w, int nb, const block_q8_K *a, size_t stride, int C,
                                 float *out, size_t ostride) {
    __m256 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    for (int b = 0; b < nb; b++) {
        const block_q6_Kx8 *block = w + b;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->d));
        __m256 sums[MAX_C], offsets[MAX_C];
        for (int c = 0; c < C; c++) sums[c] = _mm256_setzero_ps(), offsets[c] = _mm256_setzero_ps();
        const char *next = (const char *)(w + KX8_AHEAD * (size_t)nb + b);
        for (int s = 0; s < 8; s++) {
            PREFETCH_SPREAD1(next, s, sizeof(block_q6_Kx8));
            __m256i first[4], last[4];
            const __m256i h0 = _mm256_loadu_si256((const __m256i *)block->qh[s][0]);
            const __m256i h1 = _mm256_loadu_si256((const __m256i *)block->qh[s][1]);
            for (int g = 0; g < 4; g++) {
                const __m256i l = _mm256_loadu_si256((const __m256i *)block->ql[s][g]);
                const __m256i h = _mm256_srli_epi16(g < 2 ? h0 : h1, 4 * (g & 1)); /* this chunk's 4 bits at 0-3 */
                first[g] = _mm256_or_si256(_mm256_and_si256(l, low), _mm256_slli_epi16(_mm256_and_si256(h, two), 4));
                last[g] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 4), low),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), two), 4));
            }
            const __m256 s0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)block->scales[2 * s])));
            const __m256 s1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)block->scales[2 * s + 1])));
            for (int c = 0; c < C; c++) {
                const block_q8_K *ab = a + c * stride + b;
                const int8_t *aq = ab->qs + 32 * s;
                sums[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_dot(first, aq)), s0, sums[c]);
                sums[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_dot(last, aq + 16)), s1, sums[c]);
                offsets[c] = _mm256_fmadd_ps(s0, _mm256_set1_ps((float)ab->bsums[2 * s]), offsets[c]);
                offsets[c] = _mm256_fmadd_ps(s1, _mm256_set1_ps((float)ab->bsums[2 * s + 1]), offsets[c]);
            }
        }
        for (int c = 0; c < C; c++) {
            const __m256 scaled = _mm256_mul_ps(d, _mm256_set1_ps(a[c * stride + b].d));
            acc[c] = _mm256_fmadd_ps(scaled, _mm256_fnmadd_ps(_mm256_set1_ps(32.0f), offsets[c], sums[c]), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out + c * ostride, acc[c]);
}

#else
/* AVX2: as q4_Kx8_rows's AVX2 kernel, int16 products of two chunks (<= 2 x 63 x 127 each) scaled by vpmaddwd and
 * summed in int32 for the block; the offset of 32 is the integer dot of the scales with the 16-input sums. */
ALWAYS_INLINE_G void q6_Kx8_rows(const block_q6_Kx8 *w, int nb, const block_q8_K *a, size_t stride, int C,
                                 float *out, size_t ostride) {
    __m256 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    for (int b = 0; b < nb; b++) {
        const block_q6_Kx8 *block = w + b;
        __m256i sums[MAX_C];
        for (int c = 0; c < C; c++) sums[c] = _mm256_setzero_si256();
        const char *next = (const char *)(w + KX8_AHEAD * (size_t)nb + b);
        for (int s = 0; s < 8; s++) {
            PREFETCH_SPREAD1(next, s, sizeof(block_q6_Kx8));
            const __m256i s0 = pairs16(block->scales[2 * s], block->scales[2 * s]);
            const __m256i s1 = pairs16(block->scales[2 * s + 1], block->scales[2 * s + 1]);
            for (int p = 0; p < 2; p++) { /* chunks 2p and 2p + 1, whose top bits are qh chunk p's */
                const __m256i h = _mm256_loadu_si256((const __m256i *)block->qh[s][p]);
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)block->ql[s][2 * p]);
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)block->ql[s][2 * p + 1]);
                const __m256i f0 = _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_slli_epi16(_mm256_and_si256(h, two), 4));
                const __m256i f1 = _mm256_or_si256(_mm256_and_si256(l1, low),
                                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), two), 4));
                const __m256i g0 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), two), 4));
                const __m256i g1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), two), 4));
                for (int c = 0; c < C; c++) {
                    const int8_t *aq = a[c * stride + b].qs + 32 * s + 8 * p;
                    const __m256i first = _mm256_add_epi16(_mm256_maddubs_epi16(f0, _mm256_set1_epi32(*(const int32_t *)aq)),
                                                           _mm256_maddubs_epi16(f1, _mm256_set1_epi32(*(const int32_t *)(aq + 4))));
                    const __m256i last = _mm256_add_epi16(_mm256_maddubs_epi16(g0, _mm256_set1_epi32(*(const int32_t *)(aq + 16))),
                                                          _mm256_maddubs_epi16(g1, _mm256_set1_epi32(*(const int32_t *)(aq + 20))));
                    sums[c] = _mm256_add_epi32(sums[c], _mm256_add_epi32(_mm256_madd_epi16(first, s0), _mm256_madd_epi16(last, s1)));
                }
            }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)block->d));
        for (int c = 0; c < C; c++) {
            const block_q8_K *ab = a + c * stride + b;
            __m256i offsets = _mm256_setzero_si256(); /* per row: sum over k of scales[k] x bsums[k] */
            for (int k = 0; k < 8; k++)
                offsets = _mm256_add_epi32(offsets, _mm256_madd_epi16(pairs16(block->scales[2 * k], block->scales[2 * k + 1]),
                                                                      _mm256_set1_epi32(*(const int32_t *)(ab->bsums + 2 * k))));
            const __m256i total = _mm256_sub_epi32(sums[c], _mm256_slli_epi32(offsets, 5));
            acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ab->d)), _mm256_cvtepi32_ps(total), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out + c * ostride, acc[c]);
}
#endif

#ifdef SC_VNNI
/* int32 per row lane of two 8-row groups: 4 weight chunks (values 0..63) times 16 activation bytes, 4 at a time. */
static inline __m512i half_dot16(const __m512i wg[4], const int8_t *aq) {
    __m512i acc = _mm512_setzero_si512();
    for (int g = 0; g < 4; g++) acc = _mm512_dpbusd_epi32(acc, wg[g], _mm512_set1_epi32(*(const int32_t *)(aq + 4 * g)));
    return acc;
}

static inline __m512i two_chunks(const void *lo, const void *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}

/* Two adjacent 8-row groups (16 rows) in 512-bit vectors: the arithmetic of q6_Kx8_rows per lane. */
ALWAYS_INLINE_G void q6_Kx16_rows(const block_q6_Kx8 *w0, const block_q6_Kx8 *w1, int nb, const block_q8_K *a,
                                  size_t stride, int C, float *out, size_t ostride) {
    __m512 acc[MAX_C];
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x03);
    for (int b = 0; b < nb; b++) {
        const block_q6_Kx8 *b0 = w0 + b, *b1 = w1 + b;
        const __m512 d = _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b0->d)), _mm_loadu_si128((const __m128i *)b1->d), 1));
        __m512 sums[MAX_C], offsets[MAX_C];
        for (int c = 0; c < C; c++) sums[c] = _mm512_setzero_ps(), offsets[c] = _mm512_setzero_ps();
        const char *next0 = (const char *)(w0 + 2 * (size_t)nb + b), *next1 = (const char *)(w1 + 2 * (size_t)nb + b);
        for (int s = 0; s < 8; s++) {
            PREFETCH_SPREAD(next0, next1, s, sizeof(block_q6_Kx8));
            __m512i first[4], last[4];
            const __m512i h0 = two_chunks(b0->qh[s][0], b1->qh[s][0]), h1 = two_chunks(b0->qh[s][1], b1->qh[s][1]);
            for (int g = 0; g < 4; g++) {
                const __m512i l = two_chunks(b0->ql[s][g], b1->ql[s][g]);
                const __m512i h = _mm512_srli_epi16(g < 2 ? h0 : h1, 4 * (g & 1));
                first[g] = _mm512_or_si512(_mm512_and_si512(l, low), _mm512_slli_epi16(_mm512_and_si512(h, two), 4));
                last[g] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low),
                                          _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h, 2), two), 4));
            }
            const __m512 s0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(two_halves(b0->scales[2 * s], b1->scales[2 * s])));
            const __m512 s1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(two_halves(b0->scales[2 * s + 1], b1->scales[2 * s + 1])));
            for (int c = 0; c < C; c++) {
                const block_q8_K *ab = a + c * stride + b;
                const int8_t *aq = ab->qs + 32 * s;
                sums[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(half_dot16(first, aq)), s0, sums[c]);
                sums[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(half_dot16(last, aq + 16)), s1, sums[c]);
                offsets[c] = _mm512_fmadd_ps(s0, _mm512_set1_ps((float)ab->bsums[2 * s]), offsets[c]);
                offsets[c] = _mm512_fmadd_ps(s1, _mm512_set1_ps((float)ab->bsums[2 * s + 1]), offsets[c]);
            }
        }
        for (int c = 0; c < C; c++) {
            const __m512 scaled = _mm512_mul_ps(d, _mm512_set1_ps(a[c * stride + b].d));
            acc[c] = _mm512_fmadd_ps(scaled, _mm512_fnmadd_ps(_mm512_set1_ps(32.0f), offsets[c], sums[c]), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(out + c * ostride, acc[c]);
}

static void q6_Kx16_rows_1(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q6_Kx16_rows(w, (const block_q6_Kx8 *)w + nb, nb, a, stride, 1, out, o);
}
static void q6_Kx16_rows_2(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q6_Kx16_rows(w, (const block_q6_Kx8 *)w + nb, nb, a, stride, 2, out, o);
}
static void q6_Kx16_rows_4(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q6_Kx16_rows(w, (const block_q6_Kx8 *)w + nb, nb, a, stride, MAX_C, out, o);
}
#endif

static void q6_Kx8_rows_1(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q6_Kx8_rows(w, nb, a, stride, 1, out, o);
}
static void q6_Kx8_rows_2(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q6_Kx8_rows(w, nb, a, stride, 2, out, o);
}
static void q6_Kx8_rows_4(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t o) {
    q6_Kx8_rows(w, nb, a, stride, MAX_C, out, o);
}

/* ---------------------------------------------------------------------------------------------------------------
 * The 8-row layouts' matmul: one driver over each type's group functions. */
typedef void (*group_fn)(const void *w, int nb, const block_q8_K *a, size_t stride, float *out, size_t ostride);

typedef struct {
    group_fn one, two, four;                /* one 8-row group against 1, 2 and MAX_C activation rows */
    group_fn pair_one, pair_two, pair_four; /* two adjacent groups (16 rows) at once, or NULL */
    size_t block_bytes;           /* one 8-row block of 256 inputs */
    int even;                     /* tasks of whole 16-row pairs */
} kx8_type;

static const kx8_type KX8_Q4_K = {
    q4_Kx8_rows_1, q4_Kx8_rows_2, q4_Kx8_rows_4,
#ifdef SC_VNNI
    q4_Kx16_rows_1, q4_Kx16_rows_2, q4_Kx16_rows_4, sizeof(block_q4_Kx8), 1,
#else
    NULL, NULL, NULL, sizeof(block_q4_Kx8), 1,
#endif
};
static const kx8_type KX8_Q6_K = {
    q6_Kx8_rows_1, q6_Kx8_rows_2, q6_Kx8_rows_4,
#ifdef SC_VNNI
    q6_Kx16_rows_1, q6_Kx16_rows_2, q6_Kx16_rows_4, sizeof(block_q6_Kx8), 1,
#else
    NULL, NULL, NULL, sizeof(block_q6_Kx8), 0,
#endif
};

typedef struct {
    const kx8_type *type;
    const uint8_t *w;
    size_t group_bytes;
    const block_q8_K *a;
    float *out;
    int M, nb, groups, per_task, ldo;
} kx8_job;

static void kx8_task(void *context, int t) {
    const kx8_job *job = context;
    const kx8_type *type = job->type;
    const int g0 = t * job->per_task, g1 = g0 + job->per_task < job->groups ? g0 + job->per_task : job->groups;
    const size_t nb = (size_t)job->nb; /* the group kernels prefetch as they go */
    for (int m0 = 0; m0 < job->M; m0 += GGML_M_TILE) {
        const int m1 = m0 + GGML_M_TILE < job->M ? m0 + GGML_M_TILE : job->M;
        for (int g = g0; g < g1; g++) {
            const uint8_t *w = job->w + (size_t)g * job->group_bytes;
            const int pair = type->pair_one && g + 1 < g1;
            const group_fn one = pair ? type->pair_one : type->one, four = pair ? type->pair_four : type->four;
            const group_fn two = pair ? type->pair_two : type->two;
            int m = m0;
            for (; m + MAX_C <= m1; m += MAX_C)
                four(w, job->nb, job->a + m * nb, nb, job->out + (size_t)m * job->ldo + 8 * g, job->ldo);
            for (; m + 2 <= m1; m += 2)
                two(w, job->nb, job->a + m * nb, nb, job->out + (size_t)m * job->ldo + 8 * g, job->ldo);
            for (; m < m1; m++)
                one(w, job->nb, job->a + m * nb, nb, job->out + (size_t)m * job->ldo + 8 * g, job->ldo);
            g += pair;
        }
    }
}

/* As sc_ggml_matmul for a SC_Q4_KX8 or SC_Q6_KX8 tensor: N (a multiple of 8) rows as N / 8 groups of K / 256
 * block_q4_Kx8 or block_q6_Kx8. */
static int kx8_matmul(int type, const float *x, int M, int K, const void *w, int N, float *out, int ldo) {
    const kx8_type *kind = type == SC_Q4_KX8 ? &KX8_Q4_K : type == SC_Q6_KX8 ? &KX8_Q6_K : NULL;
    if (!kind || M <= 0 || N <= 0 || N % 8 || K % QK_K || ldo < N) return -1;
    const int nb = K / QK_K, groups = N / 8;
    block_q8_K *q = quantize_rows_k(x, M, K);
    if (!q) return -1;
    int per_task = (groups + 8 * thread_count - 1) / (8 * thread_count);
    per_task = per_task < 2 ? 2 : per_task;
    if (kind->even) per_task += per_task & 1;
    const kx8_job job = {kind, w, kind->block_bytes * nb, q, out, M, nb, groups, per_task, ldo};
    run_tasks((groups + per_task - 1) / per_task, kx8_task, (void *)&job);
    free(q);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The 8-row layouts written from the file's rows (rows a multiple of 8, nb blocks a row): byte for byte what
 * ggml_blocks.py's numpy re-layout writes (tested equal), at memory speed, split over the pool by row group. */
typedef struct {
    const uint8_t *src;
    uint8_t *dst;
    int nb, six;
} repack_job;

static void repack_task(void *context, int g) {
    const repack_job *job = context;
    const size_t nb = (size_t)job->nb;
    for (size_t b = 0; b < nb; b++) {
        if (!job->six) {
            block_q4_Kx8 *out = (block_q4_Kx8 *)job->dst + (size_t)g * nb + b;
            memset(out, 0, sizeof *out);
            for (int r = 0; r < 8; r++) {
                const block_q4_K *x = (const block_q4_K *)job->src + ((size_t)g * 8 + r) * nb + b;
                uint8_t sm[16];
                scales_mins_k4(x->scales, sm);
                out->d[r] = x->d, out->dmin[r] = x->dmin;
                for (int s = 0; s < 8; s++) {
                    out->scales[s][r] = sm[s], out->mins[s][r] = sm[8 + s];
                    for (int e = 0; e < 32; e++) {
                        const uint8_t byte = x->qs[32 * (s / 2) + e];
                        const int value = s & 1 ? byte >> 4 : byte & 0xF, group = e / 4;
                        out->qs[s][group % 4][4 * r + e % 4] |= (uint8_t)(value << (group >= 4 ? 4 : 0));
                    }
                }
            }
        } else {
            block_q6_Kx8 *out = (block_q6_Kx8 *)job->dst + (size_t)g * nb + b;
            memset(out, 0, sizeof *out);
            for (int r = 0; r < 8; r++) {
                const block_q6_K *x = (const block_q6_K *)job->src + ((size_t)g * 8 + r) * nb + b;
                uint8_t u[QK_K];
                for (int n = 0; n < 2; n++)
                    for (int l = 0; l < 32; l++) {
                        const uint8_t *ql = x->ql + 64 * n, *qh = x->qh + 32 * n;
                        u[128 * n + l] = (uint8_t)((ql[l] & 0xF) | ((qh[l] & 3) << 4));
                        u[128 * n + l + 32] = (uint8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                        u[128 * n + l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                        u[128 * n + l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
                    }
                out->d[r] = x->d;
                for (int k = 0; k < 16; k++) out->scales[k][r] = x->scales[k];
                for (int s = 0; s < 8; s++)
                    for (int e = 0; e < 32; e++) {
                        const int value = u[32 * s + e], group = e / 4, chunk = group % 4, last = group >= 4;
                        out->ql[s][chunk][4 * r + e % 4] |= (uint8_t)((value & 0xF) << (last ? 4 : 0));
                        out->qh[s][chunk / 2][4 * r + e % 4] |= (uint8_t)((value >> 4) << (4 * (chunk % 2) + 2 * last));
                    }
            }
        }
    }
}

/* A Q4_K (type 12) or Q6_K (14) tensor of `rows` rows (a multiple of 8) and nb blocks a row, re-laid into `dst`
 * (rows / 8 * nb block_q4_Kx8 or block_q6_Kx8). Returns 0, or -1 for another type or row count. */
int sc_ggml_repack(int type, const void *src, int rows, int nb, void *dst) {
    if ((type != SC_Q4_K && type != SC_Q6_K) || rows <= 0 || rows % 8 || nb <= 0) return -1;
    repack_job job = {src, dst, nb, type == SC_Q6_K};
    run_tasks(rows / 8, repack_task, &job);
    park_workers();
    return 0;
}
