/* int8 weights x bfloat16 activations for a few rows (decode), with AVX-512 VNNI.
 *
 * y[m, n] = scale[n] * sum_k w[n, k] * x[m, k], the same arithmetic as `int8_gemm_two_level` in
 * quantized.py, bit for bit: each activation row is written as two int8 rows, hi = round(x / s) and
 * lo = round((x - hi * s) * (254 / s)) with s = max|x| / 127, both dotted with the int8 weight rows in
 * exact int32, then combined in float32 in the same order. One pass over the weights serves every
 * activation row, so for a handful of rows the cost is reading the weights once at memory speed.
 *
 * `vpdpbusd` multiplies unsigned by signed bytes: the weights are read as w ^ 0x80 = w + 128 (unsigned)
 * and the 128 * sum(x) this adds is subtracted from each sum.
 *
 * Built by build.py (-O3 -march=native -fopenmp -ffp-contract=off); threads come from torch's OpenMP runtime.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "this kernel needs AVX-512 with VNNI"
#endif

#define CHUNK 64 /* bytes of K per vpdpbusd */
/* How far ahead of each weight row's reads to prefetch: the hardware prefetcher alone reaches ~18 GB/s
 * over Qwen2.5 0.5B's layers on 2 cores; 12 KiB ahead (tried 256 B..32 KiB) reaches ~24. Prefetching
 * past the end of the weight is harmless (a prefetch never faults). */
#define PREFETCH_AHEAD 12288

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) return 0x7fc0;
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* One activation row -> its hi and lo int8 rows (zero-padded to `padded`), their sums, and s. */
static void split_row(const uint16_t *x, int64_t k, int64_t padded, int8_t *hi, int8_t *lo,
                      int32_t *hi_sum, int32_t *lo_sum, float *scale) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(bf16_to_float(x[i])));
    float s = amax / 127.0f;
    if (!(s >= 1e-30f)) s = 1e-30f;
    float step = (1.0f / s) * 254.0f; /* torch's 254 / s is reciprocal(s) * 254 */
    int32_t hs = 0, ls = 0;
    for (int64_t i = 0; i < k; i++) {
        float v = bf16_to_float(x[i]);
        float h = nearbyintf(v / s);
        float scaled = h * s;
        float l = nearbyintf((v - scaled) * step);
        l = fminf(fmaxf(l, -127.0f), 127.0f);
        hi[i] = (int8_t)h;
        lo[i] = (int8_t)l;
        hs += (int32_t)h;
        ls += (int32_t)l;
    }
    memset(hi + k, 0, padded - k);
    memset(lo + k, 0, padded - k);
    *hi_sum = hs;
    *lo_sum = ls;
    *scale = s;
}

/* Dot NB weight rows (from `w`, row stride k) with R int8 activation rows (row stride `padded`):
 * sums[b * R + r]. NB and R are compile-time constants at every call, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_block(const int8_t *w, int64_t k, const int8_t *act,
                                                            int64_t padded, int NB, int R, int32_t *sums) {
    __m512i acc[4 * 14]; /* fixed size and fully unrolled loops: the used part lives in registers */
#pragma GCC unroll 56
    for (int i = 0; i < NB * R; i++) acc[i] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t full = k / CHUNK * CHUNK;
    for (int64_t c = 0; c < padded; c += CHUNK) {
        __mmask64 mask = c < full ? ~(__mmask64)0 : (((__mmask64)1 << (k - c)) - 1);
        __m512i a[14];
#pragma GCC unroll 14
        for (int r = 0; r < R; r++) a[r] = _mm512_load_si512((const void *)(act + r * padded + c));
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) {
            /* masked-off lanes become 0 ^ 0x80 = 128, times a zero activation pad: no contribution */
            _mm_prefetch((const char *)(w + b * k + c + PREFETCH_AHEAD), _MM_HINT_T0);
            __m512i wb = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + b * k + c), flip);
#pragma GCC unroll 14
            for (int r = 0; r < R; r++) acc[b * R + r] = _mm512_dpbusd_epi32(acc[b * R + r], wb, a[r]);
        }
    }
#pragma GCC unroll 56
    for (int i = 0; i < NB * R; i++) sums[i] = _mm512_reduce_add_epi32(acc[i]);
}

/* Weight rows [n0, n1) for all M activation rows; NB rows of the weight per pass. */
static inline __attribute__((always_inline)) void rows_range(
        const int8_t *w, int64_t k, int64_t n, int64_t n0, int64_t n1, const int8_t *act, int64_t padded,
        const int32_t *act_sums, const float *s, const uint16_t *scales, uint16_t *y, int NB, int M) {
    enum { MAX_R = 14 };
    int32_t sums[4 * MAX_R];
    int64_t j = n0;
    for (; j + NB <= n1; j += NB) {
        dot_block(w + j * k, k, act, padded, NB, 2 * M, sums);
        for (int b = 0; b < NB; b++)
            for (int m = 0; m < M; m++) {
                float hi = (float)(sums[b * 2 * M + m] - 128 * act_sums[m]);
                float lo = (float)(sums[b * 2 * M + M + m] - 128 * act_sums[M + m]);
                float v = (hi + lo / 254.0f) * s[m];
                y[m * n + j + b] = float_to_bf16(v * bf16_to_float(scales[j + b]));
            }
    }
    for (; j < n1; j++) { /* the tail: one weight row at a time */
        dot_block(w + j * k, k, act, padded, 1, 2 * M, sums);
        for (int m = 0; m < M; m++) {
            float hi = (float)(sums[m] - 128 * act_sums[m]);
            float lo = (float)(sums[M + m] - 128 * act_sums[M + m]);
            float v = (hi + lo / 254.0f) * s[m];
            y[m * n + j] = float_to_bf16(v * bf16_to_float(scales[j]));
        }
    }
}

#define ROWS_CASE(M_, NB_) \
    case M_: rows_range(w, k, n, n0, n1, act, padded, act_sums, s, scales, y, NB_, M_); break;

/* x [m, k] bfloat16, w [n, k] int8, scales [n] bfloat16 -> y [m, n] bfloat16. 1 <= m <= 7.
 * Returns 0, or -1 for a row count it does not take. */
int tunelab_int8_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *w, int64_t n,
                        const uint16_t *scales, uint16_t *y) {
    if (m < 1 || m > 7) return -1;
    int64_t padded = (k + CHUNK - 1) / CHUNK * CHUNK;
    /* rows 0..m-1 are the hi rows, m..2m-1 the lo rows */
    int8_t *act = aligned_alloc(64, (size_t)(2 * m * padded));
    if (act == NULL) return -1;
    int32_t act_sums[14];
    float s[7];
    for (int64_t r = 0; r < m; r++)
        split_row(x + r * k, k, padded, act + r * padded, act + (m + r) * padded, &act_sums[r], &act_sums[m + r], &s[r]);

    const int64_t block = 16; /* weight rows per unit of work: whole cache lines of y for every thread */
    int64_t units = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        int64_t n0 = u * block, n1 = n0 + block < n ? n0 + block : n;
        switch (m) {
            ROWS_CASE(1, 4)
            ROWS_CASE(2, 4)
            ROWS_CASE(3, 2)
            ROWS_CASE(4, 2)
            ROWS_CASE(5, 1)
            ROWS_CASE(6, 1)
            ROWS_CASE(7, 1)
        }
    }
    free(act);
    return 0;
}
