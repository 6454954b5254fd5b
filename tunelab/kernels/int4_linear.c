/* 4-bit weights in groups of 32 x bfloat16 activations: AVX-512 VNNI for a few rows, AMX tiles from 16.
 *
 * A weight is w = code * scale + minimum, code in 0..15, one (scale, minimum) pair of fp16 values per
 * output row and group of 32 inputs: GGML's Q4_1 block, held exactly. Each activation row is written,
 * per group of 32, as two int8 rows as int8_linear.c does per row: hi = round(x / a) with
 * a = max|x| / 127, and lo = the remainder in steps of a / 254, so x = a * (hi + lo / 254) to within
 * max|x| / 64516, finer than bfloat16 itself. Then for one output and one group
 *
 *     sum_k w_k x_k = a * (scale * (sum code * hi + sum code * lo / 254) + minimum * (sum hi + sum lo / 254)),
 *
 * the sums over codes exact in int32 (`vpdpbusd`: unsigned codes times signed activations), the rest in
 * float32. A row's result depends only on that row, so it is the same bits alone or in any batch, on
 * either path.
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

/* One activation row -> hi and lo [k] int8, and per group a [g] and a * (sum(hi) + sum(lo) / 254) [g]:
 * x = a * (hi + lo / 254) with a = max|x| / 127 over the group, to within max|x| / 64516. */
static void quantize_row(const uint16_t *x, int64_t k, int8_t *hi, int8_t *lo, float *a, float *a_sum) {
    const __m512 bound = _mm512_set1_ps(127.0f), neg_bound = _mm512_set1_ps(-127.0f);
    for (int64_t g = 0; g < k / GROUP; g++) {
        __m512 v[2] = {load_bf16(x + g * GROUP, 0xffff), load_bf16(x + g * GROUP + 16, 0xffff)};
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        float step = amax / 127.0f;
        __m512 inverse = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f), vstep = _mm512_set1_ps(step);
        __m512i sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512 high = _mm512_roundscale_ps(_mm512_mul_ps(v[h], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512 rest = _mm512_mul_ps(_mm512_sub_ps(v[h], _mm512_mul_ps(high, vstep)), _mm512_mul_ps(inverse, _mm512_set1_ps(254.0f)));
            rest = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                               neg_bound), bound);
            __m512i high32 = _mm512_cvtps_epi32(high), rest32 = _mm512_cvtps_epi32(rest);
            _mm512_mask_cvtepi32_storeu_epi8(hi + g * GROUP + 16 * h, 0xffff, high32);
            _mm512_mask_cvtepi32_storeu_epi8(lo + g * GROUP + 16 * h, 0xffff, rest32);
            sum = _mm512_add_epi32(sum, high32);
            lo_sum = _mm512_add_epi32(lo_sum, rest32);
        }
        a[g] = step;
        a_sum[g] = step * ((float)_mm512_reduce_add_epi32(sum) + (float)_mm512_reduce_add_epi32(lo_sum) / 254.0f);
    }
}

/* R activation rows (q rows of stride k; a and a_sum rows of stride `groups`) against one strip:
 * out[r] = the 16 outputs of row r, in float32. R is a compile-time constant at every call. */
static inline __attribute__((always_inline)) void strip_rows(const uint8_t *strip, int64_t groups, int64_t k,
                                                             const int8_t *q, const float *a, const float *a_sum,
                                                             int R, __m512 *out) {
    const __m512i low = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *block = strip + g * BLOCK_BYTES;
        _mm_prefetch((const char *)(block + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(block + PREFETCH_AHEAD + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(block + PREFETCH_AHEAD + 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(block + PREFETCH_AHEAD + 192), _MM_HINT_T0);
        _mm_prefetch((const char *)(block + PREFETCH_AHEAD + 256), _MM_HINT_T0);
        __m512i sums[ROW_BLOCK], lo_sums[ROW_BLOCK];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) sums[r] = lo_sums[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m512i codes = _mm512_loadu_si512((const void *)(block + 64 * i));
            __m512i first = _mm512_and_si512(codes, low), second = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                int32_t four[2], lo_four[2];
                memcpy(four, q + 2 * r * k + g * GROUP + 8 * i, 8);
                memcpy(lo_four, q + (2 * r + 1) * k + g * GROUP + 8 * i, 8);
                sums[r] = _mm512_dpbusd_epi32(sums[r], first, _mm512_set1_epi32(four[0]));
                sums[r] = _mm512_dpbusd_epi32(sums[r], second, _mm512_set1_epi32(four[1]));
                lo_sums[r] = _mm512_dpbusd_epi32(lo_sums[r], first, _mm512_set1_epi32(lo_four[0]));
                lo_sums[r] = _mm512_dpbusd_epi32(lo_sums[r], second, _mm512_set1_epi32(lo_four[1]));
            }
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 256)));
        __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 288)));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m512 both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_sums[r]), _mm512_set1_ps(1.0f / 254.0f),
                                          _mm512_cvtepi32_ps(sums[r]));
            __m512 dot = _mm512_mul_ps(both, _mm512_set1_ps(a[r * groups + g]));
            out[r] = _mm512_fmadd_ps(scale, dot, out[r]);
            out[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(a_sum[r * groups + g]), out[r]);
        }
    }
}

/* A row's 16 outputs of one strip -> bfloat16, with the bias added as torch adds it to a bfloat16 output. */
static inline void store_outputs(__m512 out, const uint16_t *bias, int64_t strip, uint16_t *y_row) {
    __m512i rounded = round_to_bf16(out);
    if (bias != NULL)
        rounded = round_to_bf16(_mm512_add_ps(bf16_bits_to_float(rounded), load_bf16(bias + 16 * strip, 0xffff)));
    _mm512_mask_cvtepi32_storeu_epi16(y_row + 16 * strip, 0xffff, rounded);
}

/* Rows [r0, r0 + R) x the strips [s0, s1) -> y, with the bias added as torch adds it to a bfloat16 output. */
static inline __attribute__((always_inline)) void rows_x_strips(
        const uint8_t *w, int64_t groups, int64_t k, int64_t n, int64_t s0, int64_t s1, const int8_t *q,
        const float *a, const float *a_sum, int64_t r0, const uint16_t *bias, uint16_t *y, int R) {
    for (int64_t strip = s0; strip < s1; strip++) {
        __m512 out[ROW_BLOCK];
        strip_rows(w + strip * groups * BLOCK_BYTES, groups, k, q + 2 * r0 * k, a + r0 * groups, a_sum + r0 * groups,
                   R, out);
        for (int r = 0; r < R; r++) store_outputs(out[r], bias, strip, y + (r0 + r) * n);
    }
}

#ifdef __AMX_INT8__
#include "amx.h"

/* The many-rows path: AMX tiles, with the same arithmetic. For each group of 32 inputs, `tdpbsud` adds
 * A [16 rows x 32] signed activations times B [32 x 16] unsigned codes into C [16 x 16] int32, for the
 * hi and for the lo rows; the sums are then combined in float32 exactly as `strip_rows` combines them,
 * so a row gets the same bits on either path. B is a strip's group with one code a byte: tile row 2i
 * is vector i's low nibbles, row 2i + 1 its high nibbles (inputs 4 * row .. 4 * row + 3 per lane). */

#define AMX_MIN_ROWS 16 /* from here on AMX beats the VNNI path */

/* One strip [groups x 320] -> its codes a byte each, groups x 512 bytes in B-tile order. */
static void unpack_strip(const uint8_t *strip, int64_t groups, uint8_t *out) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int64_t g = 0; g < groups; g++)
        for (int i = 0; i < 4; i++) {
            __m512i codes = _mm512_loadu_si512((const void *)(strip + g * BLOCK_BYTES + 64 * i));
            _mm512_store_si512((void *)(out + g * 512 + 128 * i), _mm512_and_si512(codes, low));
            _mm512_store_si512((void *)(out + g * 512 + 128 * i + 64),
                               _mm512_and_si512(_mm512_srli_epi16(codes, 4), low));
        }
}

/* One group's hi and lo sums [16 rows x 16] (lo at +256) -> out[r] for r < rows, as strip_rows combines them. */
static inline void combine_group(const int32_t *sums, const uint8_t *block, const float *a, const float *a_sum,
                                 int64_t groups, int64_t r0, int64_t g, int rows, __m512 *out) {
    __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 256)));
    __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 288)));
    for (int r = 0; r < rows; r++) {
        __m512 both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(sums + 256 + 16 * r))),
                                      _mm512_set1_ps(1.0f / 254.0f),
                                      _mm512_cvtepi32_ps(_mm512_load_si512((const void *)(sums + 16 * r))));
        __m512 dot = _mm512_mul_ps(both, _mm512_set1_ps(a[(r0 + r) * groups + g]));
        out[r] = _mm512_fmadd_ps(scale, dot, out[r]);
        out[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(a_sum[(r0 + r) * groups + g]), out[r]);
    }
}

/* q: 2 * padded rows (hi, lo interleaved, rows m.. zero), a and a_sum: m rows; as the VNNI path otherwise. */
static int gemm_amx(const int8_t *q, int64_t m, int64_t k, const float *a, const float *a_sum, const uint8_t *w,
                    int64_t n, const uint16_t *bias, uint16_t *y) {
    int64_t groups = k / GROUP, strips = n / 16;
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        tile_config config = {.palette = 1};
        config.rows[0] = config.rows[1] = 16, config.bytes_per_row[0] = config.bytes_per_row[1] = 64; /* C: hi, lo */
        config.rows[2] = config.rows[3] = 16, config.bytes_per_row[2] = config.bytes_per_row[3] = 32; /* A: hi, lo */
        config.rows[4] = 8, config.bytes_per_row[4] = 64;                                              /* B */
        config.rows[5] = config.rows[6] = 16, config.bytes_per_row[5] = config.bytes_per_row[6] = 64; /* C, odd groups */
        config.rows[7] = 8, config.bytes_per_row[7] = 64;                                              /* B, odd groups */
        uint8_t *codes = aligned_alloc(64, (size_t)(groups * 512));
        int32_t *sums = aligned_alloc(64, sizeof(int32_t) * 1024);
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
                /* Groups in pairs on two sets of C tiles: the tile unit works on one group while
                 * the vector units combine the other's sums. */
                for (int64_t g = 0; g < groups; g += 2) {
                    int two = g + 1 < groups;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_loadd(2, q + 2 * r0 * k + g * GROUP, 2 * k);
                    _tile_loadd(3, q + (2 * r0 + 1) * k + g * GROUP, 2 * k);
                    _tile_loadd(4, codes + g * 512, 64);
                    _tile_dpbsud(0, 2, 4);
                    _tile_dpbsud(1, 3, 4);
                    _tile_stored(0, sums, 64);
                    _tile_stored(1, sums + 256, 64);
                    if (two) {
                        _tile_zero(5);
                        _tile_zero(6);
                        _tile_loadd(2, q + 2 * r0 * k + (g + 1) * GROUP, 2 * k);
                        _tile_loadd(3, q + (2 * r0 + 1) * k + (g + 1) * GROUP, 2 * k);
                        _tile_loadd(7, codes + (g + 1) * 512, 64);
                        _tile_dpbsud(5, 2, 7);
                        _tile_dpbsud(6, 3, 7);
                    }
                    combine_group(sums, blocks + g * BLOCK_BYTES, a, a_sum, groups, r0, g, rows, out);
                    if (two) {
                        _tile_stored(5, sums + 512, 64);
                        _tile_stored(6, sums + 768, 64);
                        combine_group(sums + 512, blocks + (g + 1) * BLOCK_BYTES, a, a_sum, groups, r0, g + 1, rows, out);
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
    case R_: rows_x_strips(w, groups, k, n, s0, s1, q, a, a_sum, r0, bias, y, R_); break;

/* x [m, k] bfloat16 (or, with `swiglu`, [m, 2k] gate and up halves whose silu(gate) * up is the input),
 * w in the layout above for n outputs (n % 16 == 0, k % 32 == 0), bias [n] bfloat16 or NULL
 * -> y [m, n] bfloat16. Returns 0, or -1 for a shape it does not take or a buffer it cannot allocate. */
int tunelab_int4_linear(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const uint16_t *bias,
                        int swiglu, uint16_t *y) {
    if (m < 1 || n % 16 != 0 || k % GROUP != 0) return -1;
    int64_t groups = k / GROUP, strips = n / 16;
    uint16_t *product = swiglu ? malloc(sizeof(uint16_t) * (size_t)(m * k)) : NULL;
    int64_t padded = (m + 15) / 16 * 16; /* AMX reads whole tiles of 16 rows: the rows past m are zeros */
    int8_t *q = malloc((size_t)(2 * padded * k)); /* per row: hi, then lo */
    float *a = malloc(sizeof(float) * (size_t)(2 * m * groups)), *a_sum = a == NULL ? NULL : a + m * groups;
    if (q == NULL || a == NULL || (swiglu && product == NULL)) {
        free(product);
        free(q);
        free(a);
        return -1;
    }
    if (swiglu) {
        swiglu_rows(x, m, k, m > ROW_BLOCK, product);
        x = product;
    }
#pragma omp parallel for schedule(static) if (m > ROW_BLOCK)
    for (int64_t r = 0; r < m; r++) quantize_row(x + r * k, k, q + 2 * r * k, q + (2 * r + 1) * k, a + r * groups, a_sum + r * groups);

    memset(q + 2 * m * k, 0, (size_t)(2 * (padded - m) * k));
#ifdef __AMX_INT8__
    if (m >= AMX_MIN_ROWS && amx_permitted()) {
        int status = gemm_amx(q, m, k, a, a_sum, w, n, bias, y);
        free(product);
        free(q);
        free(a);
        return status;
    }
#endif
#pragma omp parallel
    {
        /* Contiguous strips per thread: one sequential stream each, and each strip stays in L1 while
         * every block of rows passes over it. */
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t first = strips * t / threads, last = strips * (t + 1) / threads;
        for (int64_t s0 = first; s0 < last; s0++) {
            int64_t s1 = s0 + 1;
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
    free(a);
    return 0;
}
