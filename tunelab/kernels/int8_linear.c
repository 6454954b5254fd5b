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
#include <omp.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "this kernel needs AVX-512 with VNNI"
#endif

#include "bfloat16.h"
#include "swiglu.h"

#define CHUNK 64 /* bytes of K per vpdpbusd */
/* How far ahead of each weight row's reads to prefetch: the hardware prefetcher alone reaches ~18 GB/s
 * over Qwen2.5 0.5B's layers on 2 cores; 12 KiB ahead (tried 256 B..32 KiB) reaches ~24. Prefetching
 * past the end of the weight is harmless (a prefetch never faults). */
#define PREFETCH_AHEAD 12288
#define GEMV_MAX_ROWS 7 /* from 8 rows on, the VNNI dot products cost more than reading the weights */

/* One activation row -> its hi and lo int8 rows (zero-padded to `padded`), their sums, and s.
 * Sixteen values at a time; every step is one correctly rounded IEEE operation, as in torch. */
static void split_row(const uint16_t *x, int64_t k, int64_t padded, int8_t *hi, int8_t *lo,
                      int32_t *hi_sum, int32_t *lo_sum, float *scale) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        __mmask16 mask = k - i >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(load_bf16(x + i, mask)));
    }
    float s = _mm512_reduce_max_ps(amax) / 127.0f;
    if (!(s >= 1e-30f)) s = 1e-30f;
    const __m512 vs = _mm512_set1_ps(s), step = _mm512_set1_ps((1.0f / s) * 254.0f); /* torch's 254 / s */
    const __m512 bound = _mm512_set1_ps(127.0f), neg_bound = _mm512_set1_ps(-127.0f);
    __m512i hs = _mm512_setzero_si512(), ls = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 16) {
        __mmask16 mask = k - i >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
        __m512 v = load_bf16(x + i, mask);
        __m512 h = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_mul_ps(h, vs)), step),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        l = _mm512_min_ps(_mm512_max_ps(l, neg_bound), bound);
        __m512i hi32 = _mm512_maskz_cvtps_epi32(mask, h), lo32 = _mm512_maskz_cvtps_epi32(mask, l);
        _mm512_mask_cvtepi32_storeu_epi8(hi + i, mask, hi32);
        _mm512_mask_cvtepi32_storeu_epi8(lo + i, mask, lo32);
        hs = _mm512_add_epi32(hs, hi32);
        ls = _mm512_add_epi32(ls, lo32);
    }
    memset(hi + k, 0, padded - k);
    memset(lo + k, 0, padded - k);
    *hi_sum = _mm512_reduce_add_epi32(hs);
    *lo_sum = _mm512_reduce_add_epi32(ls);
    *scale = s;
}

/* Where the results go: y [m, n] bfloat16, or float32 (an LM head's logits: the sums before that rounding). */
typedef struct {
    void *data;
    int64_t n;
    int is_float;
} output;

/* y[row, column] from the exact sums of its hi and lo rows: the float steps of int8_gemm_two_level, in its order. */
static inline void combine(int32_t hi_sum, int32_t lo_sum, float s, uint16_t row_scale, const uint16_t *bias,
                           output y, int64_t row, int64_t column) {
    float v = ((float)hi_sum + (float)lo_sum / 254.0f) * s * bf16_to_float(row_scale);
    if (y.is_float) {
        ((float *)y.data)[row * y.n + column] = bias == NULL ? v : v + bf16_to_float(*bias);
        return;
    }
    uint16_t rounded = float_to_bf16(v);
    /* torch adds a bias to the bfloat16 output: one more rounding */
    ((uint16_t *)y.data)[row * y.n + column] =
        bias == NULL ? rounded : float_to_bf16(bf16_to_float(rounded) + bf16_to_float(*bias));
}

/* The m activation rows -> act (hi rows 0..m-1, lo rows m..2m-1, each `padded` long), their sums and s. */
static void split_rows(const uint16_t *x, int64_t m, int64_t k, int64_t padded, int8_t *act, int32_t *act_sums,
                       float *s) {
#pragma omp parallel for schedule(static) if (m > GEMV_MAX_ROWS)
    for (int64_t r = 0; r < m; r++)
        split_row(x + r * k, k, padded, act + r * padded, act + (m + r) * padded, &act_sums[r], &act_sums[m + r], &s[r]);
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
        const int8_t *w, int64_t k, int64_t n0, int64_t n1, const int8_t *act, int64_t padded,
        const int32_t *act_sums, const float *s, const uint16_t *scales, const uint16_t *bias, output y, int NB,
        int M) {
    enum { MAX_R = 14 };
    int32_t sums[4 * MAX_R];
    int64_t j = n0;
    for (; j + NB <= n1; j += NB) {
        dot_block(w + j * k, k, act, padded, NB, 2 * M, sums);
        for (int b = 0; b < NB; b++)
            for (int m = 0; m < M; m++)
                combine(sums[b * 2 * M + m] - 128 * act_sums[m], sums[b * 2 * M + M + m] - 128 * act_sums[M + m],
                        s[m], scales[j + b], bias == NULL ? NULL : bias + j + b, y, m, j + b);
    }
    for (; j < n1; j++) { /* the tail: one weight row at a time */
        dot_block(w + j * k, k, act, padded, 1, 2 * M, sums);
        for (int m = 0; m < M; m++)
            combine(sums[m] - 128 * act_sums[m], sums[M + m] - 128 * act_sums[M + m], s[m], scales[j],
                    bias == NULL ? NULL : bias + j, y, m, j);
    }
}

#define ROWS_CASE(M_, NB_) \
    case M_: rows_range(w, k, n0, n1, act, padded, act_sums, s, scales, bias, y, NB_, M_); break;

/* The few-rows path: one pass over the weights, VNNI dot products for every row at once. */
static int gemv(const uint16_t *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const uint16_t *scales,
                const uint16_t *bias, output y) {
    int64_t padded = (k + CHUNK - 1) / CHUNK * CHUNK;
    /* rows 0..m-1 are the hi rows, m..2m-1 the lo rows */
    int8_t *act = aligned_alloc(64, (size_t)(2 * m * padded));
    if (act == NULL) return -1;
    int32_t act_sums[2 * GEMV_MAX_ROWS];
    float s[GEMV_MAX_ROWS];
    split_rows(x, m, k, padded, act, act_sums, s);

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

static inline void combine_16v(__m512i hi, __m512i lo, float s, const uint16_t *scales, const uint16_t *bias,
                               output y, int64_t row, int64_t c0, int64_t count) {
    __mmask16 mask = count >= 16 ? 0xffff : (__mmask16)((1u << count) - 1);
    __m512 l = _mm512_div_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(254.0f));
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(hi), l), _mm512_set1_ps(s)),
                             load_bf16(scales, mask));
    if (y.is_float) {
        if (bias != NULL) v = _mm512_add_ps(v, load_bf16(bias, mask));
        _mm512_mask_storeu_ps((float *)y.data + row * y.n + c0, mask, v);
        return;
    }
    __m512i rounded = round_to_bf16(v);
    if (bias != NULL) rounded = round_to_bf16(_mm512_add_ps(bf16_bits_to_float(rounded), load_bf16(bias, mask)));
    _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)y.data + row * y.n + c0, mask, rounded);
}

/* `combine` for up to 16 columns at once: y[row, c0 + j] from sums hi[j], lo[j] and scales[j], j < count. */
static inline void combine_16(const int32_t *hi, const int32_t *lo, float s, const uint16_t *scales,
                              const uint16_t *bias, output y, int64_t row, int64_t c0, int64_t count) {
    combine_16v(_mm512_loadu_si512((const void *)hi), _mm512_loadu_si512((const void *)lo), s, scales, bias, y, row,
                c0, count);
}

/* The packed layout: for each strip of 16 weight rows and each 64 columns, 1 KiB holding 16 rows of
 * (16 weight rows x 4 bytes): byte [kk][c][j] = w[16 strip + c][64 block + 4 kk + j], which is the AMX
 * B-tile layout. Both paths then read it as stored: AMX loads tiles directly, and the few-rows path
 * gets 16 output columns per vpdpbusd (with the activations' four bytes broadcast), no reductions. */

/* One 16-row strip [16 x 64] of a plain weight (fewer rows at the end: zeros) -> that layout. */
static inline void strip_block(const int8_t *w, int64_t k, int64_t rows, int64_t c, int8_t *out) {

    __mmask64 mask = k - c >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - c)) - 1);
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) {
        r[i] = i < rows ? _mm512_maskz_loadu_epi8(mask, w + i * k + c) : _mm512_setzero_si512();
        _mm_prefetch((const char *)(w + (i + 16) * k + c), _MM_HINT_T0); /* the next strip */
    }
    /* Transpose 16 x 16 four-byte groups: out row g = group g of weight rows 0..15. */
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(out + i * 64), r[i]);
}

/* Sums of R int8 activation rows (`act`, row stride k) against one packed strip, 16 columns per lane. */
static inline __attribute__((always_inline)) void packed_strip(const int8_t *strip, int64_t blocks, const int8_t *act,
                                                               int64_t k, int R, __m512i *acc) {
    const __m512i flip = _mm512_set1_epi8((char)0x80); /* w + 128, unsigned: see the file's head */
#pragma GCC unroll 14
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t b = 0; b < blocks; b++)
        for (int kk = 0; kk < 16; kk++) {
            const int8_t *row = strip + b * 1024 + kk * 64;
            _mm_prefetch((const char *)(row + PREFETCH_AHEAD), _MM_HINT_T0);
            __m512i wb = _mm512_xor_si512(_mm512_load_si512((const void *)row), flip);
#pragma GCC unroll 14
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, act + r * k + b * 64 + 4 * kk, 4);
                acc[r] = _mm512_dpbusd_epi32(acc[r], wb, _mm512_set1_epi32(four));
            }
        }
}

static inline __attribute__((always_inline)) void packed_strips(
        const int8_t *w, int64_t blocks, int64_t k, int64_t s0, int64_t s1, const int8_t *act,
        const int32_t *act_sums, const float *s, const uint16_t *scales, const uint16_t *bias, output y, int M) {
    for (int64_t strip = s0; strip < s1; strip++) {
        __m512i acc[14];
        packed_strip(w + strip * blocks * 1024, blocks, act, k, 2 * M, acc);
        int64_t c0 = strip * 16;
        for (int m = 0; m < M; m++) {
            __m512i hi = _mm512_sub_epi32(acc[m], _mm512_set1_epi32(128 * act_sums[m]));
            __m512i lo = _mm512_sub_epi32(acc[M + m], _mm512_set1_epi32(128 * act_sums[M + m]));
            combine_16v(hi, lo, s[m], scales + c0, bias == NULL ? NULL : bias + c0, y, m, c0, 16);
        }
    }
}

#define PACKED_CASE(M_) \
    case M_: packed_strips(w, blocks, k, s0, s1, act, act_sums, s, scales, bias, y, M_); break;

/* The few-rows path on packed weights (n % 16 == 0, k % 64 == 0). */
static int gemv_packed(const uint16_t *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const uint16_t *scales,
                       const uint16_t *bias, output y) {
    int8_t *act = aligned_alloc(64, (size_t)(2 * m * k));
    if (act == NULL) return -1;
    int32_t act_sums[2 * GEMV_MAX_ROWS];
    float s[GEMV_MAX_ROWS];
    split_rows(x, m, k, k, act, act_sums, s);
    int64_t blocks = k / 64, strips = n / 16;
#pragma omp parallel
    {
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t s0 = strips * t / threads, s1 = strips * (t + 1) / threads; /* contiguous: one stream each */
        switch (m) {
            PACKED_CASE(1)
            PACKED_CASE(2)
            PACKED_CASE(3)
            PACKED_CASE(4)
            PACKED_CASE(5)
            PACKED_CASE(6)
            PACKED_CASE(7)
        }
    }
    free(act);
    return 0;
}

/* A plain int8 weight [n, k] -> the packed layout (n % 16 == 0, k % 64 == 0), in `out`. */
void tunelab_int8_pack(const int8_t *w, int64_t n, int64_t k, int8_t *out) {
    int64_t blocks = k / 64;
#pragma omp parallel for schedule(static)
    for (int64_t strip = 0; strip < n / 16; strip++)
        for (int64_t b = 0; b < blocks; b++)
            strip_block(w + strip * 16 * k, k, 16, b * 64, out + (strip * blocks + b) * 1024);
}

#ifdef __AMX_INT8__
#include "amx.h"

/* The many-rows path: AMX tiles. A tile holds 16 rows of 64 bytes; `tdpbssd` adds A [16 x 64] int8
 * times B [64 x 16] int8 into C [16 x 16] int32, with B stored as 16 rows of (16 columns x 4 bytes).
 * For each strip of 16 weight rows, the strip is first rearranged into that layout (a 16 x 16
 * transpose of 4-byte groups per 64 columns), then every 16-row tile of activations runs against it:
 * the weights are read once whatever the number of rows. */

#define AMX_MAX_ROWS 128 /* rows per pass: 256 int8 activation rows, 1.2 MiB at K = 4864 */

static int gemm_amx(const uint16_t *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const uint16_t *scales,
                    const uint16_t *bias, int packed, output y) {
    if (!amx_permitted()) return -2;
    int64_t padded = (k + 63) / 64 * 64, blocks = padded / 64;
    int64_t act_rows = (2 * m + 15) / 16 * 16, tiles = act_rows / 16; /* hi rows, lo rows, zero rows */
    int8_t *act = aligned_alloc(64, (size_t)(act_rows * padded));
    int32_t *act_sums = malloc(sizeof(int32_t) * (size_t)(2 * m));
    float *s = malloc(sizeof(float) * (size_t)m);
    if (act == NULL || act_sums == NULL || s == NULL) {
        free(act);
        free(act_sums);
        free(s);
        return -1;
    }
    memset(act + 2 * m * padded, 0, (size_t)((act_rows - 2 * m) * padded));
    split_rows(x, m, k, padded, act, act_sums, s);

    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        tile_config config = {.palette = 1};
        for (int t = 0; t < 8; t++) config.rows[t] = 16, config.bytes_per_row[t] = 64;
        int8_t *strip = aligned_alloc(64, (size_t)(blocks * 2048)); /* plain weights: two strips rearranged here */
        int32_t *sums = aligned_alloc(64, sizeof(int32_t) * (size_t)(2 * act_rows * 16));
        if (strip == NULL || sums == NULL) failed = 1;
        else _tile_loadconfig(&config);
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += 32) {
            if (strip == NULL || sums == NULL) continue;
            /* Two strips of 16 weight rows (the second maybe short or empty): four independent
             * accumulations per activation-tile pair keep the tile unit busy. */
            int64_t rows[2] = {n - n0 < 16 ? n - n0 : 16, n - n0 - 16 < 0 ? 0 : n - n0 - 16 < 16 ? n - n0 - 16 : 16};
            const int8_t *strip_a = strip, *strip_b = strip + blocks * 1024;
            if (packed) { /* both strips as stored; a missing second strip reads the first (its sums unused) */
                strip_a = w + n0 / 16 * blocks * 1024;
                strip_b = rows[1] > 0 ? strip_a + blocks * 1024 : strip_a;
            } else {
                for (int64_t b = 0; b < blocks; b++) {
                    strip_block(w + n0 * k, k, rows[0], b * 64, strip + b * 1024);
                    strip_block(w + (n0 + 16) * k, k, rows[1], b * 64, strip + (blocks + b) * 1024);
                }
            }
            int32_t *sums_a = sums, *sums_b = sums + act_rows * 16;
            for (int64_t t0 = 0; t0 < tiles; t0 += 2) {
                int two = tiles - t0 > 1;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                /* tile numbers must be literal: 0, 1 accumulate strip a, 2, 3 strip b; 4, 7 activations; 5, 6 weights */
                for (int64_t b = 0; b < blocks; b++) {
                    const int8_t *a = act + t0 * 16 * padded + b * 64;
                    _tile_loadd(5, strip_a + b * 1024, 64);
                    _tile_loadd(6, strip_b + b * 1024, 64);
                    _tile_loadd(4, a, padded);
                    _tile_dpbssd(0, 4, 5);
                    _tile_dpbssd(2, 4, 6);
                    if (two) {
                        _tile_loadd(7, a + 16 * padded, padded);
                        _tile_dpbssd(1, 7, 5);
                        _tile_dpbssd(3, 7, 6);
                    }
                }
                _tile_stored(0, sums_a + t0 * 256, 64);
                _tile_stored(2, sums_b + t0 * 256, 64);
                if (two) {
                    _tile_stored(1, sums_a + (t0 + 1) * 256, 64);
                    _tile_stored(3, sums_b + (t0 + 1) * 256, 64);
                }
            }
            for (int half = 0; half < 2; half++) {
                const int32_t *out = half ? sums_b : sums_a;
                int64_t c0 = n0 + 16 * half;
                for (int64_t r = 0; r < m && rows[half] > 0; r++)
                    combine_16(out + r * 16, out + (m + r) * 16, s[r], scales + c0, bias == NULL ? NULL : bias + c0,
                               y, r, c0, rows[half]);
            }
        }
        if (strip != NULL && sums != NULL) _tile_release();
        free(strip);
        free(sums);
    }
    free(act);
    free(act_sums);
    free(s);
    return failed ? -1 : 0;
}
#endif

/* 1 when any number of rows runs here (AMX is there and Linux granted it), else 0. */
int tunelab_int8_linear_any_rows(void) {
#ifdef __AMX_INT8__
    return amx_permitted();
#else
    return 0;
#endif
}

/* x [m, k] bfloat16 (or, with `swiglu`, [m, 2k] gate and up halves whose silu(gate) * up is the input),
 * w [n, k] int8 (plain, or `packed` by tunelab_int8_pack), scales [n] bfloat16, bias [n] bfloat16 or NULL
 * -> y [m, n] bfloat16, or with `float_out` float32 (the float32 values before that rounding), for any m >= 1.
 * Returns 0; -1 when a buffer cannot be allocated; -2 when m > GEMV_MAX_ROWS and AMX is not there. */
int tunelab_int8_linear(const uint16_t *x, int64_t m, int64_t k, const int8_t *w, int64_t n,
                        const uint16_t *scales, const uint16_t *bias, int swiglu, int packed, int float_out, void *y) {
    if (packed && (n % 16 != 0 || k % 64 != 0)) return -1;
    if (m < 1) return -1;
#ifndef __AMX_INT8__
    if (m > GEMV_MAX_ROWS) return -2;
#endif
    uint16_t *product = NULL;
    if (swiglu) {
        if ((product = malloc(sizeof(uint16_t) * (size_t)(m * k))) == NULL) return -1;
        swiglu_rows(x, m, k, m > GEMV_MAX_ROWS, product);
        x = product;
    }
    int status = 0;
    output out = {.data = y, .n = n, .is_float = float_out};
    if (m <= GEMV_MAX_ROWS) status = (packed ? gemv_packed : gemv)(x, m, k, w, n, scales, bias, out);
#ifdef __AMX_INT8__
    /* Chunks of rows whose int8 activations stay in L2 while every weight strip passes over them. */
    for (int64_t r = 0; m > GEMV_MAX_ROWS && r < m && status == 0; r += AMX_MAX_ROWS) {
        output rows = out; /* from row r on */
        rows.data = float_out ? (void *)((float *)y + r * n) : (void *)((uint16_t *)y + r * n);
        status = gemm_amx(x + r * k, m - r < AMX_MAX_ROWS ? m - r : AMX_MAX_ROWS, k, w, n, scales, bias, packed, rows);
    }
#endif
    free(product);
    return status;
}
