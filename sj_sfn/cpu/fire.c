/* One-pass CPU fire of a stateless SFN step from rest (float32, inference only).
 *
 * The same float32 operations in the same order as sj_sfn.functional.fast_fire (and so as the
 * reference sj_sfn.functional.multi_threshold_fire), fused into one loop: one read of the input,
 * one write of the spike. Compiled with IEEE semantics (no fast-math, no multiply-add contraction)
 * so that every result equals torch's bit for bit, the sign of zero included. (-fno-trapping-math, which
 * lets the loops vectorise, only drops the promise of FP exception flags; values, NaN and signed zeros
 * are unchanged.)
 *
 * The input is a strided 4-D view h[n0, n1, n2, n3] (element strides hs); the output is written
 * contiguous in the same logical order, or over the input itself (out == h). Thresholds (scaled θ+, θ- and the cap) are read with their
 * own 4-D element strides ts (0 along every dimension for a per-tensor threshold), so per-channel
 * thresholds of any layout need no copy.
 *
 * Modes (flags):
 *   SELECT      signed, one branch per element: s = h >= 0 ? θ+ : -θ-,
 *               o = s·clip(floor(h/s + r), 0, N) + 0     (or o = s·T[h/s] + 0 with a table)
 *   otherwise   o = θ+·min(clip(floor(h/θ+ + r), 0, N), cap)        (or θ+·min(T[h/θ+], cap))
 *               signed: o = o - θ-·clip(floor(-(h/θ-) + r), 0, N)   (or o + θ-·T-[h/θ-])
 * T[u] = table[(bits(u) >> shift) & mask] (sj_sfn.functional.level_table), or, for the float levels
 * y = (1 + j/2^m)·2^e (sj_sfn.functional.float_levels) with a dyadic offset r, the same function computed
 * from the bits (FLOAT): the level of |u| is 0 below the first edge 1 - r, 1 below 1, and else
 * min(|u| + r·ulp_m(|u|) truncated to m mantissa bits, y_top) (one integer add and mask: no gather).
 * With subnormal levels j/2^m below 1 (SUBNORMAL), the level of |u| < 1 is j/2^m with t = |u|·2^m (exact),
 * j = floor(t) + (t - floor(t) >= 1 - r) (both exact): the comparison with the edges (j - r)/2^m, bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SJ_SELECT 1
#define SJ_TABLE 2
#define SJ_CAP 4
#define SJ_NEG 8
#define SJ_TABLE_NEG 16
#define SJ_FLOAT 32
#define SJ_SUBNORMAL 64

/* A level function u -> T[u]: a table, or the float levels (see above). */
typedef struct {
    const float *table;
    int32_t shift;
    uint32_t mask;
    float first_edge, top, pos, neg; /* pos/neg: the sign factor of each half (1, -1 or 0) */
    uint32_t add, trunc;
    float sub, inv_sub, sub_edge; /* subnormal levels: 2^m, 2^-m and 1 - r */
} Lookup;

int sj_sfn_abi_version(void) { return 6; }

static inline float clip(float x, float hi) {
    /* torch.clamp(x, 0, hi): NaN and -0 pass through */
    x = x < 0.0f ? 0.0f : x;
    return x > hi ? hi : x;
}

static inline float minimum(float x, float c) {
    /* torch.minimum(x, c): NaN in either operand gives NaN */
    if (c != c) return c;
    return x > c ? c : x;
}

static inline float lookup(float u, const Lookup *t) {
    uint32_t bits;
    memcpy(&bits, &u, sizeof bits);
    return t->table[(bits >> t->shift) & t->mask];
}

static inline float float_level(float u, const Lookup *t, const int subnormal) {
    const float a = fabsf(u);
    uint32_t bits;
    memcpy(&bits, &a, sizeof bits);
    /* u is a quotient, so a NaN is quiet (bits >= 0x7FC00000): it becomes the plain quiet NaN, which the add below
     * cannot carry out of NaN and the truncation keeps (m >= 1; m = 0 keeps the table) */
    bits = bits < 0x7FC00000u ? bits : 0x7FC00000u;
    bits = (bits + t->add) & t->trunc;
    float rounded;
    memcpy(&rounded, &bits, sizeof rounded);
    float low; /* the level of a < 1 */
    if (subnormal) {
        const float s = a * t->sub, k = floorf(s);
        low = (k + (s - k >= t->sub_edge ? 1.0f : 0.0f)) * t->inv_sub;
    } else {
        low = a < t->first_edge ? 0.0f : 1.0f;
    }
    /* from the top edge on, rounded >= y_top (the rounding is monotone and gives y_top at that edge): one min, no
     * compare with the edge; a NaN passes (FirePlan checks the whole level function against the table before use) */
    float y = a < 1.0f ? low : (rounded > t->top ? t->top : rounded);
    uint32_t sign;
    memcpy(&sign, &u, sizeof sign);
    /* the half by the sign bit (-0 is on the negative half, as in the table); + 0: a level 0 is +0 on both halves */
    return ((sign >> 31) ? t->neg : t->pos) * y + 0.0f;
}

#define LEVEL(F, u, t) (((F) & SJ_FLOAT) ? float_level((u), (t), (F) & SJ_SUBNORMAL) : lookup((u), (t)))

typedef struct {
    const float *tp, *tn, *cap;
    float r, n_max;
    const Lookup *pos, *neg;
} Params;

/* The spike of one element x with its thresholds (tp, -tn or tn, cap at the same position). */
static inline __attribute__((always_inline)) float fire_one(
    const int flags, const float x, const float tp, const float *restrict tnp, const float *restrict cpp,
    const float r, const float n, const Lookup *lp, const Lookup *ln) {
    if (flags & SJ_SELECT) {
        const float ntn = -*tnp; /* loaded unconditionally: the select becomes a blend */
        const float s = x >= 0.0f ? tp : ntn;
        const float u = x / s;
        const float k = (flags & SJ_TABLE) ? LEVEL(flags, u, lp) : clip(floorf(u + r), n);
        return k * s + 0.0f;
    }
    const float u = x / tp;
    float k = (flags & SJ_TABLE) ? LEVEL(flags, u, lp) : clip(floorf(u + r), n);
    if (flags & SJ_CAP) k = minimum(k, *cpp);
    float y = k * tp;
    if (flags & SJ_TABLE_NEG) {
        const float tn = *tnp;
        y = y + LEVEL(flags, x / tn, ln) * tn;
    } else if (flags & SJ_NEG) {
        const float tn = *tnp;
        const float w = clip(floorf(-(x / tn) + r), n);
        y = y - w * tn;
    }
    return y;
}

/* One run of `len` elements along the last dimension; `ts` the threshold stride along it (0 or k).
 * The spike goes to o[j] (contiguous), or, with INPLACE, over the input itself (h[j·hs]). */
static inline __attribute__((always_inline)) void run(
    const int flags, const int inplace, const float *restrict h, const int64_t hs, float *restrict o,
    const int64_t len, const Params *p, const int64_t toff, const int64_t ts) {
    const float r = p->r, n = p->n_max;
    const float *restrict tpp = p->tp + toff;
    const float *restrict tnp = p->tn ? p->tn + toff : tpp; /* tpp: a valid address the SELECT load may read */
    const float *restrict cpp = p->cap ? p->cap + toff : tpp;
    const Lookup lp = p->pos ? *p->pos : (Lookup){0}, ln = p->neg ? *p->neg : (Lookup){0};
    if (inplace) {
        float *io = (float *)h; /* one pointer read and written at the same index: no aliasing between lanes */
        for (int64_t j = 0; j < len; ++j)
            io[j * hs] = fire_one(flags, io[j * hs], tpp[j * ts], tnp + j * ts, cpp + j * ts, r, n, &lp, &ln);
    } else {
        for (int64_t j = 0; j < len; ++j)
            o[j] = fire_one(flags, h[j * hs], tpp[j * ts], tnp + j * ts, cpp + j * ts, r, n, &lp, &ln);
    }
}

/* Specialised copies of run() for every mode, with contiguous fast loops. */
#define SJ_RUN_AS(F, IP)                                                           \
    do {                                                                           \
        if (hs3 == 1 && ts3 == 0) run((F), (IP), h, 1, o, len, p, toff, 0);        \
        else if (hs3 == 1 && ts3 == 1) run((F), (IP), h, 1, o, len, p, toff, 1);   \
        else run((F), (IP), h, hs3, o, len, p, toff, ts3);                         \
    } while (0)
#define SJ_RUN(F)                                                                  \
    do {                                                                           \
        if (inplace) SJ_RUN_AS(F, 1);                                              \
        else SJ_RUN_AS(F, 0);                                                      \
    } while (0)

#define SJ_MODES(X)                                                                                        \
    X(SJ_SELECT | SJ_NEG) X(SJ_SELECT | SJ_NEG | SJ_TABLE) X(SJ_SELECT | SJ_NEG | SJ_TABLE | SJ_FLOAT)          \
    X(0) X(SJ_CAP) X(SJ_CAP | SJ_NEG) /* signed without a cap is always SELECT */                             \
    X(SJ_TABLE) X(SJ_TABLE | SJ_CAP) X(SJ_TABLE | SJ_NEG | SJ_TABLE_NEG) X(SJ_TABLE | SJ_CAP | SJ_NEG | SJ_TABLE_NEG) \
    X(SJ_TABLE | SJ_FLOAT) X(SJ_TABLE | SJ_CAP | SJ_FLOAT) X(SJ_TABLE | SJ_NEG | SJ_TABLE_NEG | SJ_FLOAT)      \
    X(SJ_TABLE | SJ_CAP | SJ_NEG | SJ_TABLE_NEG | SJ_FLOAT)                                                  \
    X(SJ_SELECT | SJ_NEG | SJ_TABLE | SJ_FLOAT | SJ_SUBNORMAL) X(SJ_TABLE | SJ_FLOAT | SJ_SUBNORMAL)              \
    X(SJ_TABLE | SJ_CAP | SJ_FLOAT | SJ_SUBNORMAL) X(SJ_TABLE | SJ_NEG | SJ_TABLE_NEG | SJ_FLOAT | SJ_SUBNORMAL)  \
    X(SJ_TABLE | SJ_CAP | SJ_NEG | SJ_TABLE_NEG | SJ_FLOAT | SJ_SUBNORMAL)

static void dispatch(int flags, int inplace, const float *h, int64_t hs3, float *o, int64_t len, const Params *p, int64_t toff, int64_t ts3) {
#define SJ_CASE(F) case (F): SJ_RUN(F); break;
    switch (flags) {
        SJ_MODES(SJ_CASE)
    default: break; /* rejected by sj_sfn_fire_f32 */
    }
#undef SJ_CASE
}

static int valid_flags(int flags) {
#define SJ_VALID(F) case (F): return 1;
    switch (flags) {
        SJ_MODES(SJ_VALID)
    default: return 0;
    }
#undef SJ_VALID
}

/* Elements [start, end) of the logical order, walked run by run along the last dimension. */
static void span(int flags, int inplace, const float *h, const int64_t *n, const int64_t *hs, float *out, const int64_t *ts,
                 const Params *p, int64_t start, int64_t end) {
    int64_t i3 = start % n[3], q = start / n[3];
    int64_t i2 = q % n[2];
    q /= n[2];
    int64_t i1 = q % n[1], i0 = q / n[1];
    int64_t idx = start;
    while (idx < end) {
        int64_t len = n[3] - i3;
        if (len > end - idx) len = end - idx;
        const int64_t hoff = i0 * hs[0] + i1 * hs[1] + i2 * hs[2] + i3 * hs[3];
        const int64_t toff = i0 * ts[0] + i1 * ts[1] + i2 * ts[2] + i3 * ts[3];
        dispatch(flags, inplace, h + hoff, hs[3], inplace ? 0 : out + idx, len, p, toff, ts[3]);
        idx += len;
        i3 = 0;
        if (++i2 == n[2]) {
            i2 = 0;
            if (++i1 == n[1]) {
                i1 = 0;
                ++i0;
            }
        }
    }
}

/* Returns 0 on success, -1 for an unknown mode. `threads` <= 1 (or a small input) runs serially.
 * out == h fires in place: every spike overwrites its input element (h must not overlap itself). */
int sj_sfn_fire_f32(const float *h, const int64_t *n, const int64_t *hs, float *out,
                    const float *tp, const float *tn, const float *cap, const int64_t *ts,
                    int flags, float max_spikes, float offset, const Lookup *pos, const Lookup *neg,
                    int threads, int64_t min_per_thread) {
    if (!valid_flags(flags)) return -1;
    if ((flags & SJ_TABLE) && !pos) return -1;
    if ((flags & SJ_TABLE_NEG) && !neg) return -1;
    Params p = {tp, tn, cap, offset, max_spikes, pos, neg};
    const int inplace = out == h;
    const int64_t total = n[0] * n[1] * n[2] * n[3];
    if (total <= 0) return 0;
    int nt = threads;
    if (min_per_thread > 0 && (int64_t)nt > total / min_per_thread) nt = (int)(total / min_per_thread);
    if (nt <= 1) {
        span(flags, inplace, h, n, hs, out, ts, &p, 0, total);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        const int64_t id = omp_get_thread_num(), k = omp_get_num_threads();
        span(flags, inplace, h, n, hs, out, ts, &p, total * id / k, total * (id + 1) / k);
    }
#else
    span(flags, inplace, h, n, hs, out, ts, &p, 0, total);
#endif
    return 0;
}

/* Every argument of sj_sfn_fire_f32 but the input, the output and the thread count: bound once per
 * node and input layout, so that a call passes four values instead of fifteen. */
typedef struct {
    int64_t n[4], hs[4], ts[4];
    const float *tp, *tn, *cap;
    const Lookup *pos, *neg;
    int64_t min_per_thread;
    int32_t flags;
    float max_spikes, offset;
} Bound;

int sj_sfn_fire_bound(const float *h, float *out, const Bound *b, int threads) {
    return sj_sfn_fire_f32(h, b->n, b->hs, out, b->tp, b->tn, b->cap, b->ts, b->flags, b->max_spikes, b->offset,
                           b->pos, b->neg, threads, b->min_per_thread);
}
