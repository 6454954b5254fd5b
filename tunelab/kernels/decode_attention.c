/* One decode step of grouped-query attention for a batch of sequences, straight from the paged KV cache.
 *
 * For each sequence s (one new token): split its fused qkv row into heads, apply the optional per-head
 * RMSNorm (Qwen3's q_norm / k_norm) and RoPE, write the new key and value into the cache at slot[s], then
 * attend over the sequence's keys, found through key_index[s] (its block table unrolled), and write the
 * heads' outputs. PyTorch needs ~25 small ops per layer for this (views, norms, rope, the cache write and
 * gather, two batched matmuls, softmax, dtype conversions); the kernel is one call and copies no keys.
 *
 * The arithmetic follows the PyTorch path (model/layers.py): norm and RoPE in float32 rounded to
 * bfloat16 after each op as the bfloat16 tensors there are; keys and values stored in bfloat16, as the
 * cache holds them; scores, softmax and the weighted sum in float32; the output rounded to bfloat16. Only summation order differs.
 * A q8_0 cache (k_scales and v_scales given: model/kv_cache.py) holds int8 codes and per 32 values an
 * fp16 scale; new keys and values are quantized as `quantize_q8_0` does, and read as code * scale.
 */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__)
#error "this kernel needs AVX-512"
#endif

#include "bfloat16.h"

/* One head [d] bfloat16 -> float32 (exact bfloat16 values): optional RMSNorm, then RoPE; 16 lanes at a time. */
static void norm_and_rope(const uint16_t *head, int64_t d, const uint16_t *norm_weight, float eps,
                          const uint16_t *cos, const uint16_t *sin, float *out) { /* out: bfloat16 values */
    float x[2 * 256]; /* the head twice over: x + i + d / 2 reads the head rolled by d / 2 */
    for (int64_t i = 0; i < d; i += 16) _mm512_storeu_ps(x + i, load_bf16(head + i, 0xffff));
    if (norm_weight != NULL) {
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            __m512 v = _mm512_loadu_ps(x + i);
            squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
        }
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)d + eps));
        for (int64_t i = 0; i < d; i += 16) {
            __m512 normed = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv), load_bf16(norm_weight + i, 0xffff));
            _mm512_storeu_ps(x + i, bf16_bits_to_float(round_to_bf16(normed)));
        }
    }
    memcpy(x + d, x, sizeof(float) * (size_t)d);
    for (int64_t i = 0; i < d; i += 16) { /* the signs of rotate_half are folded into sin */
        __m512 a = bf16_bits_to_float(round_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(x + i), load_bf16(cos + i, 0xffff))));
        __m512 rotated = _mm512_mul_ps(_mm512_loadu_ps(x + i + d / 2), load_bf16(sin + i, 0xffff));
        _mm512_storeu_ps(out + i, bf16_bits_to_float(round_to_bf16(_mm512_add_ps(a, rotated))));
    }
}

/* glibc's vector expf (libmvec, within 4 ulp): sixteen at a time. */
__m512 _ZGVeN16v_expf(__m512 x);

/* p[j] = exp(p[j] - max p) / sum, for n scores. */
static void softmax(float *p, int64_t n) {
    float total = 0.0f;
    __m512 tops = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16)
        tops = _mm512_max_ps(tops, _mm512_mask_loadu_ps(tops, n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1), p + j));
    __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(tops)), sums = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(p + j), shift));
        _mm512_storeu_ps(p + j, e);
        sums = _mm512_add_ps(sums, e);
    }
    if (j < n) {
        __mmask16 tail = (__mmask16)((1u << (n - j)) - 1);
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + j), shift));
        _mm512_mask_storeu_ps(p + j, tail, e);
        sums = _mm512_add_ps(sums, _mm512_maskz_mov_ps(tail, e));
    }
    total = _mm512_reduce_add_ps(sums);
    __m512 inv = _mm512_set1_ps(total);
    for (j = 0; j + 16 <= n; j += 16) _mm512_storeu_ps(p + j, _mm512_div_ps(_mm512_loadu_ps(p + j), inv));
    for (; j < n; j++) p[j] /= total;
}

/* out[j] = the sum of v[j]'s 16 lanes, for 16 vectors at once: pairwise adds and shuffles instead of
 * 16 horizontal reductions. */
static inline __m512 sum_each(const __m512 v[16]) {
    __m512 a[8], c[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [p0+p2, q0+q2, p1+p3, q1+q3] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per lane: the lane's sums of four vectors */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xee));
    __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xee));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88), _mm512_shuffle_f32x4(d01, d23, 0xdd));
}

/* Cache row `index` (slot * kv + head, of d values), values t .. t + 15 in float32: bfloat16 as stored, or
 * with `scales` (q8_0) code * scale. */
static inline __attribute__((always_inline)) __m512 load_row(const void *cache, const uint16_t *scales, int64_t index,
                                                            int64_t d, int64_t t) {
    if (scales == NULL) return load_bf16((const uint16_t *)cache + index * d + t, 0xffff);
    __m128i codes = _mm_loadu_si128((const __m128i *)((const int8_t *)cache + index * d + t));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)),
                         _mm512_set1_ps(_cvtsh_ss(scales[index * (d / 32) + t / 32])));
}

/* The address of cache row `index`'s byte `offset`, for prefetching. */
static inline const char *row_address(const void *cache, const uint16_t *scales, int64_t index, int64_t d,
                                      int64_t offset) {
    return (const char *)cache + index * d * (scales == NULL ? 2 : 1) + offset;
}

/* One token's d values (float32 holding bfloat16 values) -> cache row `index`: as bfloat16, or (q8_0)
 * per 32 values scale = max|x| / 127 in fp16 and code = round(x / scale), as `quantize_q8_0`. */
static void store_row(const float *x, int64_t d, void *cache, uint16_t *scales, int64_t index) {
    if (scales == NULL) {
        uint16_t *row = (uint16_t *)cache + index * d;
        for (int64_t j = 0; j < d; j++) row[j] = float_to_bf16(x[j]); /* exact: x holds bfloat16 values */
        return;
    }
    int8_t *codes = (int8_t *)cache + index * d;
    for (int64_t b = 0; b < d; b += 32) {
        float top = 0.0f;
        for (int64_t j = b; j < b + 32; j++) top = fmaxf(top, fabsf(x[j]));
        float scale = fminf(top / 127.0f, 65504.0f);
        uint16_t half = _cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        float step = _cvtsh_ss(half);
        scales[index * (d / 32) + b / 32] = half;
        for (int64_t j = b; j < b + 32; j++)
            codes[j] = step > 0.0f ? (int8_t)fminf(fmaxf(nearbyintf(x[j] / step), -127.0f), 127.0f) : 0;
    }
}

/* The scores of one query q [16 chunks] against 16 keys (block: 16 rows of chunks x 16 floats): 16
 * independent accumulators, one per key, so the multiply-adds pipeline; `chunks` is a constant for 64
 * and 128 dims after inlining. */
static inline __attribute__((always_inline)) __m512 score_16(const float *q, const float *block, int64_t chunks) {
    __m512 partial[16];
    __m512 first = _mm512_loadu_ps(q);
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) partial[j] = _mm512_mul_ps(first, _mm512_loadu_ps(block + j * chunks * 16));
    for (int64_t t = 1; t < chunks; t++) {
        __m512 part = _mm512_loadu_ps(q + t * 16);
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            partial[j] = _mm512_fmadd_ps(part, _mm512_loadu_ps(block + j * chunks * 16 + t * 16), partial[j]);
    }
    return sum_each(partial);
}

#define VALUE_PREFETCH 8 /* value rows ahead: the keys' slots are scattered over the cache */

/* acc[g] = sum_j p[g][j] * value_j for `heads` query heads (from g0) of one KV head, whose values have
 * `chunks` x 16 dims; heads * chunks <= 16. Both are compile-time constants at every call after
 * inlining, so the sums stay in registers and each value row is read once per pass. */
static inline __attribute__((always_inline)) void weighted_sum_pass(
        const float *p, int64_t num_keys, const int64_t *keys, const void *v_cache, const uint16_t *v_scales, int64_t kv,
        int64_t head, int64_t g0, int heads, int chunks, float *acc) {
    __m512 sums[16];
#pragma GCC unroll 16
    for (int i = 0; i < heads * chunks; i++) sums[i] = _mm512_setzero_ps();
    const int64_t d = chunks * 16;
    for (int64_t j = 0; j < num_keys; j++) {
        if (j + VALUE_PREFETCH < num_keys)
#pragma GCC unroll 8
            for (int64_t line = 0; line < d * (v_scales == NULL ? 2 : 1); line += 64)
                _mm_prefetch(row_address(v_cache, v_scales, keys[j + VALUE_PREFETCH] * kv + head, d, line), _MM_HINT_T0);
#pragma GCC unroll 16
        for (int t = 0; t < chunks; t++) {
            __m512 v = load_row(v_cache, v_scales, keys[j] * kv + head, d, t * 16);
#pragma GCC unroll 16
            for (int g = 0; g < heads; g++)
                sums[g * chunks + t] = _mm512_fmadd_ps(_mm512_set1_ps(p[(g0 + g) * num_keys + j]), v, sums[g * chunks + t]);
        }
    }
#pragma GCC unroll 16
    for (int g = 0; g < heads; g++)
#pragma GCC unroll 16
        for (int t = 0; t < chunks; t++) _mm512_storeu_ps(acc + (g0 + g) * chunks * 16 + t * 16, sums[g * chunks + t]);
}

/* weighted_sum_pass over all `group` heads, as many per pass as 16 accumulators hold (chunks: 4 or 8). */
static inline __attribute__((always_inline)) void weighted_sum(
        const float *p, int64_t num_keys, const int64_t *keys, const void *v_cache, const uint16_t *v_scales, int64_t kv,
        int64_t head, int64_t group, int chunks, float *acc) {
    const int step = 16 / chunks; /* 4 heads of 64 dims, or 2 of 128 */
    for (int64_t g0 = 0; g0 < group; g0 += step) {
        int heads = group - g0 < step ? (int)(group - g0) : step;
        if (chunks == 8 || heads == 1) {
            if (heads == 1) weighted_sum_pass(p, num_keys, keys, v_cache, v_scales, kv, head, g0, 1, chunks, acc);
            else weighted_sum_pass(p, num_keys, keys, v_cache, v_scales, kv, head, g0, 2, 8, acc);
        } else if (heads == 2) weighted_sum_pass(p, num_keys, keys, v_cache, v_scales, kv, head, g0, 2, 4, acc);
        else if (heads == 3) weighted_sum_pass(p, num_keys, keys, v_cache, v_scales, kv, head, g0, 3, 4, acc);
        else weighted_sum_pass(p, num_keys, keys, v_cache, v_scales, kv, head, g0, 4, 4, acc);
    }
}

/* weighted_sum for 64 or 128 dims, one copy per (format, dims): the scales' NULL and the chunk count are
 * compile-time constants in each. */
static void weighted_sum_fixed(const float *p, int64_t num_keys, const int64_t *keys, const void *v_cache,
                               const uint16_t *v_scales, int64_t kv, int64_t head, int64_t group, int64_t d,
                               float *acc) {
    if (v_scales == NULL && d == 64) weighted_sum(p, num_keys, keys, v_cache, NULL, kv, head, group, 4, acc);
    else if (v_scales == NULL) weighted_sum(p, num_keys, keys, v_cache, NULL, kv, head, group, 8, acc);
    else if (d == 64) weighted_sum(p, num_keys, keys, v_cache, v_scales, kv, head, group, 4, acc);
    else weighted_sum(p, num_keys, keys, v_cache, v_scales, kv, head, group, 8, acc);
}

/* The same for any dims (d / 16 chunks, up to 16): one head per pass. */
static void weighted_sum_any(const float *p, int64_t num_keys, const int64_t *keys, const void *v_cache,
                             const uint16_t *v_scales, int64_t kv, int64_t head, int64_t group, int64_t chunks,
                             float *acc) {
    for (int64_t g = 0; g < group; g++) {
        __m512 sums[16];
        for (int64_t t = 0; t < chunks; t++) sums[t] = _mm512_setzero_ps();
        for (int64_t j = 0; j < num_keys; j++) {
            __m512 weight = _mm512_set1_ps(p[g * num_keys + j]);
            for (int64_t t = 0; t < chunks; t++)
                sums[t] = _mm512_fmadd_ps(weight, load_row(v_cache, v_scales, keys[j] * kv + head, chunks * 16, t * 16), sums[t]);
        }
        for (int64_t t = 0; t < chunks; t++) _mm512_storeu_ps(acc + g * chunks * 16 + t * 16, sums[t]);
    }
}

/* qkv [s, (h + 2 kv) d] bfloat16; cos, sin [s, d] bfloat16; q_norm, k_norm [d] bfloat16 or NULL;
 * k_cache, v_cache [slots, kv, d] bfloat16 (this layer's); slots [s]; key_index [s, max_keys];
 * positions [s] (sequence s attends to keys 0..positions[s]); num_slots: the cache's; out [s, h d] bfloat16;
 * k_scales, v_scales: NULL, or for a q8_0 cache (k_cache and v_cache int8) [slots, kv, d / 32] fp16.
 * Returns 0, or -1 for a shape it does not take or a failed allocation. */
int tunelab_decode_attention(const uint16_t *qkv, int64_t s, int64_t h, int64_t kv, int64_t d,
                             const uint16_t *cos, const uint16_t *sin, const uint16_t *q_norm, const uint16_t *k_norm,
                             float eps, void *k_cache, void *v_cache, const int64_t *slots,
                             const int64_t *key_index, int64_t max_keys, const int64_t *positions,
                             int64_t num_slots, uint16_t *out, uint16_t *k_scales, uint16_t *v_scales) {
    if (d % 16 != 0 || d > 256 || h % kv != 0 || ((k_scales != NULL || v_scales != NULL) && d % 32 != 0)) return -1;
    for (int64_t i = 0; i < s; i++) { /* a slot outside the cache would write or read out of bounds: check first */
        if (slots[i] < 0 || slots[i] >= num_slots || positions[i] < 0 || positions[i] >= max_keys) return -1;
        for (int64_t j = 0; j <= positions[i]; j++)
            if (key_index[i * max_keys + j] < 0 || key_index[i * max_keys + j] >= num_slots) return -1;
    }
    int64_t row = (h + 2 * kv) * d, group = h / kv;
    float *queries = malloc(sizeof(float) * (size_t)(s * h * d));
    if (queries == NULL) return -1;
    const float scale = (float)(1.0 / sqrt((double)d)); /* head_dim ** -0.5, as a float32 scalar */

#pragma omp parallel for schedule(static) if (s > 1)
    for (int64_t i = 0; i < s; i++) { /* each sequence writes its own slot */
        const uint16_t *x = qkv + i * row, *c = cos + i * d, *n = sin + i * d;
        for (int64_t head = 0; head < h; head++) {
            float *q = queries + (i * h + head) * d;
            norm_and_rope(x + head * d, d, q_norm, eps, c, n, q);
            for (int64_t j = 0; j < d; j += 16) _mm512_storeu_ps(q + j, _mm512_mul_ps(_mm512_loadu_ps(q + j), _mm512_set1_ps(scale)));
        }
        for (int64_t head = 0; head < kv; head++) {
            float key[512], value[256];
            norm_and_rope(x + (h + head) * d, d, k_norm, eps, c, n, key);
            for (int64_t j = 0; j < d; j++) value[j] = bf16_to_float(x[(h + kv + head) * d + j]);
            store_row(key, d, k_cache, k_scales, slots[i] * kv + head);
            store_row(value, d, v_cache, v_scales, slots[i] * kv + head);
        }
    }

    int failed = 0;
    /* A sequence's KV heads on one thread, one after another, where there are enough sequences to go
     * round: its cache rows hold every head's key side by side, so the lines one head's pass brings in
     * serve the next head from that core's L2. */
    int64_t chunk = s >= 2 * omp_get_max_threads() ? kv : 1;
#pragma omp parallel for schedule(static, chunk) reduction(| : failed)
    for (int64_t unit = 0; unit < s * kv; unit++) {
        int64_t i = unit / kv, head = unit % kv, num_keys = positions[i] + 1;
        float *scores = malloc(sizeof(float) * (size_t)(group * num_keys));
        float *acc = malloc(sizeof(float) * (size_t)(group * d));
        if (scores == NULL || acc == NULL) {
            free(scores);
            free(acc);
            failed = 1;
            continue;
        }
        const int64_t *keys = key_index + i * max_keys;
        float block[16 * 256]; /* 16 keys in float32 */
        for (int64_t j0 = 0; j0 < num_keys; j0 += 16) {
            int64_t count = num_keys - j0 < 16 ? num_keys - j0 : 16;
            for (int64_t j = j0 + 16; j < j0 + 32 && j < num_keys; j++) /* the next 16 keys: scattered rows the */
                for (int64_t line = 0; line < d * (k_scales == NULL ? 2 : 1); line += 64) /* hardware prefetcher cannot guess */
                    _mm_prefetch(row_address(k_cache, k_scales, keys[j] * kv + head, d, line), _MM_HINT_T0);
            for (int64_t j = 0; j < 16; j++) { /* past the end: repeat the last key; its scores are not stored */
                int64_t index = keys[j0 + (j < count ? j : count - 1)] * kv + head;
                for (int64_t t = 0; t < d; t += 16) _mm512_storeu_ps(block + j * d + t, load_row(k_cache, k_scales, index, d, t));
            }
            for (int64_t g = 0; g < group; g++) {
                const float *q = queries + (i * h + head * group + g) * d;
                __m512 dots = d == 64 ? score_16(q, block, 4) : d == 128 ? score_16(q, block, 8) : score_16(q, block, d / 16);
                _mm512_mask_storeu_ps(scores + g * num_keys + j0, (__mmask16)((1u << count) - 1), dots);
            }
        }
        for (int64_t g = 0; g < group; g++) softmax(scores + g * num_keys, num_keys);
        if (d == 64 || d == 128) weighted_sum_fixed(scores, num_keys, keys, v_cache, v_scales, kv, head, group, d, acc);
        else weighted_sum_any(scores, num_keys, keys, v_cache, v_scales, kv, head, group, d / 16, acc);
        for (int64_t g = 0; g < group; g++)
            for (int64_t t = 0; t < d; t++)
                out[i * h * d + (head * group + g) * d + t] = float_to_bf16(acc[g * d + t]);
        free(scores);
        free(acc);
    }
    free(queries);
    return failed ? -1 : 0;
}
