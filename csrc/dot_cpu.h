// Vectorised float32 row loops with double accumulation, shared by the C++ CPU kernels (defined in flowcut_cpu.cpp,
// cloned for AVX2 and AVX-512 where the compiler supports it, the clone picked at load time by the CPU).
#pragma once

#include <cstdint>

namespace flowcut {

// x[0..n) . y[0..n) of contiguous float32 x, accumulated in 8 double lanes (each product exact in double).
double dot_f32(const float* x, const double* y, int64_t n);

// acc[0..n) += x[0..n) of contiguous float32 x.
void add_f32(const float* x, double* acc, int64_t n);

}  // namespace flowcut
