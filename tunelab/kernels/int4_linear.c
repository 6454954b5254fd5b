/* 4-bit weights in groups of 32 x bfloat16 activations, with AVX-512 VNNI, for any number of rows.
 *
 * A weight is w = code * scale + minimum, code in 0..15, one (scale, minimum) pair of fp16 values per
 * output row and group of 32 inputs: GGML's Q4_1 block, held exactly. Each activation row is quantized
 * per group of 32 too, as llama.cpp does for its 4-bit dot products: q = round(x / a), a = max|x| / 127.
 * Then for one output and one group
 *
 *     sum_k w_k x_k = a * (scale * sum_k code_k q_k + minimum * sum_k q_k),
 *
 * the first sum exact in int32 (`vpdpbusd`: unsigned codes times signed q), the rest in float32. A row's
 * result depends only on that row, so it is the same bits alone or in any batch.
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

/* Rows [r0, r0 + R) x the strips [s0, s1) -> y, with the bias added as torch adds it to a bfloat16 output. */
static inline __attribute__((always_inline)) void rows_x_strips(
        const uint8_t *w, int64_t groups, int64_t k, int64_t n, int64_t s0, int64_t s1, const int8_t *q,
        const float *a, const float *a_sum, int64_t r0, const uint16_t *bias, uint16_t *y, int R) {
    for (int64_t strip = s0; strip < s1; strip++) {
        __m512 out[ROW_BLOCK];
        strip_rows(w + strip * groups * BLOCK_BYTES, groups, k, q + 2 * r0 * k, a + r0 * groups, a_sum + r0 * groups,
                   R, out);
        for (int r = 0; r < R; r++) {
            __m512i rounded = round_to_bf16(out[r]);
            if (bias != NULL)
                rounded = round_to_bf16(_mm512_add_ps(bf16_bits_to_float(rounded), load_bf16(bias + 16 * strip, 0xffff)));
            _mm512_mask_cvtepi32_storeu_epi16(y + (r0 + r) * n + 16 * strip, 0xffff, rounded);
        }
    }
}

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
    int8_t *q = malloc((size_t)(2 * m * k)); /* per row: hi, then lo */
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
