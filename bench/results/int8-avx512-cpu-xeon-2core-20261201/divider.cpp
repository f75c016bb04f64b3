#include <immintrin.h>
#include <chrono>
#include <cstdio>
template<class F> double t(F f){ double best=1e9; for(int k=0;k<5;k++){auto a=std::chrono::steady_clock::now(); f(); auto b=std::chrono::steady_clock::now(); double d=std::chrono::duration<double,std::nano>(b-a).count(); if(d<best)best=d;} return best;}
__attribute__((target("avx512f"),noinline)) float z(long n){ __m512 a[8]; for(int i=0;i<8;i++)a[i]=_mm512_set1_ps(1.5f+i);
 __m512 x=_mm512_set1_ps(2.f); for(long i=0;i<n;i++){ for(int j=0;j<8;j++){ a[j]=_mm512_div_ps(x,_mm512_sqrt_ps(a[j]));} } __m512 s=a[0]; for(int j=1;j<8;j++)s=_mm512_add_ps(s,a[j]); return _mm512_reduce_add_ps(s);}
__attribute__((target("avx2"),noinline)) float y(long n){ __m256 a[8]; for(int i=0;i<8;i++)a[i]=_mm256_set1_ps(1.5f+i);
 __m256 x=_mm256_set1_ps(2.f); for(long i=0;i<n;i++){ for(int j=0;j<8;j++){ a[j]=_mm256_div_ps(x,_mm256_sqrt_ps(a[j]));} } __m256 s=a[0]; for(int j=1;j<8;j++)s=_mm256_add_ps(s,a[j]); float o[8]; _mm256_storeu_ps(o,s); return o[0];}
__attribute__((noinline)) float scal(long n){ float a=1; for(long i=0;i<n*8;i++){ a = a*1.0000001f+1.f;} return a;}
int main(){ long n=1000000; volatile float r;
 double tz=t([&]{r=z(n);}), ty=t([&]{r=y(n);}), ts=t([&]{r=scal(n);});
 // scalar chain: dependent fmul+fadd latency 4+? cycles -> frequency estimate
 printf("zmm sqrt+div: %.3f ns per 16 lanes (%.3f ns/elem)\nymm sqrt+div: %.3f ns per 8 lanes (%.3f ns/elem)\nscalar mul+add chain: %.3f ns per step\n", tz/(n*8), tz/(n*8*16), ty/(n*8), ty/(n*8*8), ts/(n*8));
}
