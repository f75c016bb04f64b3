// A tiny standalone kernel (no torch) for tests/codegen/test_codegen_check.py: plain a*b+c float
// math, a float division and a float sqrt written with plain operators. Compiled with -fmad=true,
// nvcc contracts a*b+c into fma.rn.f32 and scripts/check_codegen.py must fail naming fma; with
// -fmad=false -prec-div=true -prec-sqrt=true it must pass (div.rn.f32, sqrt.rn.f32, no fma).
// Four floats per thread through float4, so its loads and stores are 128-bit.
__global__ void fma_probe(const float4* __restrict__ a, const float4* __restrict__ b,
                          const float4* __restrict__ c, float4* __restrict__ out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float4 x = a[i], y = b[i], z = c[i], r;
  r.x = x.x * y.x + z.x;
  r.y = x.y * y.y + z.y;
  r.z = (x.z * y.z + z.z) / (y.z + 1.0f);
  r.w = sqrtf(x.w * x.w + z.w);
  out[i] = r;
}
