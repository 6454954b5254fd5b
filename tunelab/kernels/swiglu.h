/* SwiGLU's product silu(gate) * up, for the linear kernels that take it as their input (down_proj).
 * The including library links glibc's libmvec (build.load(..., libraries=("mvec",))). */

#ifndef TUNELAB_SWIGLU_H
#define TUNELAB_SWIGLU_H

#include <immintrin.h>
#include <stdint.h>

#include "bfloat16.h"

/* glibc's vector expf (libmvec, within 4 ulp): sixteen at a time. */
__m512 _ZGVeN16v_expf(__m512 x);

/* gate_up [m, 2k] bfloat16 -> silu(gate) * up [m, k] bfloat16, rounded after each op as torch's
 * F.silu(gate) * up is (silu computed in float32 as x / (1 + exp(-x))). Rows in parallel if `parallel`. */
static void swiglu_rows(const uint16_t *gate_up, int64_t m, int64_t k, int parallel, uint16_t *out) {
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *gate = gate_up + r * 2 * k, *up = gate + k;
        for (int64_t i = 0; i < k; i += 16) {
            __mmask16 mask = k - i >= 16 ? 0xffff : (__mmask16)((1u << (k - i)) - 1);
            __m512 g = load_bf16(gate + i, mask);
            __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 silu = bf16_bits_to_float(round_to_bf16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e))));
            _mm512_mask_cvtepi32_storeu_epi16(out + r * k + i, mask,
                                              round_to_bf16(_mm512_mul_ps(silu, load_bf16(up + i, mask))));
        }
    }
}

#endif
