// Shared by the int4 GEMV's sources: one weight of a (possibly fused) GEMV, its blocks numbered across
// weights, per-thread buffers, and the per-ISA kernels int4_gemv.cpp dispatches to (each reads the packing
// aten makes under its capability).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace unwrap_cpu {

// One weight: its packed bytes, its [K/g, N, 2] scales, its rows, where its rows start in y.
template <typename T> struct Weight {
  const uint8_t* packed;
  const T* scale_and_zero;
  int64_t n, offset;
};

// `count` values of a buffer this thread keeps for its later calls (`Slot` tells a call's buffers apart):
// grown, never shrunk, not zeroed (every caller writes what it reads). Allocating and zeroing a GEMV's ~10
// std::vectors at every call was ~3 % of a SmolLM2 token's CPU time in `perf` (malloc, free, memset),
// on the thread that runs the token's serial work.
template <typename U, int Slot> U* scratch(size_t count) {
  thread_local std::vector<U> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

// The full blocks of a (possibly fused) GEMV's weights numbered as one range, which the threads split:
// global block b is block b - first[weight(b)] of weights[weight(b)].
struct BlockIndex {
  const int64_t* first;  // first[i]: weight i's first global block; first[count]: every weight's blocks
  size_t count;

  template <typename T>
  BlockIndex(const std::vector<Weight<T>>& weights, int64_t rows_per_block) : count(weights.size()) {
    int64_t* starts = scratch<int64_t, 0>(count + 1);  // this thread's; the threads only read it
    starts[0] = 0;
    for (size_t i = 0; i < count; ++i) starts[i + 1] = starts[i] + weights[i].n / rows_per_block;
    first = starts;
  }
  int64_t total() const { return first[count]; }
  size_t weight(int64_t block) const { return std::upper_bound(first, first + count + 1, block) - first - 1; }
};

// The kernel that reads this process's packing (int4_gemv.cpp): "avx512", "avx2" or "none".
const std::string& kernel_isa();

// y[w.offset + r] (in T) for the rows of every full 32-row block of every weight, in the AVX2 packing
// (int4_gemv_avx2.cpp); rows of a last partial block are left to the caller.
template <typename T>
void full_blocks_avx2(const T* x, int64_t k, int64_t group, const std::vector<Weight<T>>& weights, T* y);

// Read [begin, end) 64-byte lines from base as the AVX2 GEMV reads its weights; a checksum.
int64_t read_lines_avx2(const char* base, int64_t begin, int64_t end);

}  // namespace unwrap_cpu
