/* The per-step update of the sampler, after the model.
 * Both kernels keep the reference's float32 rounding: every product and sum is its
 * own rounded operation (no contraction into fused multiply-adds). */
#pragma OPENCL FP_CONTRACT OFF

/* Classifier-free guidance on a [cond; uncond] batch, in place:
 *   eps = uncond + s * (cond - uncond) written to both halves, first g channels only.
 * Mirrors DiT.forward_with_cfg (the official guidance on the first 3 channels).
 * In/out   out (2 * n_half, Co, S, S) model output; n = Co*S*S per sample, ng = g*S*S.
 * Layout   gid (0, 1) = (element of the first ng, sample of the cond half); groups of 64. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void cfg_combine(const int n_half, const int n, const int ng, const float s, __global float* out)
{
    const int i = get_global_id(0), b = get_global_id(1);
    if (i >= ng)
        return;
    __global float* cond = out + b * n + i;
    __global float* uncond = out + (b + n_half) * n + i;
    const float e = *uncond + s * (*cond - *uncond);
    *cond = e;
    *uncond = e;
}

/* DDIM step with eta = 0 (ADM ddim_sample, DDIM eq. 12), all samples at one timestep:
 *   x0   = c1 * x - c2 * eps                  c1 = sqrt(1 / acp_t), c2 = sqrt(1 / acp_t - 1)
 *   eps' = (c1 * x - x0) / c2                 eps re-derived from x0, as ADM does
 *   x'   = x0 * a + b * eps'                  a = sqrt(acp_prev), b = sqrt(1 - acp_prev)
 * Mirrors tinylazy.sampling.ddim_step (eta = 0, clip_denoised = False); the float32
 * coefficients are looked up and rounded on the host exactly as the reference does.
 * Inputs   x (B, C, S, S), model_out (B, Co, S, S) with eps its first C channels
 * Outputs  x_next, pred_x0, eps_out (B, C, S, S); x_next may alias x
 * Layout   gid (0, 1) = (element within a sample, n = C*S*S; sample); groups of 64. */
__kernel __attribute__((reqd_work_group_size(64, 1, 1)))
void ddim_update(const int n, const int n_out, const float c1, const float c2, const float a,
                 const float bc, __global const float* x, __global const float* model_out,
                 __global float* x_next, __global float* pred_x0, __global float* eps_out)
{
    const int i = get_global_id(0), b = get_global_id(1);
    if (i >= n)
        return;
    const float xv = x[b * n + i], e = model_out[b * n_out + i];
    const float x0 = c1 * xv - c2 * e;
    const float e2 = (c1 * xv - x0) / c2;
    pred_x0[b * n + i] = x0;
    eps_out[b * n + i] = e2;
    x_next[b * n + i] = x0 * a + bc * e2;
}
