/* Linear layer: C = A W^T + b, optionally followed by tanh-GELU.
 *
 * Mirrors tinylazy.ops.linear_forward (act = 0) and
 * tinylazy.ops.gelu_tanh_forward(tinylazy.ops.linear_forward(...)) (act = 1).
 *
 * Inputs   A     (M, K)  row-major activations, any M and K
 *          Wt    (K, Np) the packed weight: W^T of the official (N, K) weight, columns
 *                        zero-padded to Np = roundup(N, 16) (tinylazy.opencl.PackedLinear)
 *          bias  (Np)    zero-padded like Wt
 * Output   C     (M, N)  row-major
 * Layout   one work-item computes a 6 x 16 register tile, rows 6*gid(1)..+5 and columns
 *          16*gid(0)..+15: per k it loads two float8 of row k of Wt, broadcasts six
 *          elements of A and does 12 vector multiply-adds (the AVX2 micro-kernel shape:
 *          12 accumulators + 2 operands + 1 broadcast = 15 of 16 registers).
 *          A work-group of 4 x 16 work-items covers a 96 x 64 block of C and walks K in
 *          chunks of KC together: the barrier after each chunk carries no data, it keeps
 *          the group on the same chunk, so the chunk's 96 x KC of A and KC x 64 of Wt are
 *          reused from cache by every work-item (on a CPU, PoCL runs the work-items of a
 *          group one after another between barriers; on a GPU they share the L1).
 * Edges    rows past M are clamped for loads and never stored; columns past N read the
 *          zero padding and are not stored; work-items wholly outside C only take part in
 *          the barriers.  So no size needs to be a multiple of a tile.
 * Storage  built with -DHALF_WEIGHTS, Wt holds IEEE half floats (as phone GPUs store
 *          weights, half the memory and bandwidth), widened to float32 on load with
 *          vload_half8 (core OpenCL 1.2, no cl_khr_fp16 needed); arithmetic stays float32.
 */
#define TM 6
#define TN 16
#define KC 128
#ifdef HALF_WEIGHTS
typedef half wtype;
#define LOADW8(p) vload_half8(0, p)
#else
typedef float wtype;
#define LOADW8(p) LOAD8(p)
#endif

#define GELU_K 0.7978845608028654f   /* sqrt(2 / pi) */
#define GELU_C 0.044715f

float8 gelu_tanh8(float8 x)
{
    return 0.5f * x * (1.0f + tanh(GELU_K * (x + GELU_C * x * x * x)));
}

void store_row(__global float* c, const int n0, const int N, float8 v0, float8 v1, const int act)
{
    if (act == 1) {
        v0 = gelu_tanh8(v0);
        v1 = gelu_tanh8(v1);
    }
    if (n0 + TN <= N && (N & 7) == 0) {
        STORE8(c + n0, v0);
        STORE8(c + n0 + 8, v1);
    } else {
        float r[TN] = {v0.s0, v0.s1, v0.s2, v0.s3, v0.s4, v0.s5, v0.s6, v0.s7,
                       v1.s0, v1.s1, v1.s2, v1.s3, v1.s4, v1.s5, v1.s6, v1.s7};
        for (int j = 0; j < TN && n0 + j < N; j++)
            c[n0 + j] = r[j];
    }
}

__kernel __attribute__((reqd_work_group_size(4, 16, 1)))
void linear(const int M, const int N, const int K, const int Np,
            __global const float* restrict A, __global const wtype* restrict Wt,
            __global const float* restrict bias, __global float* restrict C, const int act)
{
    const int n0 = get_global_id(0) * TN;
    const int m0 = get_global_id(1) * TM;
    const int active = m0 < M && n0 < Np;
    const __global float* a0 = A + (m0 + 0 < M ? m0 + 0 : M - 1) * K;
    const __global float* a1 = A + (m0 + 1 < M ? m0 + 1 : M - 1) * K;
    const __global float* a2 = A + (m0 + 2 < M ? m0 + 2 : M - 1) * K;
    const __global float* a3 = A + (m0 + 3 < M ? m0 + 3 : M - 1) * K;
    const __global float* a4 = A + (m0 + 4 < M ? m0 + 4 : M - 1) * K;
    const __global float* a5 = A + (m0 + 5 < M ? m0 + 5 : M - 1) * K;
    float8 c00 = 0.0f, c01 = 0.0f, c10 = 0.0f, c11 = 0.0f, c20 = 0.0f, c21 = 0.0f;
    float8 c30 = 0.0f, c31 = 0.0f, c40 = 0.0f, c41 = 0.0f, c50 = 0.0f, c51 = 0.0f;
    for (int kb = 0; kb < K; kb += KC) {
        if (active) {
            const int ke = kb + KC < K ? kb + KC : K;
            const __global wtype* w = Wt + kb * Np + n0;
            for (int k = kb; k < ke; k++, w += Np) {
                const float8 w0 = LOADW8(w), w1 = LOADW8(w + 8);
                float a;
                a = a0[k]; c00 += a * w0; c01 += a * w1;
                a = a1[k]; c10 += a * w0; c11 += a * w1;
                a = a2[k]; c20 += a * w0; c21 += a * w1;
                a = a3[k]; c30 += a * w0; c31 += a * w1;
                a = a4[k]; c40 += a * w0; c41 += a * w1;
                a = a5[k]; c50 += a * w0; c51 += a * w1;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (!active)
        return;
    const float8 b0 = LOAD8(bias + n0), b1 = LOAD8(bias + n0 + 8);
    __global float* c = C + m0 * N;
    store_row(c, n0, N, c00 + b0, c01 + b1, act);
    if (m0 + 1 < M) store_row(c + 1 * N, n0, N, c10 + b0, c11 + b1, act);
    if (m0 + 2 < M) store_row(c + 2 * N, n0, N, c20 + b0, c21 + b1, act);
    if (m0 + 3 < M) store_row(c + 3 * N, n0, N, c30 + b0, c31 + b1, act);
    if (m0 + 4 < M) store_row(c + 4 * N, n0, N, c40 + b0, c41 + b1, act);
    if (m0 + 5 < M) store_row(c + 5 * N, n0, N, c50 + b0, c51 + b1, act);
}
