// Counter-based normal noise: Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC 2011) and the Box-Muller transform, shared by the CPU loop and the CUDA kernel
// so that both produce the same integer stream and (to rounding) the same normals.
//
// Element e of sample b at draw k (0: x_T, k >= 1: step k) is
//     normal(seed_b, k, e) = lane (e mod 4) of BoxMuller(Philox(key = seed_b, ctr = (e / 4, k)))
// so it depends on nothing else: not on the batch size, the sample's position or the device.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define ADMRT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ADMRT_HOST_DEVICE inline
#endif

namespace admrt {
namespace philox {

struct U4 {
  uint32_t x[4];
};

ADMRT_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32 with 10 rounds (Random123's philox4x32_10; Triton's tl.randint4x is the same map).
ADMRT_HOST_DEVICE U4 philox4x32_10(U4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl key increments
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(M0, ctr.x[0], hi0, lo0);
    mulhilo(M1, ctr.x[2], hi1, lo1);
    ctr = U4{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

// The four uint32 of group `group` (elements 4*group .. 4*group+3) of draw `draw` for `seed`.
ADMRT_HOST_DEVICE U4 bits(uint64_t seed, uint64_t draw, uint64_t group) {
  U4 ctr{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), static_cast<uint32_t>(draw),
          static_cast<uint32_t>(draw >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Four N(0, 1) from four uint32: uniforms u = (x + 0.5) / 2^32 in (0, 1), then Box-Muller on
// (u0, u1) and (u2, u3), computed in double and rounded to float once.
ADMRT_HOST_DEVICE void box_muller4(const U4& b, float out[4]) {
  constexpr double kInv32 = 2.3283064365386962890625e-10;  // 2^-32
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int p = 0; p < 2; ++p) {
    const double u1 = (static_cast<double>(b.x[2 * p]) + 0.5) * kInv32;
    const double u2 = (static_cast<double>(b.x[2 * p + 1]) + 0.5) * kInv32;
    const double r = sqrt(-2.0 * log(u1));
    const double a = kTwoPi * u2;
    out[2 * p] = static_cast<float>(r * cos(a));
    out[2 * p + 1] = static_cast<float>(r * sin(a));
  }
}

}  // namespace philox
}  // namespace admrt
