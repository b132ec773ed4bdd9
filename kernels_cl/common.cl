/* Helpers shared by every kernel family; tinylazy.opencl prepends this file to each source.
 *
 * VW is the vector width (1, 2, 4 or 8) of the row-wise kernels.  The host picks the
 * largest width that divides the row length, so every row, and every (B, k*D) slice of
 * an adaLN modulation buffer, starts VW-aligned and can be read with aligned vector loads.
 *
 * Loads and stores go through pointer casts rather than vloadn/vstoren: PoCL's CPU
 * driver does not inline its kernel-library builtins, and a call per load costs ~10x in
 * an inner loop.  For the same reason hot loops use operators and the ?: select, never
 * min/max/fma/mad; transcendental functions are called on whole vectors.
 */
#ifndef VW
#define VW 1
#endif

#if VW == 8
typedef float8 floatv;
#elif VW == 4
typedef float4 floatv;
#elif VW == 2
typedef float2 floatv;
#else
typedef float floatv;
#endif

#define LOADV(p) (*(const __global floatv*)(p))
#define STOREV(p, v) (*(__global floatv*)(p) = (v))
#define LOAD8(p) (*(const __global float8*)(p))
#define STORE8(p, v) (*(__global float8*)(p) = (v))

float hsum(floatv v)
{
#if VW == 8
    float4 a = v.lo + v.hi;
    return (a.x + a.z) + (a.y + a.w);
#elif VW == 4
    return (v.x + v.z) + (v.y + v.w);
#elif VW == 2
    return v.x + v.y;
#else
    return v;
#endif
}

float hsum8(float8 v)
{
    float4 a = v.lo + v.hi;
    return (a.x + a.z) + (a.y + a.w);
}

float hmax8(float8 v)
{
    float4 a = v.lo > v.hi ? v.lo : v.hi;
    float2 b = a.lo > a.hi ? a.lo : a.hi;
    return b.x > b.y ? b.x : b.y;
}
