/* Residual add and RMSNorm in one pass, for bfloat16 layer outputs on a float32 residual stream
 * (vLLM's fused_add_rms_norm; llama.cpp also keeps the stream in float32).
 *
 * total[r] = residual[r] + x[r] in float32, then out[r] = bf16(total[r] / rms(total[r]) * weight). Between
 * two layers this replaces PyTorch's add and rms_norm calls, which in the decode loop cost far more
 * than their arithmetic, and the stream is no longer rounded to bfloat16 at each of its 2N additions.
 */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if !defined(__AVX512F__)
#error "this kernel needs AVX-512"
#endif

#include "bfloat16.h"

/* x [t, d] bfloat16; residual, total (= residual + x) [t, d] float32; weight [d] bfloat16; out [t, d] bfloat16. */
void tunelab_add_rms_norm(const uint16_t *x, const float *residual, float *total, int64_t t, int64_t d,
                          const uint16_t *weight, float eps, uint16_t *out) {
#pragma omp parallel for schedule(static) if (t > 4)
    for (int64_t r = 0; r < t; r++) {
        const uint16_t *xr = x + r * d;
        const float *before = residual + r * d;
        float *res = total + r * d;
        uint16_t *o = out + r * d;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            __mmask16 mask = d - i >= 16 ? 0xffff : (__mmask16)((1u << (d - i)) - 1);
            __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, before + i), load_bf16(xr + i, mask));
            _mm512_mask_storeu_ps(res + i, mask, v);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)d + eps);
        __m512 vscale = _mm512_set1_ps(scale);
        for (int64_t i = 0; i < d; i += 16) {
            __mmask16 mask = d - i >= 16 ? 0xffff : (__mmask16)((1u << (d - i)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, res + i), vscale), load_bf16(weight + i, mask));
            _mm512_mask_cvtepi32_storeu_epi16(o + i, mask, round_to_bf16(v));
        }
    }
}
