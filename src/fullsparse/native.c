/* fullsparse's native CPU kernels (float32), built and loaded by fullsparse/native.py.
 *
 * Each kernel is the same computation as an eager PyTorch function it is tested against
 * bit for bit (tests/test_native.py); the eager function is the reference and the
 * fallback. */
#include <math.h>
#include <stdint.h>
#include <stddef.h>

/* |x| as the 2:4 masks rank it: NaN (and +-inf) count as +inf */
static inline float score(float x) {
    float a = fabsf(x);
    return a != a ? INFINITY : a;
}

/* At least two of three. */
#define MAJ(a, b, c) (((a) & (b)) | ((c) & ((a) | (b))))

/* Keep flags of the two largest of four scores, ties to the lower index: element i is kept
 * when it wins at least two of its three duels (masks.py, _keep_top2_of_4). */
#define TOP2(s0, s1, s2, s3, k0, k1, k2, k3)                                   \
    do {                                                                       \
        int c01 = (s0) >= (s1), c02 = (s0) >= (s2), c03 = (s0) >= (s3);        \
        int c12 = (s1) >= (s2), c13 = (s1) >= (s3), c23 = (s2) >= (s3);        \
        k0 = MAJ(c01, c02, c03);                                               \
        k1 = MAJ(!c01, c12, c13);                                              \
        k2 = MAJ(!c02, !c12, c23);                                             \
        k3 = MAJ(!c03, !c13, !c23);                                            \
    } while (0)

/* S_Co of 4 rows of length k: gi = w * (2:4 down each column) */
static void columns_of_4(const float *restrict w, float *restrict gi, int64_t k) {
    const float *r0 = w, *r1 = w + k, *r2 = w + 2 * k, *r3 = w + 3 * k;
    float *g0 = gi, *g1 = gi + k, *g2 = gi + 2 * k, *g3 = gi + 3 * k;
    for (int64_t j = 0; j < k; j++) {
        float a0 = r0[j], a1 = r1[j], a2 = r2[j], a3 = r3[j];
        int k0, k1, k2, k3;
        TOP2(score(a0), score(a1), score(a2), score(a3), k0, k1, k2, k3);
        g0[j] = a0 * (float)k0;
        g1[j] = a1 * (float)k1;
        g2[j] = a2 * (float)k2;
        g3[j] = a3 * (float)k3;
    }
}

/* S_K of n values (n a multiple of 4): out = w * (2:4 along the row); decay = (w - out) * lam */
static void rows_in_4s(const float *restrict w, float *restrict out, float *restrict decay,
                       int64_t n, float lam) {
    for (int64_t i = 0; i < n; i += 4) {
        float a0 = w[i], a1 = w[i + 1], a2 = w[i + 2], a3 = w[i + 3];
        int k0, k1, k2, k3;
        TOP2(score(a0), score(a1), score(a2), score(a3), k0, k1, k2, k3);
        float o0 = a0 * (float)k0, o1 = a1 * (float)k1;
        float o2 = a2 * (float)k2, o3 = a3 * (float)k3;
        out[i] = o0;
        out[i + 1] = o1;
        out[i + 2] = o2;
        out[i + 3] = o3;
        decay[i] = (a0 - o0) * lam;
        decay[i + 1] = (a1 - o1) * lam;
        decay[i + 2] = (a2 - o2) * lam;
        decay[i + 3] = (a3 - o3) * lam;
    }
}

static void rows_in_4s_no_decay(const float *restrict w, float *restrict out, int64_t n) {
    for (int64_t i = 0; i < n; i += 4) {
        float a0 = w[i], a1 = w[i + 1], a2 = w[i + 2], a3 = w[i + 3];
        int k0, k1, k2, k3;
        TOP2(score(a0), score(a1), score(a2), score(a3), k0, k1, k2, k3);
        out[i] = a0 * (float)k0;
        out[i + 1] = a1 * (float)k1;
        out[i + 2] = a2 * (float)k2;
        out[i + 3] = a3 * (float)k3;
    }
}

/* The FST weight side of one step from W2 [co, k] (row-major, co and k multiples of 4):
 *   out   = W * S_K(W)        (2:4 along each row: the forward operand)
 *   gi    = W * S_Co(W)       (2:4 down each column in groups of 4 rows: grad_input's;
 *                              NULL: not computed)
 *   decay = (W - out) * lam   (the SR-STE term; NULL: not computed)
 * Masks multiply (x * 0 or x * 1), as the eager path does, so inf and NaN propagate alike.
 * Each block of 4 rows is read from memory once (its second pass hits the cache). */
void fs_fst_weight_side(const float *w, float *out, float *gi, float *decay,
                        int64_t co, int64_t k, float lam) {
    int64_t blocks = co / 4;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t base = 4 * b * k;
        if (gi != NULL)
            columns_of_4(w + base, gi + base, k);
        if (decay != NULL)
            rows_in_4s(w + base, out + base, decay + base, 4 * k, lam);
        else
            rows_in_4s_no_decay(w + base, out + base, 4 * k);
    }
}
