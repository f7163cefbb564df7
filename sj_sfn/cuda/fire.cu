// Fused multi-step forward of the Multi-Threshold (MTN) and Scale-and-Fire (SFN) neurons.
//
// Per element i of one time step (n elements per step), over t = 0..T-1:
//     h   = v + x[t, i]                                  (float32 membrane)
//     k+  = clip(floor(h / θ+ + r), 0, N)                uniform levels
//         = #{j : e_j <= h / θ+}                         custom levels y_1 < ... < y_N, edges
//                                                        e_j = y_j - r·(y_j - y_{j-1}) (host-computed)
//     k+  = min(k+, max(1, cap)),  cap = floor(c / θ+) or #{j : y_j <= c / θ+}   with a ceiling c
//     k-  = same with -h / θ-                            signed sites only
//     o   = θ+ · y(k+) - θ- · y(k-)                      y(k) = k (uniform), y(0) = 0
//     v   = h - o
// A NaN h gives NaN o and v (with any levels) and a count of 0.
// writes o (in the input dtype), optionally the signed count k+ - k- (int8), the membrane of
// every step, and the final v. The membrane stays in a register; x is read once and every
// output written once. θ± are the scaled thresholds λ·θ±, per tensor (index 0) or per channel
// (channel = (i / inner) % C). Every float operation is IEEE round-to-nearest without
// flush-to-zero or contraction, so the result equals the float32 torch reference bit for bit.
//
// Template parameters (one compiled kernel per combination, thresholds/λ/N are arguments):
//     DT           input/output dtype: 0 = float32, 1 = float16, 2 = bfloat16
//     SIGNED       negative branch present
//     PER_CHANNEL  thresholds indexed by channel
//     LEVELS       custom (non-uniform) levels
//     ONE_STEP     T == 1 (no time loop)

// Exact IEEE float32 operations written as PTX instructions: round to nearest, no
// flush-to-zero and no multiply-add contraction, whatever flags the compiler is given (CuPy
// always adds -ftz=true). A host build (tests) defines SJ_SFN_HOST and provides its own.
#ifndef SJ_SFN_HOST
__device__ __forceinline__ float f_add(float a, float b) { float r; asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_sub(float a, float b) { float r; asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_mul(float a, float b) { float r; asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_div(float a, float b) { float r; asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }
__device__ __forceinline__ float f_floor(float a) { float r; asm("cvt.rmi.f32.f32 %0, %1;" : "=f"(r) : "f"(a)); return r; }
__device__ __forceinline__ float f16_to_f32(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short f32_to_f16(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#endif

// -x by flipping the sign bit (exact for every input, denormals included)
__device__ __forceinline__ float f_neg(float a) { return __uint_as_float(__float_as_uint(a) ^ 0x80000000u); }

template <int DT> struct io;

template <> struct io<0> {
    typedef float storage;
    static __device__ __forceinline__ float load(const storage* p, long long i) { return __ldg(p + i); }
    static __device__ __forceinline__ void store(storage* p, long long i, float f) { p[i] = f; }
};

template <> struct io<1> {
    typedef unsigned short storage;
    static __device__ __forceinline__ float load(const storage* p, long long i) { return f16_to_f32(__ldg(p + i)); }
    static __device__ __forceinline__ void store(storage* p, long long i, float f) { p[i] = f32_to_f16(f); }
};

template <> struct io<2> {
    typedef unsigned short storage;
    static __device__ __forceinline__ float load(const storage* p, long long i) {
        return __uint_as_float(((unsigned int)__ldg(p + i)) << 16);
    }
    static __device__ __forceinline__ void store(storage* p, long long i, float f) {
        // round to nearest even, canonical NaN (as torch's float -> bfloat16)
        unsigned int u = __float_as_uint(f);
        unsigned short b;
        if (f != f) {
            b = 0x7FC0;
        } else {
            b = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
        p[i] = b;
    }
};

// Count of the branch for the normalised potential u: clip(floor(u), 0, N) or #{j : y_j <= u}.
// Comparisons (not fminf/fmaxf) so that NaN propagates as in torch.clamp. With custom levels a
// NaN u gives a NaN count too (the search alone would give 0), so o and v are NaN on every path.
template <bool LEVELS>
__device__ __forceinline__ float branch_count(float u, float n_max, const float* __restrict__ levels, int n_levels) {
    if (LEVELS) {
        if (u != u) return u;
        int lo = 0, hi = n_levels;
        while (lo < hi) {
            int mid = (lo + hi) >> 1;
            if (__ldg(levels + mid) <= u) lo = mid + 1; else hi = mid;
        }
        return (float)lo;
    } else {
        float k = f_floor(u);
        k = k < 0.0f ? 0.0f : k;
        k = k > n_max ? n_max : k;
        return k;
    }
}

template <bool LEVELS>
__device__ __forceinline__ float level_value(float k, const float* __restrict__ levels) {
    if (LEVELS) {
        if (k != k) return k;  // NaN count: NaN value (never an index)
        int j = (int)k;
        return j == 0 ? 0.0f : __ldg(levels + j - 1);
    } else {
        return k;
    }
}

template <int DT, bool SIGNED, bool PER_CHANNEL, bool LEVELS, bool ONE_STEP>
__global__ void sj_sfn_fire(
    const typename io<DT>::storage* __restrict__ x_seq,  // [T, n]
    const float* __restrict__ v_in,                       // [n]
    typename io<DT>::storage* __restrict__ spike_seq,     // [T, n]
    float* __restrict__ v_out,                            // [n]
    signed char* __restrict__ count_seq,                  // [T, n] or NULL
    float* __restrict__ v_seq,                            // [T, n] or NULL
    const float* __restrict__ theta_pos,                  // [C] or [1], or NULL: use theta_pos_value
    float theta_pos_value,
    const float* __restrict__ theta_neg,                  // [C] or [1] (SIGNED)
    const float* __restrict__ levels,                     // [2N] (LEVELS): y_1..y_N, then the edges e_1..e_N
    const float* __restrict__ ceiling,                    // [1] or NULL
    float offset,
    int max_spikes,
    long long n,
    int steps,
    long long inner,
    int channels)
{
    const float n_max = (float)max_spikes;
    const int T = ONE_STEP ? 1 : steps;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        long long c = 0;
        if (PER_CHANNEL) {
            // 32-bit division when every index fits (much cheaper than 64-bit on the GPU)
            c = n <= 0x7fffffffLL ? (long long)(((unsigned int)i / (unsigned int)inner) % (unsigned int)channels)
                                  : (i / inner) % channels;
        }
        const float tp = theta_pos != NULL ? __ldg(theta_pos + c) : theta_pos_value;
        float tn = 0.0f;
        if (SIGNED) tn = __ldg(theta_neg + c);
        float cap = 0.0f;
        if (ceiling != NULL) {
            const float u_cap = f_div(__ldg(ceiling), tp);
            cap = LEVELS ? branch_count<LEVELS>(u_cap, n_max, levels, max_spikes) : f_floor(u_cap);
            cap = cap < 1.0f ? 1.0f : cap;
        }
        float v = __ldg(v_in + i);
        const float* __restrict__ edges = LEVELS ? levels + max_spikes : levels;
        #pragma unroll 4
        for (int t = 0; t < T; ++t) {
            const long long j = (long long)t * n + i;
            const float h = f_add(v, io<DT>::load(x_seq, j));
            const float up = LEVELS ? f_div(h, tp) : f_add(f_div(h, tp), offset);
            float kp = branch_count<LEVELS>(up, n_max, edges, max_spikes);
            if (ceiling != NULL) kp = kp > cap ? cap : kp;
            float o = f_mul(tp, level_value<LEVELS>(kp, levels));
            float k = kp;
            if (SIGNED) {
                const float un = LEVELS ? f_div(f_neg(h), tn) : f_add(f_div(f_neg(h), tn), offset);
                const float kn = branch_count<LEVELS>(un, n_max, edges, max_spikes);
                o = f_sub(o, f_mul(tn, level_value<LEVELS>(kn, levels)));
                k = f_sub(kp, kn);
            }
            v = f_sub(h, o);
            io<DT>::store(spike_seq, j, o);
            // a NaN count (NaN potential) is written as 0, as the reference does (float -> int of NaN is undefined)
            if (count_seq != NULL) count_seq[j] = k != k ? (signed char)0 : (signed char)(int)k;
            if (v_seq != NULL) v_seq[j] = v;
        }
        v_out[i] = v;
    }
}
