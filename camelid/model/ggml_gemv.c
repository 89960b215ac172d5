// CPU kernels on GGUF's blocks: matrix products on Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, IQ4_NL and IQ4_XS with int8 activations (a few
// rows, and a prompt's many), a whole LLaMA decode step on them, and the load-time conversions into them.
//
// As llama.cpp does it: the few activation rows are rounded to int8 (one float scale per 32 values, or per 256
// for the K-quants, as llama.cpp's Q8_K), and each weight block meets them in integer dot products (AVX-512
// VNNI `vpdpbusd`: unsigned bytes times signed bytes, four at a time into int32), with one float multiply-add
// per block. The weights are read once per call whatever the number of rows, in their file layout (Q4_0 and
// Q4_1 rows repacked once at load), so nothing is expanded.
//
// vpdpbusd wants unsigned weights: 4- and 6-bit values are used as they are and Q8_0's signed values are
// flipped to q + 128; an offset (8, 32 or 128) times the activations' sum is taken back out, and minimums
// (Q4_1, Q4_K) meet the activations' block sums.
//
// Built by camelid at first use for the machine it runs on (camelid/model/ggml_kernel.py); without
// AVX-512 VNNI camelid keeps to PyTorch's kernels.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32
#define MAX_ROWS 8

typedef struct {
    int8_t q[QK];
} act_block;

// x (m, k) float -> per block: int8 values, scale, and the 8 int32 lanes of offset * sum (for vpdpbusd).
static void quantize_activations(const float *x, int64_t k, int64_t m, int8_t *q, float *d, __m256i *bias,
                                 int offset) {
    const int64_t nb = k / QK;
    const __m256i off = _mm256_set1_epi8((char)offset);
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + r * k + b * QK;
            float amax = 0.0f;
            for (int j = 0; j < QK; j++) {
                float a = xb[j] < 0 ? -xb[j] : xb[j];
                amax = a > amax ? a : amax;
            }
            const float scale = amax / 127.0f;
            const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
            int8_t *qb = q + r * k + b * QK;
            for (int j = 0; j < QK; j++) {
                float v = xb[j] * inv;
                qb[j] = (int8_t)(v >= 0 ? (int)(v + 0.5f) : -(int)(-v + 0.5f));
            }
            d[r * nb + b] = scale;
            const __m256i a = _mm256_loadu_si256((const __m256i *)qb);
            bias[r * nb + b] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), off, a);
        }
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// Q4_0 block: f16 d, then 16 bytes: element j in the low nibble of byte j, element j + 16 in its high
// nibble. Two blocks at a time make one 512-bit vector of 64 values: [lo0, hi0, lo1, hi1].
static inline __m512i q4_0_pair(const uint8_t *blk, int64_t stride) {
    const __m256i q0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 2)));
    const __m256i q1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + stride + 2)));
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    const __m512i shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);  // high nibbles in the 2nd and 4th lanes
    return _mm512_and_si512(_mm512_srlv_epi64(both, shift), _mm512_set1_epi8(15));
}

static inline __m512i q8_0_pair(const uint8_t *blk, int64_t stride) {
    const __m256i q0 = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i q1 = _mm256_loadu_si256((const __m256i *)(blk + stride + 2));
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), _mm512_set1_epi8((char)0x80));
}

static inline __m256i q4_0_one(const uint8_t *blk) {
    const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + 2));
    const __m128i m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4), _mm_and_si128(qs, m4));
}

static inline __m256i q8_0_one(const uint8_t *blk) {
    return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_set1_epi8((char)0x80));
}

// One output row against M activation rows. Always inlined with M a constant (see ROWS below), so the
// accumulators live in registers; two per row, so consecutive block pairs do not wait on each other.
static inline __attribute__((always_inline)) void gemv_row(
        const uint8_t *row, int64_t bb, int is_q4, int64_t nb, int64_t k, const int8_t *xq, const float *xd,
        const __m256i *bias, const __m512 *xdv, float *y, int64_t n_out, const int M) {
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
    for (int r = 0; r < M; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 3 < nb; b += 4) {
        for (int half = 0; half < 2; half++) {
            const int64_t bh = b + 2 * half;
            const uint8_t *blk = row + bh * bb;
            const __m512i v = is_q4 ? q4_0_pair(blk, bb) : q8_0_pair(blk, bb);
            const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(f16(blk)), _mm256_set1_ps(f16(blk + bb)), 1);
            for (int r = 0; r < M; r++) {
                const __m512i a = _mm512_loadu_si512((const void *)(xq + r * k + bh * QK));
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, a);
                dot = _mm512_sub_epi32(dot, _mm512_loadu_si512((const void *)(bias + r * nb + bh)));
                const __m512 sc = _mm512_mul_ps(dw, xdv[r * (nb / 2) + bh / 2]);
                if (half == 0) acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc0[r]);
                else acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc1[r]);
            }
        }
    }
    for (int r = 0; r < M; r++) {
        float total = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
        for (int64_t t = b; t < nb; t++) {
            const uint8_t *blk = row + t * bb;
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + r * k + t * QK));
            __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), is_q4 ? q4_0_one(blk) : q8_0_one(blk), a);
            dot = _mm256_sub_epi32(dot, bias[r * nb + t]);
            total += hsum(_mm256_cvtepi32_ps(dot)) * f16(blk) * xd[r * nb + t];
        }
        y[r * n_out] = total;
    }
}

static void q6_k_block(const uint8_t *blk, float *y);
static void q4_k_block(const uint8_t *blk, float *y);

// ---------------------------------------------------------------------------------------------------
// Q4_0 rows repacked once at load as [nb f16 scales][nb x 16 bytes of nibbles] (type 102 here): four
// blocks' nibbles are then one 512-bit load and their scales one 64-bit load, instead of gathering them
// from 18-byte blocks. The activations are laid out to match: per four blocks, their first halves (the
// low nibbles' partners) together, then their second halves.
#define Q4S 102

// 64 bytes of nibbles -> their low and their high halves, as bytes.
static inline void nibbles(const uint8_t *p, __m512i *lo, __m512i *hi) {
    const __m512i v = _mm512_loadu_si512((const void *)p), m4 = _mm512_set1_epi8(15);
    *lo = _mm512_and_si512(v, m4);
    *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
}

// Four f16 values -> each spread over the four int32 lanes of its block.
static inline __m512 f16_lanes(const uint16_t *p) {
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p))));
}


// ---------------------------------------------------------------------------------------------------
// Q4_1 (w = d * q + m, q 0..15), repacked at load as [nb f16 d][nb f16 m][nb x 16 nibble bytes] (type 103). No offset to take out: the
// min meets the activations' block sums, a quarter of each in each of the block's four lanes.
#define Q41S 103

static inline __attribute__((always_inline)) void q41s_row(
        const uint8_t *row, int64_t nb, const __m512i *alo, const __m512i *ahi, const __m512 *xd4,
        const __m512 *xs4, float *y, int64_t n_out, const int M) {
    const uint16_t *d = (const uint16_t *)row, *mn = d + nb;
    const uint8_t *qs = row + 4 * nb;
    const int64_t ng = nb / 4;
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
    for (int r = 0; r < M; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i lo, hi;
        nibbles(qs + g * 64, &lo, &hi);
        const __m512 dw = f16_lanes(d + 4 * g), mw = f16_lanes(mn + 4 * g);
        for (int r = 0; r < M; r++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo[r * ng + g]);
            dot = _mm512_dpbusd_epi32(dot, hi, ahi[r * ng + g]);
            acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, xd4[r * ng + g]), acc0[r]);
            acc1[r] = _mm512_fmadd_ps(mw, xs4[r * ng + g], acc1[r]);
        }
    }
    for (int r = 0; r < M; r++) y[r * n_out] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

// ---------------------------------------------------------------------------------------------------
// Q6_K (ggml type 14) as the file has it: per 256 values, 6-bit q (w = d * sc * (q - 32)) with one int8 scale sc
// per 16. The activations meet q unsigned and the -32 offset comes back out through their lanes' sums
// (rounded with offset 32); the integer scales multiply the int32 lanes, then one float multiply-add per 64
// values applies d and the activations' scales. Block: 128 bytes of low nibbles, 64 of high bit pairs, 16
// scales, the f16 d.
#define Q6K 14

// ---------------------------------------------------------------------------------------------------
// IQ4_NL and IQ4_XS: 4-bit indices into llama.cpp's fixed non-linear table of int8 values (kvalues_iq4nl),
// with a scale per 32 values: an f16 (IQ4_NL), or a 6-bit integer times the f16 scale of its 256 (IQ4_XS).
// Repacked at load as Q4_0 is, each field of every block together: type 104 is [nb f16 scales][nibbles],
// type 105 [nsb f16 d][nsb u16 high scale bits][nsb x 4 bytes of low scale nibbles][nibbles]. vpshufb looks
// the indices up in the table shifted by 128 (so unsigned, for vpdpbusd), and 128 times the activations' sum
// is taken back out.
#define IQ4NLS 104
#define IQ4XSS 105

static inline __m512i iq4_table(void) {
    return _mm512_broadcast_i32x4(_mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, (char)129, (char)141, (char)153,
                                                (char)166, (char)181, (char)197, (char)217, (char)241));
}

// IQ4_XS: block b's integer scale (ls - 32) in a repacked row of nsb super-blocks.
static inline int iq4xs_scale(const uint8_t *row, int64_t nsb, int64_t b) {
    const int64_t s = b / 8, ib = b % 8;
    uint16_t h;
    memcpy(&h, row + 2 * nsb + 2 * s, 2);
    const uint8_t l = row[4 * nsb + 4 * s + ib / 2];
    return (((l >> 4 * (ib % 2)) & 15) | (((h >> 2 * ib) & 3) << 4)) - 32;
}

// One output row of repacked 4-bit blocks: Q4_0 (KIND 0: nibble - 8), IQ4_NL (1) or IQ4_XS (2), whose nibbles
// index the table. The activations come as the prepared halves of four blocks at a time (see prepare).
static inline __attribute__((always_inline)) void nibble_row(
        const uint8_t *row, int64_t nb, const __m512i *alo, const __m512i *ahi, const __m512i *bias4,
        const __m512 *xd4, float *y, int64_t n_out, const int M, const int KIND) {
    const int XS = KIND == 2;
    const int64_t nsb = nb / 8, ng = nb / 4;
    const uint8_t *qs = row + (XS ? 8 * nsb : 2 * nb);
    const __m512i table = iq4_table();
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
    for (int r = 0; r < M; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m512i lo, hi;
        nibbles(qs + g * 64, &lo, &hi);
        if (KIND) lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
        __m512 dw;
        if (XS) {  // the group's four 6-bit scales at once: low nibbles from 16 bits, high bit pairs from 8
            const int64_t sb = g / 2, half = g & 1;
            uint16_t hbits, lbits;
            memcpy(&hbits, row + 2 * nsb + 2 * sb, 2);
            memcpy(&lbits, row + 4 * nsb + 4 * sb + 2 * half, 2);
            const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(lbits), _mm_setr_epi32(0, 4, 8, 12)),
                                             _mm_set1_epi32(15));
            const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(hbits >> (8 * half)), _mm_setr_epi32(0, 2, 4, 6)),
                                             _mm_set1_epi32(3));
            const __m128 ls = _mm_cvtepi32_ps(_mm_sub_epi32(_mm_or_si128(lo, _mm_slli_epi32(hi, 4)), _mm_set1_epi32(32)));
            dw = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_mul_ps(ls, _mm_set1_ps(f16(row + 2 * sb)))));
        } else {
            dw = f16_lanes((const uint16_t *)row + 4 * g);
        }
        for (int r = 0; r < M; r++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, alo[r * ng + g]);
            dot = _mm512_dpbusd_epi32(dot, hi, ahi[r * ng + g]);
            dot = _mm512_sub_epi32(dot, bias4[r * ng + g]);
            const __m512 sc = _mm512_mul_ps(dw, xd4[r * ng + g]);
            if (g & 1) acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc1[r]);
            else acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc0[r]);
        }
    }
    for (int r = 0; r < M; r++) y[r * n_out] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

static inline __attribute__((always_inline)) void q6k_row(
        const uint8_t *row, int64_t k, const int8_t *xq, const __m256i *bias, const float *xd, float *y,
        int64_t n_out, const int M) {
    const int64_t nsb = k / 256, nb = k / QK;
    const __m512i m4 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3);
    // a half's 64 bytes of nibbles pair with its 32 bytes of high bits twice: bit pairs 0/2 for its first 64
    // values, 4/6 for the next 64 (64-bit lanes shift; the mask drops what crosses from a neighbouring byte)
    const __m512i first = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0), second = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    __m512i pick[4];  // lane j of the g-th 64 values covers values 64g + 4j.., scale 4g + j / 4
    for (int g = 0; g < 4; g++)
        pick[g] = _mm512_setr_epi32(4 * g, 4 * g, 4 * g, 4 * g, 4 * g + 1, 4 * g + 1, 4 * g + 1, 4 * g + 1,
                                    4 * g + 2, 4 * g + 2, 4 * g + 2, 4 * g + 2, 4 * g + 3, 4 * g + 3, 4 * g + 3, 4 * g + 3);
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t s = 0; s < nsb; s++) {
        const uint8_t *blk = row + s * 210;
        const float d = f16(blk + 208);
        const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)));
        __m512i q[4], scale[4];
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512((const void *)(blk + 64 * h));
            const __m256i qh2 = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
            const __m512i qh = _mm512_inserti64x4(_mm512_castsi256_si512(qh2), qh2, 1);
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4),
                                       _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, first), m3), 4));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                           _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, second), m3), 4));
        }
        for (int i = 0; i < 4; i++) scale[i] = _mm512_permutexvar_epi32(pick[i], sc);
        for (int r = 0; r < M; r++) {
            // one activation scale per 256 values (llama.cpp's Q8_K), so the block's sum stays in integers
            __m512i t = _mm512_setzero_si512();
            for (int i = 0; i < 4; i++) {
                const int64_t g = 8 * s + 2 * i;  // the 32-value block these 64 values start at
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[i],
                                                  _mm512_loadu_si512((const void *)(xq + r * k + g * QK)));
                dot = _mm512_sub_epi32(dot, _mm512_loadu_si512((const void *)(bias + r * nb + g)));
                t = _mm512_add_epi32(t, _mm512_mullo_epi32(dot, scale[i]));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d * xd[r * nsb + s]), acc[r]);
        }
    }
    for (int r = 0; r < M; r++) y[r * n_out] = _mm512_reduce_add_ps(acc[r]);
}

// ---------------------------------------------------------------------------------------------------
// Q4_K (ggml type 12) as the file has it: per 256 values, d and dmin (f16), eight 6-bit scales sc and mins m
// packed in 12 bytes, and 128 bytes of nibbles; w = d * sc * q - dmin * m per 32 values. Each 32 bytes of
// nibbles hold two sub-blocks (low nibbles, then high), so the activations are laid out to match: per 128
// values, blocks 0 and 2 together, then 1 and 3. q meets them unsigned; the mins meet the activations' block
// sums, as Q4_1's do.
#define Q4K 12

// The eight 6-bit scales, then the eight 6-bit mins, as bytes (llama.cpp's unpacking of the 12 bytes). Kept in
// registers: stored and read back as one vector it stalls on store forwarding every block.
static inline __m128i q4k_scales(const uint8_t *packed) {
    uint32_t u0, u1, u2;
    memcpy(&u0, packed, 4), memcpy(&u1, packed + 4, 4), memcpy(&u2, packed + 8, 4);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    const uint32_t m_high = ((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4);
    const uint32_t sc_high = (u2 & k2) | (((u0 >> 6) & k3) << 4);
    return _mm_set_epi32((int)m_high, (int)(u1 & k1), (int)sc_high, (int)(u0 & k1));
}

static inline __attribute__((always_inline)) void q4k_row(
        const uint8_t *row, int64_t k, const __m512i *alo, const __m512i *ahi, const float *xd, const __m256 *sums,
        float *y, int64_t n_out, const int M) {
    const int64_t nsb = k / 256, ng = k / 128;
    __m512i pick[4];  // lanes 0-7 take sub-block 4(i/2) + i%2, lanes 8-15 the one two further
    for (int i = 0; i < 4; i++) {
        const int first = (i >> 1) * 4 + (i & 1);
        pick[i] = _mm512_setr_epi32(first, first, first, first, first, first, first, first, first + 2, first + 2,
                                    first + 2, first + 2, first + 2, first + 2, first + 2, first + 2);
    }
    __m512 acc[MAX_ROWS];
    __m256 accm[MAX_ROWS];
    for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps(), accm[r] = _mm256_setzero_ps();
    for (int64_t s = 0; s < nsb; s++) {
        const uint8_t *blk = row + s * 144;
        const __m128i scm = q4k_scales(blk + 4);
        const __m512i sc = _mm512_cvtepu8_epi32(scm);
        const float d = f16(blk);
        const __m256 mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8))),
                                          _mm256_set1_ps(f16(blk + 2)));
        __m512i q[4];
        nibbles(blk + 16, &q[0], &q[1]);
        nibbles(blk + 80, &q[2], &q[3]);
        __m512i scale[4];
        for (int i = 0; i < 4; i++) scale[i] = _mm512_permutexvar_epi32(pick[i], sc);
        for (int r = 0; r < M; r++) {
            // one activation scale per 256 values (llama.cpp's Q8_K), so the block's sum stays in integers
            const int64_t g = r * ng + 2 * s;
            __m512i t = _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], alo[g]), scale[0]);
            t = _mm512_add_epi32(t, _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[1], ahi[g]), scale[1]));
            t = _mm512_add_epi32(t, _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[2], alo[g + 1]), scale[2]));
            t = _mm512_add_epi32(t, _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q[3], ahi[g + 1]), scale[3]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d * xd[r * nsb + s]), acc[r]);
            accm[r] = _mm256_fmadd_ps(mins, sums[r * nsb + s], accm[r]);
        }
    }
    for (int r = 0; r < M; r++) {
        const __m256 m = accm[r];
        __m128 t = _mm_add_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        t = _mm_add_ps(t, _mm_movehl_ps(t, t));
        t = _mm_add_ss(t, _mm_movehdup_ps(t));
        y[r * n_out] = _mm512_reduce_add_ps(acc[r]) - _mm_cvtss_f32(t);
    }
}

// ---------------------------------------------------------------------------------------------------
// Activations rounded once per matmul, in the layout each weight type's rows meet them in.
typedef struct {
    int64_t k, m;
    int8_t *xq;                 // int8 values, (m, k)
    float *xd;                  // one scale per block of 32
    __m256i *bias;              // Q4_0/Q8_0: offset * block sum, per block
    __m512 *xdv;                // Q4_0/Q8_0: scales of block pairs
    __m512i *lo, *hi, *b4;      // split rows: per four blocks, first and second halves, the -8 offset's lanes
    __m512 *x4, *s4;            // split rows: scales, and the scaled sums Q4_1's mins meet
    __m256 *sums;               // Q4_K: per 256 values, each block's sum times their one scale
} prepared;

static void prepared_free(prepared *p) {
    free(p->xq), free(p->xd), free(p->bias), free(p->xdv), free(p->lo), free(p->hi), free(p->b4), free(p->x4),
        free(p->s4), free(p->sums);
}

// Room for m rows of up to k values (k a multiple of 32); 0 or -1 when out of memory.
static int prepared_alloc(prepared *p, int64_t k, int64_t m) {
    const int64_t nb = k / QK, ng = nb / 4 + 1;
    memset(p, 0, sizeof(*p));
    p->xq = aligned_alloc(64, ((m * k + 63) / 64) * 64);
    p->xd = malloc(sizeof(float) * m * nb);
    p->bias = aligned_alloc(64, sizeof(__m256i) * ((m * nb + 1) / 2 * 2));  // a multiple of 64 bytes
    p->xdv = aligned_alloc(64, sizeof(__m512) * (m * (nb / 2) + 1));
    p->lo = aligned_alloc(64, 64 * m * ng), p->hi = aligned_alloc(64, 64 * m * ng);
    p->b4 = aligned_alloc(64, 64 * m * ng);
    p->x4 = aligned_alloc(64, 64 * m * ng), p->s4 = aligned_alloc(64, 64 * m * ng);
    p->sums = aligned_alloc(64, 64 * m * (nb / 8 + 1));
    if (!p->xq || !p->xd || !p->bias || !p->xdv || !p->lo || !p->hi || !p->b4 || !p->x4 || !p->s4 || !p->sums) {
        prepared_free(p);
        return -1;
    }
    return 0;
}

static int is_split(int type) { return type == Q4S || type == Q41S || type == IQ4NLS || type == IQ4XSS; }

// Whether `type` rows of k values are taken: Q4_0 (2), Q8_0 (8) and the repacked Q4_0/Q4_1 (102, 103).
static int takes(int type, int64_t k) {
    if (type == Q6K || type == Q4K || type == IQ4XSS) return k % 256 == 0;
    return is_split(type) ? k % (4 * QK) == 0 : (type == 2 || type == 8) && k % QK == 0;
}

static int64_t row_bytes_of(int type, int64_t k) {
    if (type == IQ4XSS) return k / 256 * 136;
    return type == Q6K ? k / 256 * 210 : type == Q4K ? k / 256 * 144 : k / QK * (type == 8 ? 34 : type == Q41S ? 20 : 18);
}

// K-quants' activations: rounded to int8 with one scale per 256 values, as llama.cpp's Q8_K, with each 32-value
// block's sum times that scale. Q4_K (see q4k_row) then lays them out per 128 values as blocks 0 and 2, then 1
// and 3; Q6_K keeps them in order and adds the lanes' sums times its offset 32.
static void quantize_per_256(const float *x, int64_t k, int64_t m, prepared *p) {
    const int64_t nsb = k / 256;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t s = 0; s < nsb; s++) {
            const float *xs = x + r * k + s * 256;
            int8_t *q = p->xq + r * k + s * 256;
            float amax = 0.0f;
            for (int j = 0; j < 256; j++) amax = fabsf(xs[j]) > amax ? fabsf(xs[j]) : amax;
            const float scale = amax / 127.0f, inv = scale != 0.0f ? 1.0f / scale : 0.0f;
            float sums[8];
            for (int b = 0; b < 8; b++) {
                int total = 0;
                for (int j = b * QK; j < (b + 1) * QK; j++) {
                    const float v = xs[j] * inv;
                    q[j] = (int8_t)(v >= 0 ? (int)(v + 0.5f) : -(int)(-v + 0.5f));
                    total += q[j];
                }
                sums[b] = total * scale;
            }
            p->xd[r * nsb + s] = scale;
            p->sums[r * nsb + s] = _mm256_loadu_ps(sums);
        }
    }
}

static void prepare_q4k(const float *x, int64_t k, int64_t m, prepared *p) {
    const int64_t ng = k / 128;
    quantize_per_256(x, k, m, p);
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < ng; g++) {
            const int8_t *a = p->xq + r * k + g * 128;
            p->lo[r * ng + g] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                                                   _mm256_loadu_si256((const __m256i *)(a + 64)), 1);
            p->hi[r * ng + g] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + 32))),
                                                   _mm256_loadu_si256((const __m256i *)(a + 96)), 1);
        }
    }
}

// x (m, k) -> p, for weights of `type`.
static void prepare(int type, const float *x, int64_t k, int64_t m, prepared *p) {
    const int64_t nb = k / QK, ng = nb / 4;
    p->k = k, p->m = m;
    if (type == Q4K) {
        prepare_q4k(x, k, m, p);
        return;
    }
    if (type == Q6K) {
        quantize_per_256(x, k, m, p);
        const __m256i offset = _mm256_set1_epi8(32);
        for (int64_t b = 0; b < m * (k / QK); b++)
            p->bias[b] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset,
                                             _mm256_loadu_si256((const __m256i *)(p->xq + b * QK)));
        return;
    }
    quantize_activations(x, k, m, p->xq, p->xd, p->bias, type == 8 ? 128 : 8);
    if (!is_split(type)) {
        for (int64_t r = 0; r < m; r++)  // activation scales of block pairs, laid out as the weights' are
            for (int64_t b = 0; b < nb / 2; b++)
                p->xdv[r * (nb / 2) + b] = _mm512_insertf32x8(_mm512_set1_ps(p->xd[r * nb + 2 * b]),
                                                              _mm256_set1_ps(p->xd[r * nb + 2 * b + 1]), 1);
        return;
    }
    const __m512i eight = _mm512_set1_epi8(type == IQ4NLS || type == IQ4XSS ? (char)128 : 8);  // the offset
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < ng; g++) {
            int8_t l[64] __attribute__((aligned(64))), h[64] __attribute__((aligned(64)));
            float s[16], sums[16];
            for (int j = 0; j < 4; j++) {
                const int64_t b = 4 * g + j;
                const int8_t *a = p->xq + r * k + b * QK;
                memcpy(l + 16 * j, a, 16);
                memcpy(h + 16 * j, a + 16, 16);
                // Q4_1's min term uses the rounded activations' sum, as the dot products do (llama.cpp's
                // Q8_1): the two are large and cancel, so they must see the same activations
                int total = 0;
                for (int e = 0; e < QK; e++) total += a[e];
                for (int e = 0; e < 4; e++) s[4 * j + e] = p->xd[r * nb + b], sums[4 * j + e] = total * p->xd[r * nb + b] * 0.25f;
            }
            const int64_t i = r * ng + g;
            p->lo[i] = _mm512_load_si512(l);
            p->hi[i] = _mm512_load_si512(h);
            p->b4[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, p->lo[i]), eight, p->hi[i]);
            p->x4[i] = _mm512_loadu_ps(s);
            p->s4[i] = _mm512_loadu_ps(sums);
        }
    }
}

// Output rows n0..n1 for activation rows t..t+M-1 (M a constant once inlined, so accumulators stay in registers).
static inline __attribute__((always_inline)) void rows_block(
        int type, const uint8_t *w, int64_t n0, int64_t n1, int64_t n_out, const prepared *p, int64_t t, float *y,
        const int M) {
    const int64_t k = p->k, nb = k / QK, ng = nb / 4;
    const int64_t bb = type == 8 ? 34 : 18, row_bytes = row_bytes_of(type, k);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * row_bytes;
        float *out = y + t * n_out + n;
        if (type == Q6K)
            q6k_row(row, k, p->xq + t * k, p->bias + t * nb, p->xd + t * (k / 256), out, n_out, M);
        else if (type == Q4K)
            q4k_row(row, k, p->lo + t * ng, p->hi + t * ng, p->xd + t * (k / 256), p->sums + t * (k / 256), out,
                    n_out, M);
        else if (type == Q4S)
            nibble_row(row, nb, p->lo + t * ng, p->hi + t * ng, p->b4 + t * ng, p->x4 + t * ng, out, n_out, M, 0);
        else if (type == Q41S)
            q41s_row(row, nb, p->lo + t * ng, p->hi + t * ng, p->x4 + t * ng, p->s4 + t * ng, out, n_out, M);
        else if (type == IQ4NLS)
            nibble_row(row, nb, p->lo + t * ng, p->hi + t * ng, p->b4 + t * ng, p->x4 + t * ng, out, n_out, M, 1);
        else if (type == IQ4XSS)
            nibble_row(row, nb, p->lo + t * ng, p->hi + t * ng, p->b4 + t * ng, p->x4 + t * ng, out, n_out, M, 2);
        else
            gemv_row(row, bb, type == 2, nb, k, p->xq + t * k, p->xd + t * nb, p->bias + t * nb,
                     p->xdv + t * (nb / 2), out, n_out, M);
    }
}

#define ROWS(M) \
    case M: rows_block(type, w, n0, n1, n_out, p, t, y, M); break;

// y (m, n_out) = the prepared activations @ w.T. Called by every thread of a parallel region: each takes 16
// weight rows at a time and runs every activation row past them (8 at a time) while they are in its cache,
// so the weights come from memory once however long the prompt.
static void matmul_shared(int type, const uint8_t *w, int64_t n_out, const prepared *p, float *y) {
    const int64_t chunk = 16, n_chunks = (n_out + chunk - 1) / chunk, m = p->m;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t n0 = c * chunk, n1 = n0 + chunk < n_out ? n0 + chunk : n_out;
        for (int64_t t = 0; t < m; t += MAX_ROWS) {
            const int rows = m - t < MAX_ROWS ? (int)(m - t) : MAX_ROWS;
            switch (rows) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) }
        }
    }
}

// y (m, n_out) = x (m, k) @ w.T, w being n_out rows of k/32 blocks of `type` (see `takes`).
// Returns 0, or -1 for arguments it does not take (the caller then uses PyTorch).
int ggml_matmul(int type, const uint8_t *w, int64_t n_out, int64_t k, const float *x, int64_t m, float *y,
                int threads) {
    prepared p;
    if (m < 1 || !takes(type, k) || prepared_alloc(&p, k, m)) return -1;
    prepare(type, x, k, m, &p);
#pragma omp parallel num_threads(threads)
    matmul_shared(type, w, n_out, &p, y);
    prepared_free(&p);
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// Prompts: many activation rows at once, as an integer matrix product (int8 activations times the weights'
// 4-8-bit values in vpdpbusd, as above). The difference from the rows above is the layout: there a vector's
// lanes run along k, so each 32-value block ends in a horizontal reduction; here its 16 lanes are 16 weight
// rows (output columns), so a block of 32 is eight vpdpbusd per lane set and the per-block float work (one
// scale multiply and one multiply-add) is spread over eight of them. Each thread unpacks a panel of NR weight
// rows into that layout (bytes, unsigned, [fold][k / 4][NR][4]) with their per-block scales and minimums,
// then runs every activation row past it, MR rows at a time, while it stays in its cache. This does about
// twice the multiply-accumulates per cycle of a bf16 matrix product on AVX-512 machines without AMX.
//
// A "fold" is the span after which int32 sums are scaled into the float accumulators: 32 values for most
// types, 16 for Q6_K (one int8 scale per 16).
#define NR 32
#define MR 6

typedef struct {
    int64_t k, m, nf, bs;   // values per row, rows, folds per row, values per fold
    int8_t *q;              // (m, k) rounded activations
    int32_t *bias;          // (m, nf) the weights' offset (8, 32, 128) times each fold's sum
    float *d, *sf;          // (m, nf) each fold's scale, and its scaled sum (what minimums meet)
} gemm_acts;

static int gemm_fold(int type) { return type == Q6K ? 16 : 32; }
static int gemm_offset(int type) {
    return type == 8 || type == IQ4NLS || type == IQ4XSS ? 128 : type == Q6K ? 32 : type == Q41S || type == Q4K ? 0 : 8;
}
static int gemm_mins(int type) { return type == Q41S || type == Q4K; }

// x (m, k) -> int8 with one scale per 32 (rounded to nearest, as llama.cpp's vectorised Q8_0), the fold sums.
static void gemm_prepare(int type, const float *x, gemm_acts *a) {
    const int64_t k = a->k, nb = k / QK, per = QK / a->bs;
    const int offset = gemm_offset(type);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a->m; r++) {
        for (int64_t b = 0; b < nb; b++) {
            const __m512 x0 = _mm512_loadu_ps(x + r * k + b * QK), x1 = _mm512_loadu_ps(x + r * k + b * QK + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            const float d = amax / 127.0f, inv = amax != 0.0f ? 127.0f / amax : 0.0f;
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inv)));
            const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inv)));
            _mm_storeu_si128((__m128i *)(a->q + r * k + b * QK), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(a->q + r * k + b * QK + 16), _mm512_cvtepi32_epi8(q1));
            const int32_t s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
            for (int64_t h = 0; h < per; h++) {
                const int32_t sum = per == 1 ? s0 + s1 : h ? s1 : s0;
                const int64_t f = r * a->nf + b * per + h;
                a->bias[f] = offset * sum, a->d[f] = d, a->sf[f] = d * (float)sum;
            }
        }
    }
}

// Sixteen weight rows' dwords at byte `off` of each row (idx: the rows' starts), as bytes >> shift & mask.
static inline __m512i gather_bits(const uint8_t *base, __m512i idx, int64_t off, int shift, int mask) {
    const __m512i v = _mm512_i32gather_epi32(idx, (const void *)(base + off), 1);
    return _mm512_and_si512(_mm512_srli_epi32(v, shift), _mm512_set1_epi8((char)mask));
}

static inline __m512 gather_f16(const uint8_t *base, __m512i idx, int64_t off, int high) {
    __m512i v = _mm512_i32gather_epi32(idx, (const void *)(base + off), 1);
    if (high) v = _mm512_srli_epi32(v, 16);
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
}

// Weight rows n0.. (NR of them; past n_out the last row repeats, its results unused) -> the panel.
static void gemm_unpack(int type, const uint8_t *w, int64_t n0, int64_t n_out, int64_t k, uint8_t *pq, float *pd,
                        float *pm) {
    const int64_t rb = row_bytes_of(type, k), nb = k / QK;
    const uint8_t *base = w + n0 * rb;
    for (int h = 0; h < NR / 16; h++) {
        int32_t rows[16];
        for (int c = 0; c < 16; c++) {
            const int64_t n = n0 + 16 * h + c;
            rows[c] = (int32_t)(((n < n_out ? n : n_out - 1) - n0) * rb);
        }
        const __m512i idx = _mm512_loadu_si512(rows);
        uint8_t *q = pq + 64 * h;
        float *d = pd + 16 * h, *mn = pm + 16 * h;
        if (type == IQ4XSS) {
            for (int c = 0; c < 16; c++)
                for (int64_t b = 0; b < nb; b++)
                    d[b * NR + c] = f16(base + rows[c] + 2 * (b / 8)) * iq4xs_scale(base + rows[c], nb / 8, b);
        }
        if (type == Q4K || type == Q6K) {
            for (int c = 0; c < 16; c++) {  // integer sub-block scales times the super-block's, per weight row
                for (int64_t s = 0; s < k / 256; s++) {
                    const uint8_t *blk = base + rows[c] + s * (type == Q4K ? 144 : 210);
                    if (type == Q4K) {
                        uint8_t sm[16];
                        _mm_storeu_si128((__m128i *)sm, q4k_scales(blk + 4));
                        for (int j = 0; j < 8; j++)
                            d[(8 * s + j) * NR + c] = f16(blk) * sm[j], mn[(8 * s + j) * NR + c] = -f16(blk + 2) * sm[8 + j];
                    } else {
                        for (int j = 0; j < 16; j++) d[(16 * s + j) * NR + c] = f16(blk + 208) * (int8_t)blk[192 + j];
                    }
                }
            }
        }
        for (int64_t b = 0; b < nb; b++) {  // per 32 values: eight dwords of each row, then its scale
            const int64_t s = b / 8, j = b % 8;
            for (int i = 0; i < 8; i++) {
                __m512i v;
                if (type == 2) v = gather_bits(base, idx, 18 * b + 2 + 4 * (i & 3), 4 * (i >> 2), 15);
                else if (type == Q4S) v = gather_bits(base, idx, 2 * nb + 16 * b + 4 * (i & 3), 4 * (i >> 2), 15);
                else if (type == Q41S) v = gather_bits(base, idx, 4 * nb + 16 * b + 4 * (i & 3), 4 * (i >> 2), 15);
                else if (type == IQ4NLS || type == IQ4XSS)
                    v = _mm512_shuffle_epi8(iq4_table(), gather_bits(base, idx, (type == IQ4NLS ? 2 * nb : nb)
                                                                     + 16 * b + 4 * (i & 3), 4 * (i >> 2), 15));
                else if (type == 8) v = _mm512_xor_si512(gather_bits(base, idx, 34 * b + 2 + 4 * i, 0, 255),
                                                         _mm512_set1_epi8((char)0x80));
                else if (type == Q4K) v = gather_bits(base, idx, 144 * s + 16 + 32 * (j / 2) + 4 * i, 4 * (j & 1), 15);
                else {  // Q6_K: quarter j % 4 of half j / 4; low four bits from ql, high two from qh
                    const int64_t blk = 210 * s, hf = j / 4, qt = j % 4;
                    const __m512i lo = gather_bits(base, idx, blk + 64 * hf + 32 * (qt & 1) + 4 * i, 4 * (qt >> 1), 15);
                    const __m512i hi = gather_bits(base, idx, blk + 128 + 32 * hf + 4 * i, 2 * qt, 3);
                    v = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 4));
                }
                _mm512_store_si512((void *)(q + (b * 8 + i) * 64 * (NR / 16)), v);
            }
            if (type == 2 || type == 8) _mm512_store_ps(d + b * NR, gather_f16(base, idx, (type == 2 ? 18 : 34) * b, 0));
            if (type == Q4S || type == Q41S || type == IQ4NLS) _mm512_store_ps(d + b * NR, gather_f16(base, idx, 2 * b, 0));
            if (type == Q41S) _mm512_store_ps(mn + b * NR, gather_f16(base, idx, 2 * nb + 2 * b, 0));
        }
    }
}

// y[m0.., n0..] for `rows` (<= MR) activation rows against the panel; R, BS and MINS constant once inlined.
static inline __attribute__((always_inline)) void gemm_tile(
        const uint8_t *pq, const float *pd, const float *pm, const gemm_acts *a, int64_t m0, float *y,
        int64_t ldy, __mmask16 mask0, __mmask16 mask1, const int R, const int BS, const int MINS) {
    __m512 acc[MR][2];
    const int8_t *x[MR];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps(), x[r] = a->q + (m0 + r) * a->k;
    const int64_t nf = a->nf;
    for (int64_t f = 0; f < nf; f++) {
        __m512i s[MR][2];  // starting from minus the offset's share, so nothing is taken out afterwards
        for (int r = 0; r < R; r++) s[r][0] = s[r][1] = _mm512_set1_epi32(MINS ? 0 : -a->bias[(m0 + r) * nf + f]);
        const __m512i *w = (const __m512i *)(pq + f * BS * NR);
        for (int i = 0; i < BS / 4; i++) {
            const __m512i w0 = _mm512_load_si512(w + 2 * i), w1 = _mm512_load_si512(w + 2 * i + 1);
            for (int r = 0; r < R; r++) {
                int32_t four;
                memcpy(&four, x[r] + f * BS + 4 * i, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, xv);
                s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, xv);
            }
        }
        const __m512 d0 = _mm512_load_ps(pd + f * NR), d1 = _mm512_load_ps(pd + f * NR + 16);
        for (int r = 0; r < R; r++) {
            const int64_t at = (m0 + r) * nf + f;
            const __m512 da = _mm512_set1_ps(a->d[at]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][0]), _mm512_mul_ps(d0, da), acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][1]), _mm512_mul_ps(d1, da), acc[r][1]);
            if (MINS) {
                const __m512 sf = _mm512_set1_ps(a->sf[at]);
                acc[r][0] = _mm512_fmadd_ps(_mm512_load_ps(pm + f * NR), sf, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_load_ps(pm + f * NR + 16), sf, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_mask_storeu_ps(y + (m0 + r) * ldy, mask0, acc[r][0]);
        _mm512_mask_storeu_ps(y + (m0 + r) * ldy + 16, mask1, acc[r][1]);
    }
}

#define TILE(R, BS, MINS) case R: gemm_tile(pq, pd, pm, a, m0, y, ldy, mask0, mask1, R, BS, MINS); break;
#define TILES(BS, MINS) switch (rows) { TILE(1, BS, MINS) TILE(2, BS, MINS) TILE(3, BS, MINS) TILE(4, BS, MINS) \
                                        TILE(5, BS, MINS) TILE(6, BS, MINS) }

static void gemm_panel(int type, const uint8_t *pq, const float *pd, const float *pm, const gemm_acts *a, float *y,
                       int64_t ldy, int64_t cols) {
    const __mmask16 mask0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
    const __mmask16 mask1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    for (int64_t m0 = 0; m0 < a->m; m0 += MR) {
        const int rows = a->m - m0 < MR ? (int)(a->m - m0) : MR;
        if (type == Q6K) TILES(16, 0)
        else if (gemm_mins(type)) TILES(32, 1)
        else TILES(32, 0)
    }
}

// y (m, n_out) = x (m, k) @ w.T for the weight types `takes` names; 0, or -1 for what it does not take.
int ggml_gemm(int type, const uint8_t *w, int64_t n_out, int64_t k, const float *x, int64_t m, float *y,
              int threads) {
    if (m < 1 || n_out < 1 || !takes(type, k)) return -1;
    gemm_acts a = {k, m, k / gemm_fold(type), gemm_fold(type), NULL, NULL, NULL, NULL};
    a.q = aligned_alloc(64, (m * k + 63) / 64 * 64);
    a.bias = malloc(sizeof(int32_t) * m * a.nf), a.d = malloc(sizeof(float) * m * a.nf);
    a.sf = malloc(sizeof(float) * m * a.nf);
    int failed = !a.q || !a.bias || !a.d || !a.sf;
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            gemm_prepare(type, x, &a);  // ends in the implied barrier of its `omp for`
            uint8_t *pq = aligned_alloc(64, k * NR);
            float *pd = aligned_alloc(64, sizeof(float) * a.nf * NR), *pm = aligned_alloc(64, sizeof(float) * a.nf * NR);
            int mine = !pq || !pd || !pm;
            if (mine) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t n0 = 0; n0 < n_out; n0 += NR) {
                if (mine) continue;
                gemm_unpack(type, w, n0, n_out, k, pq, pd, pm);
                gemm_panel(type, pq, pd, pm, &a, y + n0, n_out, n_out - n0);
            }
            free(pq), free(pd), free(pm);
        }
    }
    free(a.q), free(a.bias), free(a.d), free(a.sf);
    return failed ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------------
// One decode step of a LLaMA-shaped model (RMSNorm, rotary attention over a KV cache, a gated MLP) whose four
// block matmuls are all in blocks this file runs, with the variations Qwen and Gemma add: q/k/v biases, an
// RMSNorm over each head's q and k, norms after each branch, sliding-window blocks with their own rotary
// tables, a scale and a soft cap on the scores, GeGLU. The PyTorch model computes the same thing op by op (and
// is the reference the tests hold this to); here the whole step is one parallel region with a barrier between
// phases, which removes about ten milliseconds a token of per-op dispatch on a 22-layer model.
typedef struct {
    const float *attn_norm, *mlp_norm;         // (dim)
    const uint8_t *wqkv, *wo, *w_in, *w_out;   // block rows: [q; k; v], attention out, [gate; up], down
    int32_t qkv_type, wo_type, in_type, out_type;
    const float *qkv_bias;                     // (q_size + 2 kv_size) or NULL
    const float *q_norm, *k_norm;              // (head_dim) or NULL
    const float *post_attn_norm, *post_mlp_norm;  // (dim) or NULL
    int64_t window;                            // attends over the last `window` positions; 0: all of them
    int32_t local_rope;                        // rotates by the second (local) tables
    // a mixture of experts in place of the MLP (w_in/w_out unused): n_used of n_experts, by a float router
    int32_t n_experts, n_used, renorm, expert_in_type, expert_out_type;
    int64_t expert_ffn;
    const float *router;                       // (n_experts, dim)
    const uint8_t *const *expert_in, *const *expert_out;  // each expert's [gate; up] rows and down rows
    // an expert every token runs, scaled by sigmoid(shared_gate . h) (Qwen2-MoE); shared_ffn 0: none
    int64_t shared_ffn;
    const float *shared_gate;                  // (dim)
    const uint8_t *shared_in, *shared_out;
    int32_t shared_in_type, shared_out_type;
} llama_layer;

typedef struct {
    int64_t dim, n_heads, n_kv_heads, head_dim, ffn_dim, max_len;
    float norm_eps;
    float attn_scale, attn_softcap;            // the scores' scale (0: 1/sqrt(head_dim)); soft cap (0: none)
    int32_t gelu;                              // the gate's activation: 0 SiLU, 1 tanh-approximated GELU
} llama_dims;

static void rmsnorm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

// Hugging Face rotary layout: the two halves of a head turn together (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
static void rotate(float *v, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// Where a layer's cache keeps position p of KV head g: blocks[p / block_size] * block_stride + (p % block_size) *
// pos_stride + g * head_stride floats from its start. A paged cache's row is its blocks of the pool; a
// contiguous (n_kv_heads, max_len, head_dim) cache is one block of max_len positions.
typedef struct {
    int64_t block_size, block_stride, pos_stride, head_stride;
    const int32_t *blocks;
} kv_layout;

static inline int64_t kv_at(const kv_layout *kv, int64_t p, int64_t g) {
    return kv->blocks[p / kv->block_size] * kv->block_stride + (p % kv->block_size) * kv->pos_stride +
           g * kv->head_stride;
}

// One query head over positions first..last of its KV head g's cache rows.
static void attend(const float *q, const float *kc, const float *vc, const kv_layout *kv, int64_t g, int64_t first,
                   int64_t last, int64_t d, float scale, float softcap, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t s = first; s <= last; s++) {
        const float *k = kc + kv_at(kv, s, g);
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < d; i++) dot += q[i] * k[i];
        float v = dot * scale;
        if (softcap != 0.0f) v = tanhf(v / softcap) * softcap;
        scores[s] = v;
        top = v > top ? v : top;
    }
    float total = 0.0f;
    for (int64_t s = first; s <= last; s++) total += scores[s] = expf(scores[s] - top);
    memset(out, 0, sizeof(float) * d);
    for (int64_t s = first; s <= last; s++) {
        const float w = scores[s] / total, *v = vc + kv_at(kv, s, g);
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[i] += w * v[i];
    }
}

static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// y (dim) = the gated MLP of the activations prepared in `in` (w_in's rows [gate; up], ffn each), through
// hx (ffn) and `down`. Called by every thread of the decode step's parallel region.
static void gated_mlp(int in_type, const uint8_t *w_in, int out_type, const uint8_t *w_out, int64_t ffn,
                      int64_t dim, int gelu, const prepared *in, prepared *down, float *y, float *hx) {
    matmul_shared(in_type, w_in, 2 * ffn, in, y);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < ffn; i++) hx[i] = (gelu ? gelu_tanh(y[i]) : y[i] / (1.0f + expf(-y[i]))) * y[ffn + i];
#pragma omp single
    prepare(out_type, hx, ffn, 1, down);
    matmul_shared(out_type, w_out, dim, down, y);
}

// The router's choice for a normalised token h: the n_used experts of highest softmax probability, in order,
// with their probabilities (rescaled to sum to 1 where the family does).
static void route(const llama_layer *L, const float *h, int64_t dim, int32_t *chosen, float *weights) {
    float probs[256], top = -INFINITY, total = 0.0f;
    for (int e = 0; e < L->n_experts; e++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < dim; i++) dot += L->router[e * dim + i] * h[i];
        probs[e] = dot;
        top = dot > top ? dot : top;
    }
    for (int e = 0; e < L->n_experts; e++) total += probs[e] = expf(probs[e] - top);
    float picked = 0.0f;
    for (int j = 0; j < L->n_used; j++) {
        int best = -1;
        for (int e = 0; e < L->n_experts; e++)
            if (probs[e] >= 0.0f && (best < 0 || probs[e] > probs[best])) best = e;
        chosen[j] = best, weights[j] = probs[best] / total, picked += weights[j];
        probs[best] = -1.0f;
    }
    if (L->renorm)
        for (int j = 0; j < L->n_used; j++) weights[j] /= picked;
}

// The final RMSNorm and output layer, when the step also makes the logits.
typedef struct {
    const float *norm;
    const uint8_t *w;
    int32_t type;
    int64_t n_vocab;
} llama_head;

// x (dim) is the token's embedding in, the last block's output out. k_cache[l] / v_cache[l] are layer l's
// caches, laid out as `kv` says, holding max_len positions; the step writes position `pos` and attends over
// 0..pos (or the layer's window). cos/sin (head_dim) are the position's rotary factors, cos_local/sin_local those of the
// blocks with local tables. With a head, logits (n_vocab) are written too, in the same parallel region.
// Returns 0, or -1 for what it does not take.
int ggml_llama_decode(const llama_layer *layers, int64_t n_layers, const llama_dims *d, float *x,
                      float *const *k_cache, float *const *v_cache, const kv_layout *kv, int64_t pos,
                      const float *cos,
                      const float *sin, const float *cos_local, const float *sin_local, const llama_head *head,
                      float *logits, int threads) {
    const int64_t dim = d->dim, hd = d->head_dim, nh = d->n_heads, nkv = d->n_kv_heads;
    int64_t ffn = d->ffn_dim;  // the widest MLP, dense or expert
    if (pos < 0 || pos >= d->max_len || nh % nkv || hd % 2 || (head && !takes(head->type, dim))) return -1;
    const int64_t q_size = nh * hd, kv_size = nkv * hd;
    for (int64_t l = 0; l < n_layers; l++) {
        const llama_layer *L = layers + l;
        const int moe = L->n_experts > 0;
        if (!takes(L->qkv_type, dim) || !takes(L->wo_type, q_size) ||
            !takes(moe ? L->expert_in_type : L->in_type, dim) ||
            !takes(moe ? L->expert_out_type : L->out_type, moe ? L->expert_ffn : d->ffn_dim) || L->n_experts > 256 ||
            (moe && (L->n_used < 1 || L->n_used > L->n_experts)) ||
            (moe && L->shared_ffn && (L->shared_in_type != L->expert_in_type || !takes(L->shared_out_type, L->shared_ffn))))
            return -1;
        if (moe && L->expert_ffn > ffn) ffn = L->expert_ffn;
        if (moe && L->shared_ffn > ffn) ffn = L->shared_ffn;
    }
    const int64_t widest = q_size > ffn ? q_size : ffn;
    prepared p, p_down;  // the MLP's input stays prepared for every expert while each one's down projection runs
    float *h = malloc(sizeof(float) * (widest > dim ? widest : dim)), *acc = malloc(sizeof(float) * dim);
    float *qkv = malloc(sizeof(float) * (q_size + 2 * kv_size)), *att = malloc(sizeof(float) * q_size);
    float *y = malloc(sizeof(float) * (2 * ffn > dim ? 2 * ffn : dim)), *hx = malloc(sizeof(float) * ffn);
    float *scores = malloc(sizeof(float) * nh * (pos + 1));
    int32_t chosen[256];
    float weights[256];
    if (!h || !acc || !qkv || !att || !y || !hx || !scores || prepared_alloc(&p, widest > dim ? widest : dim, 1)) {
        free(h), free(acc), free(qkv), free(att), free(y), free(hx), free(scores);
        return -1;
    }
    if (prepared_alloc(&p_down, ffn, 1)) {
        prepared_free(&p);
        free(h), free(acc), free(qkv), free(att), free(y), free(hx), free(scores);
        return -1;
    }
    const int64_t group = nh / nkv, n = pos + 1;
    const float scale = d->attn_scale != 0.0f ? d->attn_scale : 1.0f / sqrtf((float)hd);
#pragma omp parallel num_threads(threads)
    {
    for (int64_t l = 0; l < n_layers; l++) {
        const llama_layer *L = layers + l;
        float *kc = k_cache[l], *vc = v_cache[l];
        const float *c = L->local_rope ? cos_local : cos, *s = L->local_rope ? sin_local : sin;
        const int64_t first = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0;
#pragma omp single
        {
            rmsnorm(x, L->attn_norm, dim, d->norm_eps, h);
            prepare(L->qkv_type, h, dim, 1, &p);
        }
        matmul_shared(L->qkv_type, L->wqkv, q_size + 2 * kv_size, &p, qkv);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < nh + 2 * nkv; j++) {  // query heads, key heads, then value heads
            float *v = qkv + j * hd;
            if (L->qkv_bias)
                for (int64_t i = 0; i < hd; i++) v[i] += L->qkv_bias[j * hd + i];
            if (j >= nh + nkv) {
                memcpy(vc + kv_at(kv, pos, j - nh - nkv), v, sizeof(float) * hd);
                continue;
            }
            if (L->q_norm) rmsnorm(v, j < nh ? L->q_norm : L->k_norm, hd, d->norm_eps, v);
            rotate(v, c, s, hd);
            if (j >= nh) memcpy(kc + kv_at(kv, pos, j - nh), v, sizeof(float) * hd);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < nh; j++) {
            const int64_t g = j / group;
            attend(qkv + j * hd, kc, vc, kv, g, first, pos, hd, scale, d->attn_softcap, scores + j * n,
                   att + j * hd);
        }
#pragma omp single
        prepare(L->wo_type, att, q_size, 1, &p);
        matmul_shared(L->wo_type, L->wo, dim, &p, y);
        const int moe = L->n_experts > 0;
#pragma omp single
        {
            if (L->post_attn_norm) rmsnorm(y, L->post_attn_norm, dim, d->norm_eps, y);
            for (int64_t i = 0; i < dim; i++) x[i] += y[i];
            rmsnorm(x, L->mlp_norm, dim, d->norm_eps, h);
            prepare(moe ? L->expert_in_type : L->in_type, h, dim, 1, &p);
            if (moe) {
                route(L, h, dim, chosen, weights);
                memset(acc, 0, sizeof(float) * dim);
            }
        }
        if (moe) {  // the picked experts in turn, each summed in by its weight as the PyTorch model does
            for (int32_t j = 0; j < L->n_used; j++) {
                gated_mlp(L->expert_in_type, L->expert_in[chosen[j]], L->expert_out_type, L->expert_out[chosen[j]],
                          L->expert_ffn, dim, d->gelu, &p, &p_down, y, hx);
#pragma omp single
                for (int64_t i = 0; i < dim; i++) acc[i] += y[i] * weights[j];
            }
            if (L->shared_ffn) {  // prepared for the experts' type: the shared expert's blocks must match it
                gated_mlp(L->shared_in_type, L->shared_in, L->shared_out_type, L->shared_out, L->shared_ffn, dim,
                          d->gelu, &p, &p_down, y, hx);
#pragma omp single
                {
                    float dot = 0.0f;
                    for (int64_t i = 0; i < dim; i++) dot += L->shared_gate[i] * h[i];
                    const float gate = 1.0f / (1.0f + expf(-dot));
                    for (int64_t i = 0; i < dim; i++) acc[i] += gate * y[i];
                }
            }
#pragma omp single
            for (int64_t i = 0; i < dim; i++) x[i] += acc[i];
            continue;
        }
        gated_mlp(L->in_type, L->w_in, L->out_type, L->w_out, d->ffn_dim, dim, d->gelu, &p, &p_down, y, hx);
#pragma omp single
        {
            if (L->post_mlp_norm) rmsnorm(y, L->post_mlp_norm, dim, d->norm_eps, y);
            for (int64_t i = 0; i < dim; i++) x[i] += y[i];
        }
    }
    if (head) {
#pragma omp single
        {
            rmsnorm(x, head->norm, dim, d->norm_eps, h);
            prepare(head->type, h, dim, 1, &p);
        }
        matmul_shared(head->type, head->w, head->n_vocab, &p, logits);
    }
    }
    prepared_free(&p), prepared_free(&p_down);
    free(h), free(acc), free(qkv), free(att), free(y), free(hx), free(scores);
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// Q6_K or Q4_K rows -> Q8_0 rows, at load, for a fused layer whose parts differ in type (Q4_K_M's q/k/v where
// v is Q6_K). Bit-exact with gguf's dequantization followed by camelid's quantize_q8_0 (d = amax / 127, q = x / d
// rounded half away from zero), ten times faster than the two.
// A Q6_K block: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, then the f16 scale d.
static void q6_k_block(const uint8_t *blk, float *y) {
    const uint8_t *ql = blk, *qh = blk + 128;
    const int8_t *sc = (const int8_t *)(blk + 192);
    const float d = f16(blk + 208);
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = (d * sc[is]) * q1;
            y[l + 32] = (d * sc[is + 2]) * q2;
            y[l + 64] = (d * sc[is + 4]) * q3;
            y[l + 96] = (d * sc[is + 6]) * q4;
        }
    }
}

static void q4_k_block(const uint8_t *blk, float *y) {
    uint8_t scm[16];
    _mm_storeu_si128((__m128i *)scm, q4k_scales(blk + 4));
    const float d = f16(blk), dmin = f16(blk + 2);
    const uint8_t *qs = blk + 16;
    for (int j = 0; j < 4; j++, qs += 32, y += 64) {
        const float d1 = d * scm[2 * j], m1 = dmin * scm[8 + 2 * j];
        const float d2 = d * scm[2 * j + 1], m2 = dmin * scm[8 + 2 * j + 1];
        for (int l = 0; l < 32; l++) y[l] = d1 * (qs[l] & 15) - m1, y[l + 32] = d2 * (qs[l] >> 4) - m2;
    }
}

static void q8_0_block(const float *x, uint8_t *out) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const __m512 a0 = _mm512_abs_ps(x0), a1 = _mm512_abs_ps(x1);
    const float d = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)) / 127.0f;
    const uint16_t dh = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    memcpy(out, &dh, 2);
    if (d == 0.0f) {
        memset(out + 2, 0, QK);
        return;
    }
    const __m512 dv = _mm512_set1_ps(d), half = _mm512_set1_ps(0.5f);
    for (int h = 0; h < 2; h++) {  // |x / d| + 0.5 rounded down, with x's sign: half away from zero
        const __m512 q = _mm512_div_ps(h ? x1 : x0, dv);
        const __m512 r = _mm512_roundscale_ps(_mm512_add_ps(_mm512_abs_ps(q), half), _MM_FROUND_TO_NEG_INF);
        const __m512i v = _mm512_cvttps_epi32(r);
        const __m512i signed_v = _mm512_mask_sub_epi32(v, _mm512_cmplt_ps_mask(q, _mm512_setzero_ps()),
                                                       _mm512_setzero_si512(), v);
        _mm_storeu_si128((__m128i *)(out + 2 + 16 * h), _mm512_cvtepi32_epi8(signed_v));
    }
}

// Rows of Q4_0, Q8_0, Q4_K or Q6_K blocks as the file has them -> float (n, k): a quantized token embedding's
// lookup, once a token (numpy through gguf took a few tenths of a millisecond of a 20 ms decode step).
int ggml_dequantize_rows(int type, const uint8_t *w, int64_t n, int64_t k, float *out) {
    if ((type == Q6K || type == Q4K) ? k % 256 : (type != 2 && type != 8) || k % QK) return -1;
    const int64_t rb = row_bytes_of(type, k);
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + r * rb;
        float *y = out + r * k;
        if (type == Q6K || type == Q4K) {
            for (int64_t s = 0; s < k / 256; s++) (type == Q6K ? q6_k_block : q4_k_block)(row + s * (type == Q6K ? 210 : 144), y + 256 * s);
            continue;
        }
        for (int64_t b = 0; b < k / QK; b++) {
            const uint8_t *blk = row + b * (type == 8 ? 34 : 18);
            const float d = f16(blk);
            for (int j = 0; j < QK; j++)
                y[b * QK + j] = type == 8 ? d * (float)(int8_t)blk[2 + j]
                                          : d * (float)(((j < 16 ? blk[2 + j] : blk[2 + j - 16] >> 4) & 15) - 8);
        }
    }
    return 0;
}

int ggml_k_to_q8_0(int type, const uint8_t *w, int64_t n, int64_t k, uint8_t *out, int threads) {
    if (k % 256 || (type != Q6K && type != Q4K)) return -1;
    const int64_t nb = k / 256, bytes = type == Q6K ? 210 : 144;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float y[256];
        for (int64_t b = 0; b < nb; b++) {
            (type == Q6K ? q6_k_block : q4_k_block)(w + (r * nb + b) * bytes, y);
            for (int j = 0; j < 8; j++) q8_0_block(y + j * QK, out + r * (k / QK) * 34 + (b * 8 + j) * 34);
        }
    }
    return 0;
}

// Q4_0 (type 2), Q4_1 (3), IQ4_NL (20) or IQ4_XS (23) block rows -> the repacked rows the kernels above read:
// each field of every block together (per row all scales, [all mins,] then all nibble bytes; the same size).
// At load, straight from the file's pages.
int ggml_split_rows(int type, const uint8_t *src, int64_t n, int64_t nb, uint8_t *dst, int threads) {
    static const int q4_0[] = {2, 16, 0}, q4_1[] = {2, 2, 16, 0}, iq4_xs[] = {2, 2, 4, 128, 0};
    const int *fields = type == 2 || type == 20 ? q4_0 : type == 3 ? q4_1 : type == 23 ? iq4_xs : NULL;
    if (!fields) return -1;
    int64_t bb = 0;
    for (const int *f = fields; *f; f++) bb += *f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *s = src + r * nb * bb;
        uint8_t *d = dst + r * nb * bb;
        int64_t at = 0;  // the field's offset inside a block
        for (const int *f = fields; *f; at += *f, f++)
            for (int64_t b = 0; b < nb; b++) memcpy(d + at * nb + *f * b, s + b * bb + at, *f);
    }
    return 0;
}
