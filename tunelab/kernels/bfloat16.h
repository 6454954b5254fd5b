/* bfloat16 <-> float32 for the kernels, rounding as torch's .to(bfloat16) does (to nearest, ties to even). */

#ifndef TUNELAB_BFLOAT16_H
#define TUNELAB_BFLOAT16_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) { /* exact: the bits, shifted up */
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (isnan(f)) return 0x7fc0;
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* Up to 16 bfloat16 values (the lanes of `mask`; the others read as 0) -> float32. */
static inline __m512 load_bf16(const uint16_t *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

/* 16 floats -> their bfloat16 bits in the low half of each 32-bit lane, as float_to_bf16. */
static inline __m512i round_to_bf16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

static inline __m512 bf16_bits_to_float(__m512i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); }

#endif
