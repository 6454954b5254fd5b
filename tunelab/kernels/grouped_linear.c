/* Weights in groups of 32 with 4-, 5- or 8-bit codes x bfloat16 activations: AVX-512 VNNI for a few
 * rows, AMX tiles from 16.
 *
 * A weight is w = code * scale + minimum, code in 0 .. 2^bits - 1, one (scale, minimum) pair of fp16
 * values per output row and group of 32 inputs. That holds GGML's 32-value blocks exactly: Q4_1 and
 * Q5_1 as they are, Q4_0, Q5_0 and Q8_0 (w = d * (q - offset)) with minimum = -offset * d. Each
 * activation row is written, per group of 32, as two int8 rows: hi = round(x / a) with
 * a = max|x| / 127, and lo = the remainder in steps of a / L (|lo| <= L / 2), so x = a * (hi + lo / L)
 * to within max|x| / (254 L), finer than bfloat16's own rounding. For 4 and 5 bits L = 16 and 8, so
 * L * code still fits a byte and one exact int32 sum takes both levels:
 *
 *     S = sum_k (L code_k) hi_k + code_k lo_k = L * sum_k code_k (hi_k + lo_k / L);
 *
 * for 8 bits L = 16 and S = 16 * S_hi + S_lo is joined from two sums (exact in int32). Either way
 *
 *     sum_k w_k x_k = (a / L) * scale * S + minimum * a * (sum hi + sum lo / L),
 *
 * (`vpdpbusd` / `tdpbsud`: unsigned bytes times signed bytes), the rest in float32. A row's result
 * depends only on that row, so it is the same bits alone or in any batch, on either path.
 *
 * Layout (`GroupedLinear`, quantized.py): for each strip of 16 output rows and each group of 32 inputs,
 * a block of codes, then the 16 scales, then the 16 minimums (fp16):
 *  - 4 bits (320 bytes): four 64-byte vectors of codes. Vector i holds, in the 4-byte lane of output
 *    row c, byte j: code[c][8i + j] in its low nibble and code[c][8i + 4 + j] in its high nibble.
 *  - 5 bits (384 bytes): the same four vectors of the codes' low 4 bits, then eight 64-bit masks of
 *    their fifth bits: mask 2i for vector i's low nibbles, 2i + 1 for its high ones, bit 4c + j.
 *  - 8 bits (576 bytes): eight vectors, vector i holding code[c][4i + j] in byte j of lane c.
 * One vector thus feeds `vpdpbusd` for 16 outputs x 4 inputs with no reductions, and a thread reads
 * its strips as one sequential stream.
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
#define ROW_BLOCK 4         /* activation rows per pass over a strip: their accumulators stay in registers */
/* Bytes ahead of the stream to prefetch, as in int8_linear.c. Measured per layer in a decode step (8, 16
 * and 24 KiB): 16 KiB reads the Qwen2.5 0.5B head ~9% faster than 8 and SmolLM2's 4-bit layers ~5%. */
#define PREFETCH_AHEAD 16384

/* A strip's group in bytes: its codes, then 32 bytes of scales and 32 of minimums. */
static inline int64_t block_bytes(int bits) { return bits == 4 ? 320 : bits == 5 ? 384 : 576; }

/* L: the steps of a / L in which lo is counted. */
static inline int levels(int bits) { return bits == 5 ? 8 : 16; }

/* One activation row -> per group 64 bytes, hi [32] then lo [32], and per group a / L [g] and
 * a * (sum(hi) + sum(lo) / L) [g]. */
static void quantize_row(const uint16_t *x, int64_t k, int bits, int8_t *q, float *a_l, float *a_sum) {
    const float l = (float)levels(bits);
    const __m512 bound = _mm512_set1_ps(l / 2), neg_bound = _mm512_set1_ps(-l / 2);
    for (int64_t g = 0; g < k / GROUP; g++) {
        __m512 v[2] = {load_bf16(x + g * GROUP, 0xffff), load_bf16(x + g * GROUP + 16, 0xffff)};
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        float step = amax / 127.0f;
        __m512 inverse = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f), vstep = _mm512_set1_ps(step);
        __m512i sum = _mm512_setzero_si512(), lo_sum = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            __m512 high = _mm512_roundscale_ps(_mm512_mul_ps(v[h], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512 rest = _mm512_mul_ps(_mm512_sub_ps(v[h], _mm512_mul_ps(high, vstep)), _mm512_mul_ps(inverse, _mm512_set1_ps(l)));
            rest = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(rest, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                               neg_bound), bound);
            __m512i high32 = _mm512_cvtps_epi32(high), rest32 = _mm512_cvtps_epi32(rest);
            _mm512_mask_cvtepi32_storeu_epi8(q + 64 * g + 16 * h, 0xffff, high32);
            _mm512_mask_cvtepi32_storeu_epi8(q + 64 * g + 32 + 16 * h, 0xffff, rest32);
            sum = _mm512_add_epi32(sum, high32);
            lo_sum = _mm512_add_epi32(lo_sum, rest32);
        }
        a_l[g] = step / l;
        a_sum[g] = step * ((float)_mm512_reduce_add_epi32(sum) + (float)_mm512_reduce_add_epi32(lo_sum) / l);
    }
}

/* One group's exact sum S [16 outputs] of a row -> out += (a / L) * scale * S + minimum * a_sum. */
static inline __m512 combine(__m512i sums, __m512 scale, __m512 minimum, float a_l, float a_sum, __m512 out) {
    __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(a_l));
    out = _mm512_fmadd_ps(scale, dot, out);
    return _mm512_fmadd_ps(minimum, _mm512_set1_ps(a_sum), out);
}

/* A 4- or 5-bit block's vector i -> the codes of inputs 8i.. (`first`) and 8i + 4.. (`second`), one a byte. */
static inline __attribute__((always_inline)) void codes_of(const uint8_t *block, int i, int bits, __m512i *first,
                                                          __m512i *second) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512i nibbles = _mm512_loadu_si512((const void *)(block + 64 * i));
    *first = _mm512_and_si512(nibbles, low);
    *second = _mm512_and_si512(_mm512_srli_epi16(nibbles, 4), low);
    if (bits == 5) {
        const __m512i sixteen = _mm512_set1_epi8(16);
        uint64_t fifth[2];
        memcpy(fifth, block + 256 + 16 * i, 16);
        *first = _mm512_mask_add_epi8(*first, _cvtu64_mask64(fifth[0]), *first, sixteen);
        *second = _mm512_mask_add_epi8(*second, _cvtu64_mask64(fifth[1]), *second, sixteen);
    }
}

/* For R activation rows (q: a group's bytes at this step's inputs, rows 2k apart): the 4 hi bytes at q and
 * at q + 4 against weight vectors hi_a and hi_b, and the lo bytes (32 further) against lo_a and lo_b, into
 * acc[0..3]. R is a compile-time constant at every call. */
static inline __attribute__((always_inline)) void dot_rows(const int8_t *q, int64_t k, int R, __m512i hi_a,
                                                           __m512i hi_b, __m512i lo_a, __m512i lo_b,
                                                           __m512i acc[4][ROW_BLOCK]) {
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        int32_t hi[2], lo[2];
        memcpy(hi, q + 2 * r * k, 8);
        memcpy(lo, q + 2 * r * k + 32, 8);
        acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], hi_a, _mm512_set1_epi32(hi[0]));
        acc[1][r] = _mm512_dpbusd_epi32(acc[1][r], hi_b, _mm512_set1_epi32(hi[1]));
        acc[2][r] = _mm512_dpbusd_epi32(acc[2][r], lo_a, _mm512_set1_epi32(lo[0]));
        acc[3][r] = _mm512_dpbusd_epi32(acc[3][r], lo_b, _mm512_set1_epi32(lo[1]));
    }
}

/* R activation rows (q rows of 2k bytes; a_l and a_sum rows of stride `groups`) against one strip:
 * out[r] = the 16 outputs of row r, in float32. R and bits are compile-time constants at every call. */
static inline __attribute__((always_inline)) void strip_rows(const uint8_t *strip, int64_t groups, int64_t k,
                                                             const int8_t *q, const float *a_l, const float *a_sum,
                                                             int R, int bits, __m512 *out) {
    const int64_t bytes = block_bytes(bits);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *block = strip + g * bytes;
        for (int line = 0; line < bytes; line += 64)
            _mm_prefetch((const char *)(block + PREFETCH_AHEAD + line), _MM_HINT_T0);
        /* Four chains of vpdpbusd (hi and lo, each on two halves of the inputs), joined exactly at the end:
         * one chain would wait on the instruction's latency. */
        __m512i acc[4][ROW_BLOCK];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) acc[0][r] = acc[1][r] = acc[2][r] = acc[3][r] = _mm512_setzero_si512();
        const int8_t *q_group = q + 64 * g;
        if (bits == 8) {
#pragma GCC unroll 4
            for (int i = 0; i < 8; i += 2) {
                __m512i even = _mm512_loadu_si512((const void *)(block + 64 * i));
                __m512i odd = _mm512_loadu_si512((const void *)(block + 64 * i + 64));
                dot_rows(q_group + 4 * i, k, R, even, odd, even, odd, acc);
            }
        } else {
            const int shift = bits == 4 ? 4 : 3; /* L * code = code << shift, within its byte */
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m512i first, second;
                codes_of(block, i, bits, &first, &second);
                dot_rows(q_group + 8 * i, k, R, _mm512_slli_epi16(first, shift), _mm512_slli_epi16(second, shift),
                         first, second, acc);
            }
        }
        __m512i sums[ROW_BLOCK]; /* S = L * sum code hi + sum code lo (8 bits: the weights are not times L) */
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m512i hi = _mm512_add_epi32(acc[0][r], acc[1][r]), lo = _mm512_add_epi32(acc[2][r], acc[3][r]);
            sums[r] = _mm512_add_epi32(bits == 8 ? _mm512_slli_epi32(hi, 4) : hi, lo);
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + bytes - 64)));
        __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + bytes - 32)));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            out[r] = combine(sums[r], scale, minimum, a_l[r * groups + g], a_sum[r * groups + g], out[r]);
    }
}

/* A row's 16 outputs of one strip -> row `row` of y: bfloat16, with the bias added as torch adds it to a
 * bfloat16 output, or with `float_out` float32 (logits), the bias added in float32. */
static inline void store_outputs(__m512 out, const uint16_t *bias, int64_t strip, void *y, int64_t row, int64_t n,
                                 int float_out) {
    if (float_out) {
        if (bias != NULL) out = _mm512_add_ps(out, load_bf16(bias + 16 * strip, 0xffff));
        _mm512_storeu_ps((float *)y + row * n + 16 * strip, out);
        return;
    }
    __m512i rounded = round_to_bf16(out);
    if (bias != NULL)
        rounded = round_to_bf16(_mm512_add_ps(bf16_bits_to_float(rounded), load_bf16(bias + 16 * strip, 0xffff)));
    _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)y + row * n + 16 * strip, 0xffff, rounded);
}

/* The few-rows path over strips [first, last): each strip stays in L1 while every block of rows passes over it. */
static inline __attribute__((always_inline)) void strips_vnni(const uint8_t *w, int64_t groups, int64_t k, int64_t n,
                                                              int64_t first, int64_t last, const int8_t *q,
                                                              const float *a_l, const float *a_sum, int64_t m,
                                                              const uint16_t *bias, int float_out, void *y,
                                                              int bits) {
    for (int64_t strip = first; strip < last; strip++) {
        const uint8_t *blocks = w + strip * groups * block_bytes(bits);
        for (int64_t r0 = 0; r0 < m; r0 += ROW_BLOCK) {
            __m512 out[ROW_BLOCK];
            int rows = m - r0 < ROW_BLOCK ? (int)(m - r0) : ROW_BLOCK;
            const int8_t *q0 = q + 2 * r0 * k;
            const float *a_l0 = a_l + r0 * groups, *a_sum0 = a_sum + r0 * groups;
            switch (rows) {
            case 1: strip_rows(blocks, groups, k, q0, a_l0, a_sum0, 1, bits, out); break;
            case 2: strip_rows(blocks, groups, k, q0, a_l0, a_sum0, 2, bits, out); break;
            case 3: strip_rows(blocks, groups, k, q0, a_l0, a_sum0, 3, bits, out); break;
            default: strip_rows(blocks, groups, k, q0, a_l0, a_sum0, 4, bits, out); break;
            }
            for (int r = 0; r < rows; r++) store_outputs(out[r], bias, strip, y, r0 + r, n, float_out);
        }
    }
}

/* One copy of the few-rows path per code width, so each is compiled with its width known. */
#define STRIPS_VNNI(BITS)                                                                                         \
    static void strips_vnni_##BITS(const uint8_t *w, int64_t groups, int64_t k, int64_t n, int64_t first,          \
                                   int64_t last, const int8_t *q, const float *a_l, const float *a_sum, int64_t m, \
                                   const uint16_t *bias, int float_out, void *y) {                                 \
        strips_vnni(w, groups, k, n, first, last, q, a_l, a_sum, m, bias, float_out, y, BITS);                     \
    }
STRIPS_VNNI(4)
STRIPS_VNNI(5)
STRIPS_VNNI(8)

#ifdef __AMX_INT8__
#include "amx.h"

/* The many-rows path: AMX tiles, with the same arithmetic. For each group, `tdpbsud` adds A [16 rows x 64]
 * (a row's hi then lo bytes, as stored) times B [64 x 16] into C [16 x 16] int32: S for 16 rows and 16
 * outputs at once, combined in float32 as `strip_rows` combines it, so a row gets the same bits on
 * either path. B is a strip's group with one code a byte: tile rows 0..7 hold L * code (against hi),
 * rows 8..15 the code (against lo); row 2i (+ 8) has vector i's first inputs, row 2i + 1 its second ones.
 * 8-bit codes times 16 do not fit a byte: their block is itself a B tile of K = 32 (8 rows of 64 bytes),
 * read from the weights as stored, and a group takes two products of K = 32, with A's hi half and lo
 * half: S = 16 S_hi + S_lo, the VNNI path's S. */

#define AMX_MIN_ROWS 16 /* from here on AMX beats the VNNI path */

/* 64 codes of inputs 4 kk + j, output c at byte 4c + j -> B tile rows `row` (times L = 1 << shift) and
 * `row` + 8 (as they are). */
static inline void tile_rows(__m512i codes, int shift, uint8_t *tile, int row) {
    _mm512_store_si512((void *)(tile + 64 * row), _mm512_slli_epi16(codes, shift));
    _mm512_store_si512((void *)(tile + 64 * (row + 8)), codes);
}

/* One strip [groups blocks] of 4 or 5 bits -> per group one B tile of 1 KiB. */
static void unpack_strip(const uint8_t *strip, int64_t groups, int bits, uint8_t *out) {
    const int shift = bits == 4 ? 4 : 3;
    for (int64_t g = 0; g < groups; g++)
        for (int i = 0; i < 4; i++) {
            __m512i first, second;
            codes_of(strip + g * block_bytes(bits), i, bits, &first, &second);
            tile_rows(first, shift, out + g * 1024, 2 * i);
            tile_rows(second, shift, out + g * 1024, 2 * i + 1);
        }
}

/* C [16 x 16] of one group -> out[r] for the first `rows` rows. With 8-bit codes, S = 16 C + C_low. */
static inline void combine_tile(const int32_t *sums, const int32_t *low_sums, const uint8_t *block, int64_t bytes,
                                const float *a_l, const float *a_sum, int64_t groups, int64_t r0, int64_t g, int rows,
                                __m512 *out) {
    __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + bytes - 64)));
    __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + bytes - 32)));
    for (int r = 0; r < rows; r++) {
        __m512i s = _mm512_load_si512((const void *)(sums + 16 * r));
        if (low_sums != NULL)
            s = _mm512_add_epi32(_mm512_slli_epi32(s, 4), _mm512_load_si512((const void *)(low_sums + 16 * r)));
        out[r] = combine(s, scale, minimum, a_l[(r0 + r) * groups + g], a_sum[(r0 + r) * groups + g], out[r]);
    }
}

/* Groups g and g + 1 of the strip after `blocks` into L2: this thread's next strip streams in while this one
 * is worked on (the tile loop alone left the memory idle). Past the last strip it reads nothing: a
 * prefetch never faults. Measured per layer in a decode step at 16 rows, from DRAM: 10-15% faster
 * than no prefetch, and L2 (T1) ahead of L1 (T0) by ~5%. */
static inline void prefetch_next(const uint8_t *blocks, int64_t groups, int64_t g, int64_t bytes) {
    const uint8_t *next = blocks + (groups + g) * bytes;
    for (int64_t line = 0; line < 2 * bytes; line += 64) _mm_prefetch((const char *)(next + line), _MM_HINT_T1);
}

/* q: padded rows of 2k bytes (the rows past m zero), a_l and a_sum: m rows; as the VNNI path otherwise. */
static int gemm_amx(const int8_t *q, int64_t m, int64_t k, const float *a_l, const float *a_sum, const uint8_t *w,
                    int64_t n, int bits, const uint16_t *bias, int float_out, void *y) {
    int64_t groups = k / GROUP, strips = n / 16, bytes = block_bytes(bits);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        tile_config config = {.palette = 1};
        for (int t = 0; t < 8; t++) config.rows[t] = 16, config.bytes_per_row[t] = 64; /* C: 0, 1, 6, 7; A: 2, 3; B: 4, 5 */
        if (bits == 8) { /* K = 32: A is a row's hi or lo half, B a block as stored */
            config.bytes_per_row[2] = config.bytes_per_row[3] = 32;
            config.rows[4] = config.rows[5] = 8;
        }
        uint8_t *codes = bits == 8 ? NULL : aligned_alloc(64, (size_t)(groups * 1024));
        int32_t *sums = aligned_alloc(64, sizeof(int32_t) * 1024);
        if ((codes == NULL && bits != 8) || sums == NULL) failed = 1;
        else _tile_loadconfig(&config);
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t first = strips * t / threads, last = strips * (t + 1) / threads;
        for (int64_t strip = first; strip < last && !failed; strip++) {
            const uint8_t *blocks = w + strip * groups * bytes;
            if (bits != 8) unpack_strip(blocks, groups, bits, codes);
            for (int64_t r0 = 0; r0 < m; r0 += 16) {
                int rows = m - r0 < 16 ? (int)(m - r0) : 16;
                __m512 out[16];
                for (int r = 0; r < 16; r++) out[r] = _mm512_setzero_ps();
                if (bits == 8) { /* as below, each group on two C tiles (hi: 0 or 6, lo: 1 or 7) */
                    const int8_t *a = q + 2 * r0 * k;
#define ISSUE(HI, LO, B, G) do { _tile_zero(HI); _tile_zero(LO); _tile_loadd(2, a + 64 * (G), 2 * k); \
                                 _tile_loadd(3, a + 64 * (G) + 32, 2 * k); _tile_loadd(B, blocks + (G) * bytes, 64); \
                                 _tile_dpbsud(HI, 2, B); _tile_dpbsud(LO, 3, B); } while (0)
                    ISSUE(0, 1, 4, 0);
                    for (int64_t g = 0; g < groups; g += 2) {
                        if (r0 == 0) prefetch_next(blocks, groups, g, bytes);
                        if (g + 1 < groups) ISSUE(6, 7, 5, g + 1);
                        _tile_stored(0, sums, 64);
                        _tile_stored(1, sums + 256, 64);
                        combine_tile(sums, sums + 256, blocks + g * bytes, bytes, a_l, a_sum, groups, r0, g, rows, out);
                        if (g + 1 < groups) {
                            if (g + 2 < groups) ISSUE(0, 1, 4, g + 2);
                            _tile_stored(6, sums + 512, 64);
                            _tile_stored(7, sums + 768, 64);
                            combine_tile(sums + 512, sums + 768, blocks + (g + 1) * bytes, bytes, a_l, a_sum, groups,
                                         r0, g + 1, rows, out);
                        }
                    }
#undef ISSUE
                }
                /* Groups alternate between two C tiles, and group g + 1's product is issued before group g's
                 * sums are stored: the tile unit works on one while the vector units combine the other
                 * (issued after, the store waited out the product's latency: 10-15% slower). */
                if (bits != 8) {
                    const int8_t *a = q + 2 * r0 * k;
#define ISSUE(C, A, B, G) do { _tile_zero(C); _tile_loadd(A, a + 64 * (G), 2 * k); \
                               _tile_loadd(B, codes + (G) * 1024, 64); _tile_dpbsud(C, A, B); } while (0)
                    ISSUE(0, 2, 4, 0);
                    for (int64_t g = 0; g < groups; g += 2) {
                        if (r0 == 0) prefetch_next(blocks, groups, g, bytes);
                        if (g + 1 < groups) ISSUE(1, 3, 5, g + 1);
                        _tile_stored(0, sums, 64);
                        combine_tile(sums, NULL, blocks + g * bytes, bytes, a_l, a_sum, groups, r0, g, rows, out);
                        if (g + 1 < groups) {
                            if (g + 2 < groups) ISSUE(0, 2, 4, g + 2);
                            _tile_stored(1, sums + 256, 64);
                            combine_tile(sums + 256, NULL, blocks + (g + 1) * bytes, bytes, a_l, a_sum, groups, r0,
                                         g + 1, rows, out);
                        }
                    }
#undef ISSUE
                }
                for (int r = 0; r < rows; r++) store_outputs(out[r], bias, strip, y, r0 + r, n, float_out);
            }
        }
        if (!failed) _tile_release();
        free(codes);
        free(sums);
    }
    return failed ? -1 : 0;
}
#endif

/* x [m, k] bfloat16 (or, with `swiglu`, [m, 2k] gate and up halves whose silu(gate) * up is the input),
 * w in the layout above for n outputs with `bits`-bit codes (n % 16 == 0, k % 32 == 0), bias [n]
 * bfloat16 or NULL -> y [m, n] bfloat16, or with `float_out` float32 (the float32 sums before that
 * rounding). Returns 0, or -1 for a shape it does not take or a buffer it cannot allocate. */
int tunelab_grouped_linear(const uint16_t *x, int64_t m, int64_t k, const uint8_t *w, int64_t n,
                           const uint16_t *bias, int swiglu, int bits, int float_out, void *y) {
    if (m < 1 || n % 16 != 0 || k % GROUP != 0 || (bits != 4 && bits != 5 && bits != 8)) return -1;
    int64_t groups = k / GROUP, strips = n / 16;
    uint16_t *product = swiglu ? malloc(sizeof(uint16_t) * (size_t)(m * k)) : NULL;
    int64_t padded = (m + 15) / 16 * 16; /* AMX reads whole tiles of 16 rows: the rows past m are zeros */
    int8_t *q = malloc((size_t)(2 * padded * k)); /* per row and group: 32 hi bytes, then 32 lo bytes */
    float *a_l = malloc(sizeof(float) * (size_t)(2 * m * groups)), *a_sum = a_l == NULL ? NULL : a_l + m * groups;
    if (q == NULL || a_l == NULL || (swiglu && product == NULL)) {
        free(product);
        free(q);
        free(a_l);
        return -1;
    }
    if (swiglu) {
        swiglu_rows(x, m, k, m > ROW_BLOCK, product);
        x = product;
    }
#pragma omp parallel for schedule(static) if (m > ROW_BLOCK)
    for (int64_t r = 0; r < m; r++) quantize_row(x + r * k, k, bits, q + 2 * r * k, a_l + r * groups, a_sum + r * groups);

    memset(q + 2 * m * k, 0, (size_t)(2 * (padded - m) * k));
    int status = 0;
#ifdef __AMX_INT8__
    if (m >= AMX_MIN_ROWS && amx_permitted()) {
        status = gemm_amx(q, m, k, a_l, a_sum, w, n, bits, bias, float_out, y);
        goto done;
    }
#endif
#pragma omp parallel
    {
        /* Contiguous strips per thread: one sequential stream each. */
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t first = strips * t / threads, last = strips * (t + 1) / threads;
        if (bits == 4) strips_vnni_4(w, groups, k, n, first, last, q, a_l, a_sum, m, bias, float_out, y);
        else if (bits == 5) strips_vnni_5(w, groups, k, n, first, last, q, a_l, a_sum, m, bias, float_out, y);
        else strips_vnni_8(w, groups, k, n, first, last, q, a_l, a_sum, m, bias, float_out, y);
    }
#ifdef __AMX_INT8__
done:
#endif
    free(product);
    free(q);
    free(a_l);
    return status;
}
