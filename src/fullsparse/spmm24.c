/* 2:4 sparse products on the CPU: Y = A · Bᵀ where B [R, K] keeps at most 2 of every 4
 * entries along K, stored compressed (two values and their column indices per group).
 *
 * Half of a dense product's multiply-adds. The kernel keeps a tile of 64 rows of A packed
 * as [k][64] (contiguous in the tile's rows), so that one kept entry b[r, k] adds
 * b[r, k]·A[tile, k] into 64 running sums of row r: one broadcast and eight 8-wide fused
 * multiply-adds from contiguous memory. The reduction axis is packed in chunks that stay in
 * the L1 cache; the running sums of a tile live in a small buffer between chunks.
 *
 * Strides are free (any of A, the compressed B and Y may be transposed views), so one kernel
 * serves the forward (Y = X·S_K(W)ᵀ), the input gradient (dX = dY·S_Co(W)) and the weight
 * gradient from a 2:4 dY (dWᵀ = Xᵀ·MVUE(dY)). The sums run in another order than a dense
 * BLAS's: the result equals a dense product of the same operands to float32 rounding, not
 * bit for bit. */

#define _POSIX_C_SOURCE 200112L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FS_VECTOR 1
#else
#define FS_VECTOR 0
#endif

#define TILE 64  /* rows of A per tile: eight vectors of eight floats */
/* reduction entries packed at a time (multiples of 4): up to 96 where a row's kept entries
 * lie side by side, 64 where they are a row stride apart (each entry its own cache line) */
#define CHUNK 96
#define CHUNK_STRIDED 64

/* 1 where the kernels were built with AVX2 and FMA (the fast form), 0 for the portable one */
int fs_spmm24_vectorized(void) { return FS_VECTOR; }

/* Which of a group's four entries are nonzero, as a 4-bit pattern: the first and the last
 * of them and how many (tables, so that random patterns cost no mispredicted branches) */
static const int8_t FIRST[16] = {0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0};
static const int8_t LAST[16] = {0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
static const int8_t COUNT[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};

/* group g of row r: b[r, 4g + q] = src[q·sk]; its two entries at out[0] / out[vj] */
static inline int compress_group(const float *src, int64_t sk, int32_t base, float *vals,
                                 int32_t *idx, int64_t vj) {
    float x[4] = {src[0], src[sk], src[2 * sk], src[3 * sk]};
    int bits = (x[0] != 0.0f) | (x[1] != 0.0f) << 1 | (x[2] != 0.0f) << 2 | (x[3] != 0.0f) << 3;
    int first = FIRST[bits], last = LAST[bits], count = COUNT[bits];
    vals[0] = x[first];
    vals[vj] = count >= 2 ? x[last] : 0.0f;
    idx[0] = base + first;
    idx[vj] = base + last;
    return count > 2;
}

#if FS_VECTOR
/* compress_group for 8 adjacent columns: x_q = b[·, 4g + q] at src + q·sk, 8 wide */
static inline int compress_group8(const float *src, int64_t sk, int32_t base, float *vals,
                                  int32_t *idx, int64_t vj) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 x0 = _mm256_loadu_ps(src), x1 = _mm256_loadu_ps(src + sk);
    __m256 x2 = _mm256_loadu_ps(src + 2 * sk), x3 = _mm256_loadu_ps(src + 3 * sk);
    __m256 n0 = _mm256_cmp_ps(x0, zero, _CMP_NEQ_UQ), n1 = _mm256_cmp_ps(x1, zero, _CMP_NEQ_UQ);
    __m256 n2 = _mm256_cmp_ps(x2, zero, _CMP_NEQ_UQ), n3 = _mm256_cmp_ps(x3, zero, _CMP_NEQ_UQ);
    __m256i count = _mm256_sub_epi32(
        _mm256_setzero_si256(),
        _mm256_add_epi32(_mm256_add_epi32(_mm256_castps_si256(n0), _mm256_castps_si256(n1)),
                         _mm256_add_epi32(_mm256_castps_si256(n2), _mm256_castps_si256(n3))));
    __m256 v0 = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_blendv_ps(x3, x2, n2), x1, n1), x0, n0);
    __m256 v1 = _mm256_blendv_ps(_mm256_blendv_ps(x1, x2, n2), x3, n3);
    __m256 two = _mm256_castsi256_ps(_mm256_cmpgt_epi32(count, _mm256_set1_epi32(1)));
    v1 = _mm256_and_ps(v1, two);
#define FS_I(k) _mm256_castsi256_ps(_mm256_set1_epi32(base + (k)))
    __m256 i0 = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_blendv_ps(FS_I(3), FS_I(2), n2), FS_I(1), n1),
                                 FS_I(0), n0);
    __m256 i1 = _mm256_blendv_ps(_mm256_blendv_ps(_mm256_blendv_ps(FS_I(0), FS_I(1), n1), FS_I(2), n2),
                                 FS_I(3), n3);
#undef FS_I
    _mm256_storeu_ps(vals, v0);
    _mm256_storeu_ps(vals + vj, v1);
    _mm256_storeu_si256((__m256i *)idx, _mm256_castps_si256(i0));
    _mm256_storeu_si256((__m256i *)(idx + vj), _mm256_castps_si256(i1));
    return !_mm256_testz_si256(_mm256_cmpgt_epi32(count, _mm256_set1_epi32(2)),
                               _mm256_set1_epi32(-1));
}
#endif

/* One group of four rows of R adjacent columns (row q at src + q·sk) compressed: entries
 * at v[0..R) / v[vj..vj + R) and c likewise, column indices base + q. Serial; returns 1 when
 * a column holds more than two nonzeros. */
int fs_compress24_group(const float *src, int64_t R, int64_t sk, int32_t base, float *v,
                        int32_t *c, int64_t vj) {
    int bad = 0;
    int64_t r = 0;
#if FS_VECTOR
    for (; r + 8 <= R; r += 8)
        bad |= compress_group8(src + r, sk, base, v + r, c + r, vj);
#endif
    for (; r < R; r++)
        bad |= compress_group(src + r, sk, base, v + r, c + r, vj);
    return bad;
}

/* Compress b [R, K] (element (r, k) at b[r·sr + k·sk]; K a multiple of 4) into vals / idx,
 * entry j of row r at r·vr + j·vj (j < K/2): group g's nonzeros in order at j = 2g, 2g + 1,
 * a missing one as value 0. Returns 0, or 1 when a group holds more than two nonzeros (b is
 * not 2:4 along K; vals / idx are then unspecified). */
int fs_compress24(const float *b, int64_t R, int64_t K, int64_t sr, int64_t sk, float *vals,
                  int32_t *idx, int64_t vr, int64_t vj) {
    int64_t G = K / 4;
    int bad = 0;
    if (sr == 1 && vr == 1) { /* columns of b side by side (dY [tokens, channels]) */
#pragma omp parallel for schedule(static) reduction(| : bad) if (R * K >= 65536)
        for (int64_t g = 0; g < G; g++)
            bad |= fs_compress24_group(b + 4 * g * sk, R, sk, (int32_t)(4 * g),
                                       vals + 2 * g * vj, idx + 2 * g * vj, vj);
        return bad;
    }
#pragma omp parallel for schedule(static) reduction(| : bad) if (R * K >= 65536)
    for (int64_t r = 0; r < R; r++)
        for (int64_t g = 0; g < G; g++)
            bad |= compress_group(b + r * sr + 4 * g * sk, sk, (int32_t)(4 * g),
                                  vals + r * vr + 2 * g * vj, idx + r * vr + 2 * g * vj, vj);
    return bad;
}

#if FS_VECTOR
/* dst[i][·] (8 rows, stride ld_dst) = column i of src's 8×8 block (8 rows, stride ld_src) */
static inline void transpose8(const float *src, int64_t ld_src, float *dst, int64_t ld_dst) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ld_src);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

/* pack[k][n] = A[m0 + n, k0 + k] for k < kc, n < TILE (rows past M are zero) */
static void pack_tile(const float *a, int64_t M, int64_t sam, int64_t sak, int64_t m0,
                      int64_t k0, int64_t kc, float *pack) {
    int64_t rows = M - m0 < TILE ? M - m0 : TILE;
    const float *base = a + m0 * sam + k0 * sak;
    if (sam == 1) {
        for (int64_t k = 0; k < kc; k++) {
            memcpy(pack + k * TILE, base + k * sak, (size_t)rows * sizeof(float));
            memset(pack + k * TILE + rows, 0, (size_t)(TILE - rows) * sizeof(float));
        }
        return;
    }
    int64_t k = 0;
#if FS_VECTOR
    if (sak == 1 && rows == TILE) {
        for (; k + 8 <= kc; k += 8)
            for (int64_t n = 0; n < TILE; n += 8)
                transpose8(base + n * sam + k, sam, pack + k * TILE + n, TILE);
    }
#endif
    for (; k < kc; k++) {
        for (int64_t n = 0; n < rows; n++)
            pack[k * TILE + n] = base[n * sam + k * sak];
        for (int64_t n = rows; n < TILE; n++)
            pack[k * TILE + n] = 0.0f;
    }
}

/* sums[0..63] (+)= Σ_j vals[j·vj]·pack[(idx[j·vj] − k0)·TILE + ·] over n entries */
static void row_sums(const float *vals, const int32_t *idx, int64_t vj, int64_t n, int64_t k0,
                     const float *pack, float *sums, int first) {
    /* the entries' columns count from the row's start, the pack from column k0: shift the
     * base once (as an integer: a pointer before an array's start is undefined in C) */
    pack = (const float *)((uintptr_t)pack - (uintptr_t)(k0 * TILE) * sizeof(float));
#if FS_VECTOR
    __m256 a0, a1, a2, a3, a4, a5, a6, a7;
    if (first) {
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _mm256_setzero_ps();
    } else {
        a0 = _mm256_loadu_ps(sums), a1 = _mm256_loadu_ps(sums + 8);
        a2 = _mm256_loadu_ps(sums + 16), a3 = _mm256_loadu_ps(sums + 24);
        a4 = _mm256_loadu_ps(sums + 32), a5 = _mm256_loadu_ps(sums + 40);
        a6 = _mm256_loadu_ps(sums + 48), a7 = _mm256_loadu_ps(sums + 56);
    }
    /* one kept entry: its value times the packed row of its column, into the 64 sums */
#define FS_ENTRY(j)                                                                          \
    do {                                                                                     \
        __m256 s_ = _mm256_broadcast_ss(vals + (j) * vj);                                    \
        const float *p_ = pack + (int64_t)idx[(j) * vj] * TILE;                              \
        a0 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_), a0);                                    \
        a1 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 8), a1);                                \
        a2 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 16), a2);                               \
        a3 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 24), a3);                               \
        a4 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 32), a4);                               \
        a5 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 40), a5);                               \
        a6 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 48), a6);                               \
        a7 = _mm256_fmadd_ps(s_, _mm256_load_ps(p_ + 56), a7);                               \
    } while (0)
    int64_t j = 0;
    /* four entries a round: the loads of the next entries issue under the last ones' sums */
    for (; j + 4 <= n; j += 4) {
        FS_ENTRY(j);
        FS_ENTRY(j + 1);
        FS_ENTRY(j + 2);
        FS_ENTRY(j + 3);
    }
    for (; j < n; j++)
        FS_ENTRY(j);
#undef FS_ENTRY
    _mm256_storeu_ps(sums, a0), _mm256_storeu_ps(sums + 8, a1);
    _mm256_storeu_ps(sums + 16, a2), _mm256_storeu_ps(sums + 24, a3);
    _mm256_storeu_ps(sums + 32, a4), _mm256_storeu_ps(sums + 40, a5);
    _mm256_storeu_ps(sums + 48, a6), _mm256_storeu_ps(sums + 56, a7);
#else
    float acc[TILE];
    for (int q = 0; q < TILE; q++)
        acc[q] = first ? 0.0f : sums[q];
    for (int64_t j = 0; j < n; j++) {
        float s = vals[j * vj];
        const float *p = pack + (int64_t)idx[j * vj] * TILE;
        for (int q = 0; q < TILE; q++)
            acc[q] += s * p[q];
    }
    memcpy(sums, acc, sizeof(acc));
#endif
}

/* Y[m0 + n, r] = sums[(r − r0)·TILE + n] (+ bias[r]) for r in [r0, r1), n < rows */
static void store_tile(float *sums, int64_t r0, int64_t r1, int64_t rows, const float *bias,
                       float *y, int64_t sym, int64_t syr, int64_t m0) {
    float *base = y + m0 * sym;
    if (bias)
        for (int64_t r = r0; r < r1; r++)
            for (int64_t n = 0; n < TILE; n++)
                sums[(r - r0) * TILE + n] += bias[r];
    int64_t r = r0;
    if (sym == 1) {
        for (; r < r1; r++)
            memcpy(base + r * syr, sums + (r - r0) * TILE, (size_t)rows * sizeof(float));
        return;
    }
#if FS_VECTOR
    if (syr == 1 && rows == TILE)
        for (; r + 8 <= r1; r += 8)
            for (int64_t n = 0; n < TILE; n += 8)
                transpose8(sums + (r - r0) * TILE + n, TILE, base + n * sym + r, sym);
#endif
    for (; r < r1; r++)
        for (int64_t n = 0; n < rows; n++)
            base[n * sym + r * syr] = sums[(r - r0) * TILE + n];
}

/* Y [M, R] = A [M, K] · Bᵀ (+ bias [R], NULL for none) for B [R, K] compressed by
 * fs_compress24 (entry j of row r at r·vr + j·vj); A's element (m, k) at a[m·sam + k·sak],
 * Y's (m, r) at y[m·sym + r·syr]. K a multiple of 4. Returns 0, or -1 when a work buffer
 * cannot be allocated. */
int fs_spmm24(const float *a, int64_t M, int64_t K, int64_t sam, int64_t sak,
              const float *vals, const int32_t *idx, int64_t vr, int64_t vj, int64_t R,
              const float *bias, float *y, int64_t sym, int64_t syr) {
    int64_t tiles = (M + TILE - 1) / TILE, split = 1, threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    /* few tiles, or a count the threads do not divide (a weight gradient's few input
     * features): share out the rows of B too, the fewest ways that give every thread the
     * same number of tasks (3 tiles on 2 threads: 6 tasks) */
    while ((tiles * split < threads || (tiles * split) % threads) && split * 8 < R)
        split++;
    int64_t per = ((R + split - 1) / split + 7) / 8 * 8, tasks = tiles * split;
    /* K in the fewest chunks of at most the limit, of equal size (192: two of 96) */
    int64_t limit = vj == 1 ? CHUNK : CHUNK_STRIDED, chunks = (K + limit - 1) / limit;
    int64_t step = ((K + chunks - 1) / chunks + 3) / 4 * 4;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (tasks > 1 && M * K * R >= 262144)
    {
        void *pack_ = NULL, *sums_ = NULL;
        int ok = posix_memalign(&pack_, 32, CHUNK * TILE * sizeof(float)) == 0 &&
                 posix_memalign(&sums_, 32, (size_t)per * TILE * sizeof(float)) == 0;
        float *pack = pack_, *sums = sums_;
        if (!ok) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tasks; t++) {
                int64_t m0 = (t / split) * TILE, r0 = (t % split) * per;
                int64_t r1 = r0 + per < R ? r0 + per : R;
                int64_t rows = M - m0 < TILE ? M - m0 : TILE;
                if (r0 >= r1)
                    continue;
                for (int64_t k0 = 0; k0 < K; k0 += step) {
                    int64_t kc = K - k0 < step ? K - k0 : step;
                    pack_tile(a, M, sam, sak, m0, k0, kc, pack);
                    for (int64_t r = r0; r < r1; r++)
                        row_sums(vals + r * vr + (k0 / 2) * vj, idx + r * vr + (k0 / 2) * vj,
                                 vj, kc / 2, k0, pack, sums + (r - r0) * TILE, k0 == 0);
                }
                store_tile(sums, r0, r1, rows, bias, y, sym, syr, m0);
            }
        }
        free(pack);
        free(sums);
    }
    return failed ? -1 : 0;
}
