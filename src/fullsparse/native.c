/* fullsparse's native CPU kernels (float32), built and loaded by fullsparse/native.py.
 *
 * Each kernel is the same computation as an eager PyTorch function it is tested against
 * bit for bit (tests/test_native.py); the eager function is the reference and the
 * fallback. */
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

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
#pragma omp parallel for schedule(static) if (co * k >= 32768)
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

/* grad += (W - W * S_K(W)) * lam over n values of W (rows of a length that is a multiple of
 * 4, so flat groups of 4 are a row's): the SR-STE decay of fs_fst_weight_side, added in the
 * backward from W itself instead of a tensor kept from the forward (the same bits as
 * grad.add_(decay)). */
void fs_add_fst_decay(const float *restrict w, float *restrict grad, int64_t n, float lam) {
#pragma omp parallel for schedule(static) if (n >= 32768)
    for (int64_t c = 0; c < n; c += 4096) {
        int64_t end = c + 4096 < n ? c + 4096 : n;
        for (int64_t i = c; i < end; i += 4) {
            float a0 = w[i], a1 = w[i + 1], a2 = w[i + 2], a3 = w[i + 3];
            int k0, k1, k2, k3;
            TOP2(score(a0), score(a1), score(a2), score(a3), k0, k1, k2, k3);
            grad[i] = grad[i] + (a0 - a0 * (float)k0) * lam;
            grad[i + 1] = grad[i + 1] + (a1 - a1 * (float)k1) * lam;
            grad[i + 2] = grad[i + 2] + (a2 - a2 * (float)k2) * lam;
            grad[i + 3] = grad[i + 3] + (a3 - a3 * (float)k3) * lam;
        }
    }
}

/* The same operands from cached masks (mask_interval > 1): out = W * mk, gi = W * mco (NULL:
 * not computed), decay = (W - out) * lam (NULL: not computed); masks are bools (0 or 1 bytes)
 * of W's n elements, as torch stores them. */
void fs_masked_weight_side(const float *restrict w, const unsigned char *restrict mk,
                           const unsigned char *restrict mco, float *restrict out,
                           float *restrict gi, float *restrict decay, int64_t n, float lam) {
#pragma omp parallel for schedule(static) if (n >= 32768)
    for (int64_t c = 0; c < n; c += 4096) {
        int64_t end = c + 4096 < n ? c + 4096 : n;
        for (int64_t i = c; i < end; i++)
            out[i] = w[i] * (float)mk[i];
        if (gi != NULL)
            for (int64_t i = c; i < end; i++)
                gi[i] = w[i] * (float)mco[i];
        if (decay != NULL)
            for (int64_t i = c; i < end; i++)
                decay[i] = (w[i] - out[i]) * lam;
    }
}

/* ------------------------------------------------------------------ sampled weight gradients */

/* Σ v² of n floats, in eight float lanes (vectorized), combined in double. */
static double sum_squares(const float *restrict v, int64_t n) {
    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++)
            lane[l] += v[j + l] * v[j + l];
    double total = 0.0;
    for (int l = 0; l < 8; l++)
        total += lane[l];
    for (; j < n; j++)
        total += (double)v[j] * v[j];
    return total;
}

/* out[r] = ‖dy_r‖ · ‖x_r‖ of m rows (x rows of length dx, dy rows of length ddy, each row
 * contiguous, rows `sx` / `sdy` floats apart): sampled_grad.token_scores. */
static inline float row_score(const float *x, int64_t dx, const float *dy, int64_t ddy) {
    float a = (float)sqrt(sum_squares(dy, ddy));
    float b = (float)sqrt(sum_squares(x, dx));
    return a * b;
}

/* to[0..n) = from[0..n) · f */
static inline void scaled_copy(const float *restrict from, float f, float *restrict to,
                               int64_t n) {
    for (int64_t i = 0; i < n; i++)
        to[i] = from[i] * f;
}

void fs_row_norm_products(const float *x, const float *dy, int64_t m, int64_t dx, int64_t sx,
                          int64_t ddy, int64_t sdy, float *out) {
#pragma omp parallel for schedule(static) if (m * (dx + ddy) > 65536)
    for (int64_t r = 0; r < m; r++)
        out[r] = row_score(x + r * sx, dx, dy + r * sdy, ddy);
}

/* One group's draw (sampling.keep_probabilities, then sampling.select_units): keep k of g
 * units with p_i = min(1, c·t_i), Σp = k (water-filling by repeated capping), where
 * t_i = max(s_i, 0) + mean·1e-6 + FLT_MIN; unit i is kept when one of u, u+1, …, u+k−1
 * falls in [p_0 + … + p_{i−1}, p_0 + … + p_i). Writes the kept units' positions (ascending)
 * and 1/p. Returns 0, or −1 for a non-finite score or a level that does not settle (the
 * caller then runs the eager path on the same draws). */
static int draw_group(const float *s, int64_t g, int64_t k, float u, double *t,
                      unsigned char *capped, int64_t *index, float *weight) {
    double total = 0.0;
    for (int64_t i = 0; i < g; i++) {
        float v = s[i];
        if (!isfinite(v))
            return -1;
        t[i] = v > 0.0f ? (double)v : 0.0;
        total += t[i];
        capped[i] = 0;
    }
    double shift = total / (double)g * 1e-6 + 1.1754943508222875e-38;
    for (int64_t i = 0; i < g; i++)
        t[i] += shift;
    double c = 0.0;
    int64_t n_capped = 0;
    for (int64_t pass = 0; pass <= g; pass++) {
        double rest = 0.0;
        for (int64_t i = 0; i < g; i++)
            if (!capped[i])
                rest += t[i];
        c = (double)(k - n_capped) / rest;
        int64_t grown = 0;
        for (int64_t i = 0; i < g; i++)
            if (!capped[i] && c * t[i] > 1.0) {
                capped[i] = 1;
                grown++;
            }
        n_capped += grown;
        if (n_capped >= k)
            return -1;
        if (grown == 0)
            break;
    }
    double end = 0.0;
    int64_t before = 0, out = 0;
    for (int64_t i = 0; i < g; i++) {
        double p = capped[i] ? 1.0 : c * t[i];
        end = i == g - 1 ? (double)k : end + p;
        double count = ceil(end - (double)u);
        int64_t now = count < 0.0 ? 0 : count > (double)k ? k : (int64_t)count;
        if (now > before && out < k) {
            index[out] = i;
            weight[out] = (float)(1.0 / p);
            out++;
        }
        before = now;
    }
    return out == k ? 0 : -1;
}

/* G groups of g consecutive scores, k kept of each: index [G·k] (positions in s, ascending)
 * and weight [G·k] (1/p). Returns 0, or −1 where any group could not be drawn natively. */
int fs_draw(const float *s, int64_t G, int64_t g, int64_t k, const float *u, int64_t *index,
            float *weight) {
    int failed = 0;
#pragma omp parallel if (G > 64)
    {
        double *t = malloc(sizeof(double) * g);
        unsigned char *capped = malloc(g);
        if (t == NULL || capped == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t q = 0; q < G; q++) {
                if (draw_group(s + q * g, g, k, u[q], t, capped, index + q * k,
                               weight + q * k) != 0) {
#pragma omp atomic write
                    failed = 1;
                } else {
                    for (int64_t j = 0; j < k; j++)
                        index[q * k + j] += q * g;
                }
            }
        }
        free(t);
        free(capped);
    }
    return failed ? -1 : 0;
}

/* Kept row j of group q (index[j] its position in the group, made its row number here)
 * copied: x's as is, dy's times weight[j]. */
static void copy_kept(const float *x, const float *dy, int64_t g, int64_t dx, int64_t sx,
                      int64_t ddy, int64_t sdy, int64_t q, int64_t j, int64_t *index,
                      const float *weight, float *x_out, float *dy_out) {
    const int64_t row = q * g + index[j];
    scaled_copy(dy + row * sdy, weight[j], dy_out + j * ddy, ddy);
    memcpy(x_out + j * dx, x + row * sx, sizeof(float) * (size_t)dx);
    index[j] = row;
}

/* fs_draw_rows with one whole group (m / g == 1): every thread scores rows, one draws, every
 * thread copies kept rows (a group too large for one thread's pass). */
static int draw_rows_one_group(const float *x, const float *dy, int64_t g, int64_t k,
                               int64_t dx, int64_t sx, int64_t ddy, int64_t sdy, float u,
                               int64_t *index, float *weight, float *x_out, float *dy_out,
                               int64_t work) {
    double *t = malloc(sizeof(double) * g);
    unsigned char *capped = malloc(g);
    float *s = malloc(sizeof(float) * g);
    int failed = t == NULL || capped == NULL || s == NULL;
    if (!failed) {
#pragma omp parallel if (work > 65536)
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < g; i++)
                s[i] = row_score(x + i * sx, dx, dy + i * sdy, ddy);
#pragma omp single
            failed = draw_group(s, g, k, u, t, capped, index, weight) != 0;
            if (!failed) {
#pragma omp for schedule(static)
                for (int64_t j = 0; j < k; j++)
                    copy_kept(x, dy, g, dx, sx, ddy, sdy, 0, j, index, weight, x_out, dy_out);
            }
        }
    }
    free(t);
    free(capped);
    free(s);
    return failed;
}

/* fs_draw_rows over G groups: a thread scores, draws and copies one group at a time. */
static int draw_rows_groups(const float *x, const float *dy, int64_t G, int64_t g, int64_t k,
                            int64_t dx, int64_t sx, int64_t ddy, int64_t sdy, const float *u,
                            int64_t *index, float *weight, float *x_out, float *dy_out,
                            int64_t work) {
    int failed = 0;
#pragma omp parallel if (work > 65536)
    {
        double *t = malloc(sizeof(double) * g);
        unsigned char *capped = malloc(g);
        float *s = malloc(sizeof(float) * g);
        if (t == NULL || capped == NULL || s == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t q = 0; q < G; q++) {
                const float *xq = x + q * g * sx, *dq = dy + q * g * sdy;
                for (int64_t i = 0; i < g; i++)
                    s[i] = row_score(xq + i * sx, dx, dq + i * sdy, ddy);
                if (draw_group(s, g, k, u[q], t, capped, index + q * k, weight + q * k) != 0) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                for (int64_t j = q * k; j < q * k + k; j++)
                    copy_kept(x, dy, g, dx, sx, ddy, sdy, q, j, index, weight, x_out, dy_out);
            }
        }
        free(t);
        free(capped);
        free(s);
    }
    return failed;
}

/* fs_row_norm_products, fs_draw and fs_gather_rows in one pass, group by group, while a
 * group's rows are in cache: m rows of x [m, dx] (rows sx apart) and dy [m, ddy] (rows sdy
 * apart) in G = m / g groups of g; group q's scores ‖dy_r‖·‖x_r‖, its k kept rows drawn with
 * uniform u[q] and copied to rows q·k, ... of x_out [., dx] and dy_out [., ddy] (dy's times
 * 1/p); the rows after the last whole group kept as they are (weight 1) after them. index
 * and weight as fs_draw's, then the tail's rows. Returns 0, or −1 where a group could not
 * be drawn natively (a non-finite score: the caller runs the separate calls instead). One
 * whole group (G = 1, fst_is_batch's draw) is scored and copied by every thread. */
int fs_draw_rows(const float *x, const float *dy, int64_t m, int64_t g, int64_t k, int64_t dx,
                 int64_t sx, int64_t ddy, int64_t sdy, const float *u, int64_t *index,
                 float *weight, float *x_out, float *dy_out) {
    const int64_t G = m / g, tail = m - G * g, work = m * (dx + ddy);
    if (index == NULL || weight == NULL) { /* the caller wants the kept rows only */
        const size_t rows = (size_t)(G * k + tail);
        int64_t *own_index = malloc(sizeof(int64_t) * (rows ? rows : 1));
        float *own_weight = malloc(sizeof(float) * (rows ? rows : 1));
        int failed = own_index == NULL || own_weight == NULL
                         ? -1
                         : fs_draw_rows(x, dy, m, g, k, dx, sx, ddy, sdy, u, own_index,
                                        own_weight, x_out, dy_out);
        free(own_index);
        free(own_weight);
        return failed;
    }
    int failed = G == 1 ? draw_rows_one_group(x, dy, g, k, dx, sx, ddy, sdy, u[0], index, weight,
                                              x_out, dy_out, work)
                        : draw_rows_groups(x, dy, G, g, k, dx, sx, ddy, sdy, u, index, weight,
                                           x_out, dy_out, work);
    for (int64_t r = 0; r < tail; r++) { /* the partial group: kept whole, weight 1 */
        const int64_t j = G * k + r, row = G * g + r;
        index[j] = row;
        weight[j] = 1.0f;
        scaled_copy(dy + row * sdy, 1.0f, dy_out + j * ddy, ddy);
        memcpy(x_out + j * dx, x + row * sx, sizeof(float) * (size_t)dx);
    }
    return failed ? -1 : 0;
}

/* dst row j = src row index[j] (rows of `len` floats, `stride` apart in src), times
 * scale[j] when scale is not NULL: index_select(0, index).mul_(scale[:, None]). */
void fs_gather_rows(const float *src, int64_t len, int64_t stride, const int64_t *index,
                    const float *scale, int64_t n, float *dst) {
#pragma omp parallel for schedule(static) if (n * len > 65536)
    for (int64_t j = 0; j < n; j++) {
        const float *restrict from = src + index[j] * stride;
        float *restrict to = dst + j * len;
        if (scale == NULL)
            memcpy(to, from, sizeof(float) * len);
        else
            scaled_copy(from, scale[j], to, len);
    }
}

/* column_squares for a width w with 4 <= w <= WM (WM a multiple of 8): the WM sums live in
 * registers. Every row but the last is read WM floats wide (its columns, then the first
 * WM - w <= w of the next row's, whose sums are dropped); the last one w wide. Each column
 * adds its squares in row order, as the loop below does: the same bits. */
#define FS_NARROW_COLUMN_SQUARES(WM)                                                         \
    static void column_squares_##WM(const float *restrict v, int64_t rows, int64_t w,        \
                                    float *restrict col) {                                   \
        float acc[WM];                                                                       \
        for (int j = 0; j < WM; j++)                                                         \
            acc[j] = 0.0f;                                                                   \
        for (int64_t r = 0; r + 1 < rows; r++) {                                             \
            const float *restrict row = v + r * w;                                           \
            for (int j = 0; j < WM; j++)                                                     \
                acc[j] += row[j] * row[j];                                                   \
        }                                                                                    \
        const float *restrict last = v + (rows - 1) * w;                                     \
        for (int64_t j = 0; j < w; j++)                                                      \
            col[j] = acc[j] + last[j] * last[j];                                             \
    }
FS_NARROW_COLUMN_SQUARES(8)
FS_NARROW_COLUMN_SQUARES(16)
FS_NARROW_COLUMN_SQUARES(32)

/* Column sums of squares of one sample [rows, w] into col[w] (float lanes, as the eager
 * float32 sum). */
static void column_squares(const float *restrict v, int64_t rows, int64_t w, float *restrict col) {
    if (rows > 0 && w >= 4 && w <= 8) {
        column_squares_8(v, rows, w, col);
        return;
    }
    if (rows > 0 && w >= 8 && w <= 16) {
        column_squares_16(v, rows, w, col);
        return;
    }
    if (rows > 0 && w >= 16 && w <= 32) {
        column_squares_32(v, rows, w, col);
        return;
    }
    for (int64_t j = 0; j < w; j++)
        col[j] = 0.0f;
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict row = v + r * w;
        for (int64_t j = 0; j < w; j++)
            col[j] += row[j] * row[j];
    }
}

/* The scores of the column-block units 2s + q (sampled_grad.block_scores) of x [n, rx, w] and
 * dy [n, rdy, wo]: per sample, the input's column sums of squares zero-padded by pw; the
 * window sum of output column j over its kw taps (j·sw + t·dw in the padded input); then
 * score[2s + q] = sqrt(Σ_{j ≡ q} dY's column sum j · Σ_{j ≡ q} window j). */
void fs_block_scores(const float *x, const float *dy, int64_t n, int64_t rx, int64_t w,
                     int64_t rdy, int64_t wo, int64_t kw, int64_t sw, int64_t dw, int64_t pw,
                     float *out) {
#pragma omp parallel for schedule(static) if (n * (rx * w + rdy * wo) > 65536)
    for (int64_t s = 0; s < n; s++) {
        float *col = malloc(sizeof(float) * (size_t)(w + wo + 1));
        if (col == NULL) { /* NaN scores: the draw then keeps both units for sure */
            out[2 * s] = out[2 * s + 1] = NAN;
            continue;
        }
        float *dcol = col + w;
        column_squares(x + s * rx * w, rx, w, col);
        column_squares(dy + s * rdy * wo, rdy, wo, dcol);
        float dsum[2] = {0.0f, 0.0f}, wsum[2] = {0.0f, 0.0f};
        for (int64_t j = 0; j < wo; j++) {
            float window = 0.0f;
            for (int64_t t = 0; t < kw; t++) {
                int64_t c = j * sw + t * dw - pw;
                window += (c >= 0 && c < w) ? col[c] : 0.0f;
            }
            dsum[j & 1] += dcol[j];
            wsum[j & 1] += window;
        }
        out[2 * s] = sqrtf(dsum[0] * wsum[0]);
        out[2 * s + 1] = sqrtf(dsum[1] * wsum[1]);
        free(col);
    }
}

/* One row's columns start, start + 1, ... (0 outside [0, w)) into to[out_w]: the input of a
 * column-block product, shifted for the odd windows (a padding where start < 0, a crop
 * where the row is shorter). */
static void shifted_row(const float *restrict row, int64_t w, int64_t start, int64_t out_w,
                        float *restrict to) {
    int64_t lo = start >= 0 ? 0 : -start;
    int64_t hi = w - start;
    hi = hi > out_w ? out_w : (hi < 0 ? 0 : hi);
    lo = lo > hi ? hi : lo;
    for (int64_t c = 0; c < lo; c++)
        to[c] = 0.0f;
    memcpy(to + lo, row + start + lo, sizeof(float) * (size_t)(hi - lo));
    for (int64_t c = hi; c < out_w; c++)
        to[c] = 0.0f;
}

/* The operands of the column-block products (sampled_grad._block_operands) in one pass:
 * kept unit units[j] = 2s + q of x [n, rx, w] and dy [n, rdy, wo], weight scale[j] (1/p).
 * Units of parity q go, in order, to the q-th products: dy's columns q, q + 2, ... times
 * scale[j] into dyq [., rdy, cq] (c0 = ceil(wo/2), c1 = floor(wo/2)); the input as it is into
 * x0 [., rx, w] (even), or shifted by `left` (zero-padded, or cropped where left < 0) to
 * width w1 into x1 [., rx, w1] (odd). Returns 0, or -1 where the slot buffer cannot be had
 * (nothing written). */
int64_t fs_gather_blocks(const float *x, int64_t rx, int64_t w, const float *dy, int64_t rdy,
                         int64_t wo, const int64_t *units, const float *scale, int64_t m,
                         int64_t left, int64_t w1, float *x0, float *dy0, float *x1,
                         float *dy1) {
    int64_t *slot = malloc(sizeof(int64_t) * (size_t)(m > 0 ? m : 1));
    if (slot == NULL)
        return -1;
    int64_t count[2] = {0, 0};
    for (int64_t j = 0; j < m; j++)
        slot[j] = count[units[j] & 1]++;
    const int64_t c0 = (wo + 1) / 2, c1 = wo / 2;
#pragma omp parallel for schedule(static) if (m * (rx * w + rdy * wo) > 65536)
    for (int64_t j = 0; j < m; j++) {
        const int64_t s = units[j] >> 1, k = slot[j];
        const float f = scale[j];
        const float *restrict xs = x + s * rx * w;
        const float *restrict ds = dy + s * rdy * wo;
        const int64_t q = units[j] & 1, cq = q ? c1 : c0;
        if (q == 0)
            memcpy(x0 + k * rx * w, xs, sizeof(float) * (size_t)(rx * w));
        else
            for (int64_t r = 0; r < rx; r++)
                shifted_row(xs + r * w, w, -left, w1, x1 + (k * rx + r) * w1);
        float *restrict to = (q ? dy1 : dy0) + k * rdy * cq;
        for (int64_t r = 0; r < rdy; r++) { /* dY's columns q, q + 2, ... times 1/p */
            const float *restrict row = ds + r * wo + q;
            float *restrict out = to + r * cq;
            for (int64_t c = 0; c < cq; c++)
                out[c] = row[2 * c] * f;
        }
    }
    free(slot);
    return 0;
}

/* How many of the units are odd (the column-block products' second parity). */
int64_t fs_count_odd(const int64_t *units, int64_t m) {
    int64_t odd = 0;
    for (int64_t j = 0; j < m; j++)
        odd += units[j] & 1;
    return odd;
}

/* ------------------------------------------------------------------ call counts, rand_half */

/* AdaptiveState.count (sampling): one call, `kept` of `total` units, added to the slots calls
 * (1), kept_units (4) and total_units (5) of a float64 state, as index_add_ adds them. */
void fs_count(double *state, double kept, double total) {
    state[1] = state[1] + 1.0;
    state[4] = state[4] + kept;
    state[5] = state[5] + total;
}

/* rand_half's operand (sampled_grad, a convolution): the columns phase, phase + 2, ... of each
 * of the `rows` rows of width w of t, contiguous in out (rows of (w - phase + 1) / 2), and
 * whether a column of the other phase holds a NaN or an infinity (1) or not (0). */
int fs_half_columns(const float *t, int64_t rows, int64_t w, int64_t phase, float *out) {
    const int64_t kept = (w - phase + 1) / 2, other = 1 - phase;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (rows * w > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict src = t + r * w;
        float *restrict dst = out + r * kept;
        float probe = 0.0f; /* x - x: 0 for a finite x, NaN for NaN and +-inf */
        for (int64_t j = 0; j < kept; j++)
            dst[j] = src[phase + 2 * j];
        for (int64_t j = other; j < w; j += 2)
            probe += src[j] - src[j];
        bad |= probe != 0.0f;
    }
    return bad;
}

/* ------------------------------------------------------------------ information restoration */

/* FST's information restoration (operands.ir_grad_output) along the middle axis of t [outer,
 * size, inner]: out [outer, ceil(size/2), inner], out[o, j, i] = t[o, 2j, i] + alpha·t[o, 2j+1, i]
 * as one fused multiply-add (what torch's add_(other, alpha=alpha) computes on a CPU with FMA;
 * for alpha 1 and 0 the same value either way), the last even position alone when size is
 * odd. alpha 0: the even positions. */
void fs_ir_half(const float *t, int64_t outer, int64_t size, int64_t inner, float alpha,
                float *out) {
    const int64_t pairs = size / 2, half = (size + 1) / 2;
    if (inner == 1) { /* a convolution's columns: one row of `size` per (n, c, h) */
#pragma omp parallel for schedule(static) if (outer * size > 65536)
        for (int64_t o = 0; o < outer; o++) {
            const float *restrict src = t + o * size;
            float *restrict dst = out + o * half;
            if (alpha == 0.0f)
                for (int64_t j = 0; j < pairs; j++)
                    dst[j] = src[2 * j];
            else
                for (int64_t j = 0; j < pairs; j++)
                    dst[j] = fmaf(src[2 * j + 1], alpha, src[2 * j]);
            if (size & 1)
                dst[pairs] = src[size - 1];
        }
        return;
    }
#pragma omp parallel for schedule(static) if (outer * size * inner > 65536)
    for (int64_t r = 0; r < outer * half; r++) { /* output row r = (o, j) */
        const int64_t o = r / half, j = r % half;
        const float *restrict even = t + (o * size + 2 * j) * inner;
        float *restrict dst = out + r * inner;
        if (2 * j + 1 == size || alpha == 0.0f) {
            memcpy(dst, even, sizeof(float) * (size_t)inner);
        } else {
            const float *restrict odd = even + inner;
            for (int64_t i = 0; i < inner; i++)
                dst[i] = fmaf(odd[i], alpha, even[i]);
        }
    }
}

/* ------------------------------------------------------------------ MVUE (fst_mvue) */

static inline float maxf_(float a, float b) { return a > b ? a : b; }
static inline float minf_(float a, float b) { return a < b ? a : b; }

/* One group's MVUE (estimators.mvue_planes with estimators._planar_terms), the same
 * float32 operations in the same order, for four finite entries and uniform u; straight-line
 * and branch-free so that a loop over groups vectorizes: one division per group. */
static inline float survivor(float x, float a, float inv, float size, float kept) {
    float p = a * inv;
    return (p >= 1.0f ? x : copysignf(size, x)) * kept;
}

static inline void mvue_group(float x0, float x1, float x2, float x3, float u, float *y0,
                              float *y1, float *y2, float *y3) {
    const float tiny = 1.17549435e-38f;
    float a0 = fabsf(x0), a1 = fabsf(x1), a2 = fabsf(x2), a3 = fabsf(x3);
    float total = ((a0 + a1) + a2) + a3;
    float top = maxf_(maxf_(a0, a1), maxf_(a2, a3));
    float on = 2.0f * top > total ? 1.0f : 0.0f;
    float den = maxf_((total - top) * on + total * (1.0f - on), tiny);
    float inv = (2.0f - on) / den, size = den * (1.0f - 0.5f * (1.0f - on));
    float p0 = minf_(a0 * inv, 1.0f), p1 = minf_(a1 * inv, 1.0f);
    float p2 = minf_(a2 * inv, 1.0f), p3 = minf_(a3 * inv, 1.0f);
    float u1 = u + 1.0f;
    float e0 = 0.0f + p0, e1 = e0 + p1, e2 = e1 + p2, e3 = e2 + p3;
    /* entry k is kept when u or u + 1 enters [e_{k-1}, e_k) */
    int n0 = u < e0, n1 = u < e1, n2 = u < e2, n3 = u < e3;
    int m0 = u1 < e0, m1 = u1 < e1, m2 = u1 < e2, m3 = u1 < e3;
    float k0 = (float)(n0 | m0), k1 = (float)((n1 ^ n0) | (m1 ^ m0));
    float k2 = (float)((n2 ^ n1) | (m2 ^ m1)), k3 = (float)((n3 ^ n2) | (m3 ^ m2));
    *y0 = survivor(x0, a0, inv, size, k0);
    *y1 = survivor(x1, a1, inv, size, k1);
    *y2 = survivor(x2, a2, inv, size, k2);
    *y3 = survivor(x3, a3, inv, size, k3);
}

/* The uniforms of the MVUE: two keyed rounds of a bijective 32-bit integer hash of the
 * group's counter (mod 2^32), its top 24 bits as a float in [0, 1) — the same values as
 * estimators.mvue_uniforms computes with torch integer ops. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

static inline float uniform_at(uint32_t counter, uint32_t k0, uint32_t k1) {
    return (float)(mix32(mix32(counter ^ k0) ^ k1) >> 8) * 0x1p-24f;
}

/* 1 where the sum of |x| is not finite: a NaN or an infinity among the four, or (rarely) a
 * sum of finite values that overflows; either way the caller runs the eager path, which
 * defines the result. One test per group instead of four. */
static inline int not_finite_sum(float x0, float x1, float x2, float x3) {
    float total = ((fabsf(x0) + fabsf(x1)) + fabsf(x2)) + fabsf(x3);
    return total * 0.0f != 0.0f;
}

/* Full groups of 4 rows (r, r + post, r + 2·post, r + 3·post) of length post; group q's
 * counter is c0 + q·step. */
__attribute__((noinline)) static int mvue_rows(const float *restrict r0, const float *restrict r1,
                     const float *restrict r2, const float *restrict r3, uint32_t c0,
                     uint32_t step, uint32_t k0, uint32_t k1, float *restrict d0,
                     float *restrict d1, float *restrict d2, float *restrict d3, int64_t post) {
    int bad = 0;
    for (int64_t q = 0; q < post; q++) {
        float x0 = r0[q], x1 = r1[q], x2 = r2[q], x3 = r3[q];
        bad |= not_finite_sum(x0, x1, x2, x3);
        float u = uniform_at(c0 + (uint32_t)q * step, k0, k1);
        mvue_group(x0, x1, x2, x3, u, d0 + q, d1 + q, d2 + q, d3 + q);
    }
    return bad;
}

/* Groups of 4 adjacent entries (post = 1): n full groups, counters c0, c0 + 1, … */
__attribute__((noinline)) static int mvue_adjacent(const float *restrict src, uint32_t c0,
                         uint32_t k0, uint32_t k1, float *restrict dst, int64_t n) {
    int bad = 0;
    for (int64_t g = 0; g < n; g++) {
        float x0 = src[4 * g], x1 = src[4 * g + 1], x2 = src[4 * g + 2], x3 = src[4 * g + 3];
        bad |= not_finite_sum(x0, x1, x2, x3);
        float u = uniform_at(c0 + (uint32_t)g, k0, k1);
        mvue_group(x0, x1, x2, x3, u, dst + 4 * g, dst + 4 * g + 1, dst + 4 * g + 2,
                   dst + 4 * g + 3);
    }
    return bad;
}

/* A last group of fewer than 4 rows, zero-padded; counters as mvue_rows'. */
static int mvue_partial(const float *src, uint32_t c0, uint32_t step, uint32_t k0, uint32_t k1,
                        float *dst, int64_t post, int64_t count) {
    int bad = 0;
    for (int64_t q = 0; q < post; q++) {
        float x[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[4];
        for (int64_t k = 0; k < count; k++) {
            x[k] = src[k * post + q];
            bad |= x[k] * 0.0f != 0.0f;
        }
        mvue_group(x[0], x[1], x[2], x[3], uniform_at(c0 + (uint32_t)q * step, k0, k1), y,
                   y + 1, y + 2, y + 3);
        for (int64_t k = 0; k < count; k++)
            dst[k * post + q] = y[k];
    }
    return bad;
}

/* MVUE of t [outer, pre, size, post] along its size axis in groups of 4 (a last partial
 * group zero-padded): out has t's shape. Group (o, p, g, q)'s uniform is drawn from the
 * counter ((p·outer + o)·post + q)·G + g (G = ceil(size/4)), i.e. the order
 * (pre, outer, post, group): with outer = N, pre = C, post = 1 that is the order of a
 * per-channel row over (n, h, w) — S_T's layout — read in place from NCHW.
 * Returns 0, or -1 if t holds a NaN or an infinity (the caller then runs the eager path,
 * which defines what those give), with out unspecified. */
int fs_mvue(const float *t, uint32_t k0, uint32_t k1, float *out, int64_t outer, int64_t pre,
            int64_t size, int64_t post) {
    int64_t groups = (size + 3) / 4, full = size / 4, rows = outer * pre;
    int bad = 0;
    if (post == 1) {
#pragma omp parallel for schedule(static) reduction(| : bad) if (rows * size >= 65536)
        for (int64_t r = 0; r < rows; r++) {
            int64_t o = r / pre, p = r % pre;
            uint32_t c0 = (uint32_t)((p * outer + o) * groups);
            const float *src = t + r * size;
            float *dst = out + r * size;
            bad |= mvue_adjacent(src, c0, k0, k1, dst, full);
            if (full < groups)
                bad |= mvue_partial(src + 4 * full, c0 + (uint32_t)full, 1u, k0, k1,
                                    dst + 4 * full, 1, size - 4 * full);
        }
        return bad ? -1 : 0;
    }
#pragma omp parallel for schedule(static) reduction(| : bad) if (rows * size * post >= 65536)
    for (int64_t r = 0; r < rows * groups; r++) {
        int64_t row = r / groups, g = r % groups, first = 4 * g;
        int64_t o = row / pre, p = row % pre;
        uint32_t c0 = (uint32_t)((p * outer + o) * post * groups + g), step = (uint32_t)groups;
        const float *src = t + (row * size + first) * post;
        float *dst = out + (row * size + first) * post;
        if (g < full)
            bad |= mvue_rows(src, src + post, src + 2 * post, src + 3 * post, c0, step, k0, k1,
                             dst, dst + post, dst + 2 * post, dst + 3 * post, post);
        else
            bad |= mvue_partial(src, c0, step, k0, k1, dst, post, size - first);
    }
    return bad ? -1 : 0;
}

/* MVUE of t [size, post] along size (size a multiple of 4), the draws and values of
 * fs_mvue(t, k0, k1, ·, 1, 1, size, post), written compressed for the 2:4 products
 * (spmm24.c): entry j of column q at vals[j·vj + q] / idx[j·vj + q] (j < size/2), as
 * fs_compress24 of the result read as [post, size]. One pass: each group of 4 rows goes
 * through a small buffer that stays in the cache. Returns 0, or -1 if t holds a NaN or an
 * infinity (vals / idx are then unspecified; the caller runs the eager path). */
int fs_compress24_group(const float *src, int64_t R, int64_t sk, int32_t base, float *v,
                        int32_t *c, int64_t vj);

#define FS_BLOCK 256
int fs_mvue_packed(const float *t, uint32_t k0, uint32_t k1, float *vals, int32_t *idx,
                   int64_t size, int64_t post, int64_t vj) {
    int64_t groups = size / 4;
    int bad = 0;
#pragma omp parallel for schedule(static) reduction(| : bad) if (size * post >= 65536)
    for (int64_t g = 0; g < groups; g++) {
        float buf[4 * FS_BLOCK];
        const float *src = t + 4 * g * post;
        for (int64_t q0 = 0; q0 < post; q0 += FS_BLOCK) {
            int64_t n = post - q0 < FS_BLOCK ? post - q0 : FS_BLOCK;
            bad |= mvue_rows(src + q0, src + post + q0, src + 2 * post + q0, src + 3 * post + q0,
                             (uint32_t)(g + q0 * groups), (uint32_t)groups, k0, k1, buf,
                             buf + FS_BLOCK, buf + 2 * FS_BLOCK, buf + 3 * FS_BLOCK, n);
            fs_compress24_group(buf, n, FS_BLOCK, (int32_t)(4 * g), vals + 2 * g * vj + q0,
                                idx + 2 * g * vj + q0, vj);
        }
    }
    return bad ? -1 : 0;
}
