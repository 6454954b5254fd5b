/* 4-bit weights in groups of 32 x bfloat16 activations: AVX-512 VNNI for a few rows, AMX tiles from 16.
 *
 * A weight is w = code * scale + minimum, code in 0..15, one (scale, minimum) pair of fp16 values per
 * output row and group of 32 inputs: GGML's Q4_1 block, held exactly. Each activation row is written,
 * per group of 32, as two int8 rows: hi = round(x / a) with a = max|x| / 127, and lo = the remainder in
 * steps of a / 16 (|lo| <= 8), so x = a * (hi + lo / 16) to within max|x| / 4064, finer than bfloat16's
 * own rounding. Since 16 * code still fits a byte, one exact int32 sum takes both:
 *
 *     S = sum_k (16 code_k) hi_k + code_k lo_k = 16 * sum_k code_k (hi_k + lo_k / 16),
 *     sum_k w_k x_k = (a / 16) * scale * S + minimum * a * (sum hi + sum lo / 16),
 *
 * (`vpdpbusd` / `tdpbsud`: unsigned bytes times signed bytes), the rest in float32. A row's result
 * depends only on that row, so it is the same bits alone or in any batch, on either path.
 *
 * Layout (`Int4Linear`, quantized.py): for each strip of 16 output rows and each group of 32 inputs, a
 * block of 320 bytes: four 64-byte vectors of codes, then the 16 scales, then the 16 minimums (fp16).
 * Vector i holds, in the 4-byte lane of output row c, byte j: code[c][8i + j] in its low nibble and
 * code[c][8i + 4 + j] in its high nibble. One vector thus feeds two `vpdpbusd` of 16 outputs x 4 inputs,
 * with no reductions, and a thread reads its strips as one sequential stream.
 *
 * Built by build.py (-O3 -march=native -fopenmp -ffp-contract=off); threads come from torch's OpenMP runtime.
 */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "this kernel needs AVX-512 with VNNI"
#endif

#include "bfloat16.h"
#include "swiglu.h"

#define GROUP 32
#define BLOCK_BYTES 320     /* one strip's group: 256 bytes of codes, 32 of scales, 32 of minimums */
#define ROW_BLOCK 4         /* activation rows per pass over a strip: their accumulators stay in registers */
#define PREFETCH_AHEAD 8192 /* bytes ahead of the stream, as in int8_linear.c */

/* One activation row -> per group 64 bytes, hi [32] then lo [32], and per group a / 16 [g] and
 * a * (sum(hi) + sum(lo) / 16) [g]. */
static void quantize_row(const uint16_t *x, int64_t k, int8_t *q, float *a16, float *a_sum) {
    const __m512 bound = _mm512_set1_ps(8.0f), neg_bound = _mm512_set1_ps(-8.0f);
    for (int64_t g = 0; g < k / GROUP; g++) {
        __m512 v[2] = {load_bf16(x + g * GROUP, 0xffff), load_bf16(x + g * GROUP + 16, 0xffff)};
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        float step = amax / 127.0f;
        __m512 inverse = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f), vstep = _mm512_set1_ps(step);
        __m512i sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512 high = _mm512_roundscale_ps(_mm512_mul_ps(v[h], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512 rest = _mm512_mul_ps(_mm512_sub_ps(v[h], _mm512_mul_ps(high, vstep)), _mm512_mul_ps(inverse, _mm512_set1_ps(16.0f)));
            rest = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                               neg_bound), bound);
            __m512i high32 = _mm512_cvtps_epi32(high), rest32 = _mm512_cvtps_epi32(rest);
            _mm512_mask_cvtepi32_storeu_epi8(q + 64 * g + 16 * h, 0xffff, high32);
            _mm512_mask_cvtepi32_storeu_epi8(q + 64 * g + 32 + 16 * h, 0xffff, rest32);
            sum = _mm512_add_epi32(sum, high32);
            lo_sum = _mm512_add_epi32(lo_sum, rest32);
        }
        a16[g] = step / 16.0f;
        a_sum[g] = step * ((float)_mm512_reduce_add_epi32(sum) + (float)_mm512_reduce_add_epi32(lo_sum) / 16.0f);
    }
}

/* One group's exact sum S [16 outputs] of a row -> out += (a / 16) * scale * S + minimum * a_sum. */
static inline __m512 combine(__m512i sums, __m512 scale, __m512 minimum, float a16, float a_sum, __m512 out) {
    __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(a16));
    out = _mm512_fmadd_ps(scale, dot, out);
    return _mm512_fmadd_ps(minimum, _mm512_set1_ps(a_sum), out);
}

/* R activation rows (q rows of 2k bytes; a16 and a_sum rows of stride `groups`) against one strip:
 * out[r] = the 16 outputs of row r, in float32. R is a compile-time constant at every call. */
static inline __attribute__((always_inline)) void strip_rows(const uint8_t *strip, int64_t groups, int64_t k,
                                                             const int8_t *q, const float *a16, const float *a_sum,
                                                             int R, __m512 *out) {
    const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8((char)0xf0);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *block = strip + g * BLOCK_BYTES;
        for (int line = 0; line < BLOCK_BYTES; line += 64)
            _mm_prefetch((const char *)(block + PREFETCH_AHEAD + line), _MM_HINT_T0);
        __m512i sums[ROW_BLOCK], lo_sums[ROW_BLOCK]; /* two chains of vpdpbusd, added (exactly) at the end */
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) sums[r] = lo_sums[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512i codes = _mm512_loadu_si512((const void *)(block + 64 * i));
            /* the codes of inputs 8i.. and 8i + 4.., as they are and times 16 */
            __m512i first = _mm512_and_si512(codes, low), second = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
            __m512i first16 = _mm512_and_si512(_mm512_slli_epi16(codes, 4), high), second16 = _mm512_and_si512(codes, high);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                int32_t hi[2], lo[2];
                memcpy(hi, q + 2 * r * k + 64 * g + 8 * i, 8);
                memcpy(lo, q + 2 * r * k + 64 * g + 32 + 8 * i, 8);
                sums[r] = _mm512_dpbusd_epi32(sums[r], first16, _mm512_set1_epi32(hi[0]));
                sums[r] = _mm512_dpbusd_epi32(sums[r], second16, _mm512_set1_epi32(hi[1]));
                lo_sums[r] = _mm512_dpbusd_epi32(lo_sums[r], first, _mm512_set1_epi32(lo[0]));
                lo_sums[r] = _mm512_dpbusd_epi32(lo_sums[r], second, _mm512_set1_epi32(lo[1]));
            }
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 256)));
        __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 288)));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            out[r] = combine(_mm512_add_epi32(sums[r], lo_sums[r]), scale, minimum, a16[r * groups + g],
                             a_sum[r * groups + g], out[r]);
    }
}

/* A row's 16 outputs of one strip -> bfloat16, with the bias added as torch adds it to a bfloat16 output. */
static inline void store_outputs(__m512 out, const uint16_t *bias, int64_t strip, uint16_t *y_row) {
    __m512i rounded = round_to_bf16(out);
    if (bias != NULL)
        rounded = round_to_bf16(_mm512_add_ps(bf16_bits_to_float(rounded), load_bf16(bias + 16 * strip, 0xffff)));
    _mm512_mask_cvtepi32_storeu_epi16(y_row + 16 * strip, 0xffff, rounded);
}

/* Rows [r0, r0 + R) x one strip -> y, with the bias added as torch adds it to a bfloat16 output. */
static inline __attribute__((always_inline)) void rows_x_strip(
        const uint8_t *w, int64_t groups, int64_t k, int64_t n, int64_t strip, const int8_t *q, const float *a16,
        const float *a_sum, int64_t r0, const uint16_t *bias, uint16_t *y, int R) {
    __m512 out[ROW_BLOCK];
    strip_rows(w + strip * groups * BLOCK_BYTES, groups, k, q + 2 * r0 * k, a16 + r0 * groups, a_sum + r0 * groups,
               R, out);
    for (int r = 0; r < R; r++) store_outputs(out[r], bias, strip, y + (r0 + r) * n);
}

#ifdef __AMX_INT8__
#include "amx.h"

/* The many-rows path: AMX tiles, with the same arithmetic. For each group, `tdpbsud` adds A [16 rows x 64]
 * (a row's hi then lo bytes, as stored) times B [64 x 16] into C [16 x 16] int32: S for 16 rows and 16
 * outputs at once, combined in float32 as `strip_rows` combines it, so a row gets the same bits on
 * either path. B is a strip's group with one code a byte: tile rows 0..7 hold 16 * code (against hi),
 * rows 8..15 the code (against lo); row 2i (+ 8) has vector i's low nibbles, row 2i + 1 its high ones. */

#define AMX_MIN_ROWS 16 /* from here on AMX beats the VNNI path */

/* One strip [groups x 320] -> groups x 1 KiB of B tiles. */
static void unpack_strip(const uint8_t *strip, int64_t groups, uint8_t *out) {
    const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8((char)0xf0);
    for (int64_t g = 0; g < groups; g++)
        for (int i = 0; i < 4; i++) {
            __m512i codes = _mm512_loadu_si512((const void *)(strip + g * BLOCK_BYTES + 64 * i));
            uint8_t *tile = out + g * 1024 + 128 * i;
            _mm512_store_si512((void *)tile, _mm512_and_si512(_mm512_slli_epi16(codes, 4), high));
            _mm512_store_si512((void *)(tile + 64), _mm512_and_si512(codes, high));
            _mm512_store_si512((void *)(tile + 512), _mm512_and_si512(codes, low));
            _mm512_store_si512((void *)(tile + 576), _mm512_and_si512(_mm512_srli_epi16(codes, 4), low));
        }
}

/* C [16 x 16] of one group -> out[r] for the first `rows` rows. */
static inline void combine_tile(const int32_t *sums, const uint8_t *block, const float *a16, const float *a_sum,
                                int64_t groups, int64_t r0, int64_t g, int rows, __m512 *out) {
    __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 256)));
    __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 288)));
    for (int r = 0; r < rows; r++)
        out[r] = combine(_mm512_load_si512((const void *)(sums + 16 * r)), scale, minimum, a16[(r0 + r) * groups + g],
                         a_sum[(r0 + r) * groups + g], out[r]);
}

/* q: padded rows of 2k bytes (the rows past m zero), a16 and a_sum: m rows; as the VNNI path otherwise. */
static int gemm_amx(const int8_t *q, int64_t m, int64_t k, const float *a16, const float *a_sum, const uint8_t *w,
                    int64_t n, const uint16_t *bias, uint16_t *y) {
    int64_t groups = k / GROUP, strips = n / 16;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        tile_config config = {.palette = 1};
        for (int t = 0; t < 6; t++) config.rows[t] = 16, config.bytes_per_row[t] = 64; /* C: 0, 1; A: 2, 3; B: 4, 5 */
        uint8_t *codes = aligned_alloc(64, (size_t)(groups * 1024));
        int32_t *sums = aligned_alloc(64, sizeof(int32_t) * 512);
        if (codes == NULL || sums == NULL) failed = 1;
        else _tile_loadconfig(&config);
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t first = strips * t / threads, last = strips * (t + 1) / threads;
        for (int64_t strip = first; strip < last && !failed; strip++) {
            const uint8_t *blocks = w + strip * groups * BLOCK_BYTES;
            unpack_strip(blocks, groups, codes);
            for (int64_t r0 = 0; r0 < m; r0 += 16) {
                int rows = m - r0 < 16 ? (int)(m - r0) : 16;
                __m512 out[16];
                for (int r = 0; r < 16; r++) out[r] = _mm512_setzero_ps();
                /* Groups in pairs on two C tiles: the tile unit works on one while the vector units
                 * combine the other's sums. */
                for (int64_t g = 0; g < groups; g += 2) {
                    int two = g + 1 < groups;
                    _tile_zero(0);
                    _tile_loadd(2, q + 2 * r0 * k + 64 * g, 2 * k);
                    _tile_loadd(4, codes + g * 1024, 64);
                    _tile_dpbsud(0, 2, 4);
                    _tile_stored(0, sums, 64);
                    if (two) {
                        _tile_zero(1);
                        _tile_loadd(3, q + 2 * r0 * k + 64 * (g + 1), 2 * k);
                        _tile_loadd(5, codes + (g + 1) * 1024, 64);
                        _tile_dpbsud(1, 3, 5);
                    }
                    combine_tile(sums, blocks + g * BLOCK_BYTES, a16, a_sum, groups, r0, g, rows, out);
                    if (two) {
                        _tile_stored(1, sums + 256, 64);
                        combine_tile(sums + 256, blocks + (g + 1) * BLOCK_BYTES, a16, a_sum, groups, r0, g + 1, rows, out);
                    }
                }
                for (int r = 0; r < rows; r++) store_outputs(out[r], bias, strip, y + (r0 + r) * n);
            }
        }
        if (codes != NULL && sums != NULL) _tile_release();
        free(codes);
        free(sums);
    }
    return failed ? -1 : 0;
}
#endif

#define ROWS_CASE(R_) \
    case R_: rows_x_strip(w, groups, k, n, strip, q, a16, a_sum, r0, bias, y, R_); break;

/* x [m, k] bfloat16 (or, with `swiglu`, [m, 2k] gate and up halves whose silu(gate) * up is the input),
 * w in the layout above for n outputs (n % 16 == 0, k % 32 == 0), bias [n] bfloat16 or NULL
 * -> y [m, n] bfloat16. Returns 0, or -1 for a shape it does not take or a buffer it cannot allocate. */
int tunelab_int4_linear(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const uint16_t *bias,
                        int swiglu, uint16_t *y) {
    if (m < 1 || n % 16 != 0 || k % GROUP != 0) return -1;
    int64_t groups = k / GROUP, strips = n / 16;
    uint16_t *product = swiglu ? malloc(sizeof(uint16_t) * (size_t)(m * k)) : NULL;
    int64_t padded = (m + 15) / 16 * 16; /* AMX reads whole tiles of 16 rows: the rows past m are zeros */
    int8_t *q = malloc((size_t)(2 * padded * k)); /* per row and group: 32 hi bytes, then 32 lo bytes */
    float *a16 = malloc(sizeof(float) * (size_t)(2 * m * groups)), *a_sum = a16 == NULL ? NULL : a16 + m * groups;
    if (q == NULL || a16 == NULL || (swiglu && product == NULL)) {
        free(product);
        free(q);
        free(a16);
        return -1;
    }
    if (swiglu) {
        swiglu_rows(x, m, k, m > ROW_BLOCK, product);
        x = product;
    }
#pragma omp parallel for schedule(static) if (m > ROW_BLOCK)
    for (int64_t r = 0; r < m; r++) quantize_row(x + r * k, k, q + 2 * r * k, a16 + r * groups, a_sum + r * groups);

    memset(q + 2 * m * k, 0, (size_t)(2 * (padded - m) * k));
#ifdef __AMX_INT8__
    if (m >= AMX_MIN_ROWS && amx_permitted()) {
        int status = gemm_amx(q, m, k, a16, a_sum, w, n, bias, y);
        free(product);
        free(q);
        free(a16);
        return status;
    }
#endif
#pragma omp parallel
    {
        /* Contiguous strips per thread: one sequential stream each, and each strip stays in L1 while
         * every block of rows passes over it. */
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t first = strips * t / threads, last = strips * (t + 1) / threads;
        for (int64_t strip = first; strip < last; strip++) {
            for (int64_t r0 = 0; r0 < m; r0 += ROW_BLOCK) {
                switch (m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK) {
                    ROWS_CASE(1)
                    ROWS_CASE(2)
                    ROWS_CASE(3)
                    ROWS_CASE(4)
                }
            }
        }
    }
    free(product);
    free(q);
    free(a16);
    return 0;
}
