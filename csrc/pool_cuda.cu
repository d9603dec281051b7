// The candidate pool on CUDA: the kernels and their tensor entry points (declared in pool.h;
// registered in pool_ops.cpp). Semantics: see pool.h; results are identical to the CPU ops.
//
// Design. One warp owns one key at a time, and lane (w % 32) owns slot w of that key: only
// the owning lane ever reads or writes a slot's stamp and phrase inside a kernel, so the
// warp needs no shared-memory or memory-ordering protocol; decisions are made with warp
// votes and shuffles. Batches (insert/refine) are split into chunks of at most
// kChunk entries launched in order; inside a chunk the entries are grouped by key: the
// warp of the first entry of each key (its "leader") applies all of that key's entries in
// index order, and different keys proceed in parallel. This gives exactly the sequential
// result. The clock is read on the device and advanced by a one-thread kernel launched
// after the chunks.
#ifdef OUROBOROS_WITH_CUDA

#include "pool.h"

// CPU-only torch wheels ship the c10/cuda headers without the generated
// cuda_cmake_macros.h (it only defines Windows export macros). Let the CI compile check,
// which uses such a wheel, include them anyway; a CUDA torch has the file and is unaffected.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace ouroboros {

int64_t cuda_runtime_build_version() { return CUDART_VERSION; }

namespace {
bool g_insert_cached_flag = false;
}  // namespace

void set_cuda_insert_cached(bool enabled) { g_insert_cached_flag = enabled; }
bool cuda_insert_cached() { return g_insert_cached_flag; }

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kChunk = 2048;  // entries per launch; their keys are staged in shared memory
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ int warp_min_int(int v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Arg-min of (stamp, slot) over the warp's candidates (a lane without one passes
// LLONG_MAX); every lane gets the slot.
__device__ __forceinline__ int warp_argmin_stamp(long long stamp, int slot) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const long long other_stamp = __shfl_xor_sync(kFull, stamp, off);
    const int other = __shfl_xor_sync(kFull, slot, off);
    if (other_stamp < stamp || (other_stamp == stamp && other < slot)) {
      stamp = other_stamp;
      slot = other;
    }
  }
  return slot;
}

// Calls fn(entry) (entry: index in the batch) for every entry of chunk positions
// [first, n) whose key is `key`, in increasing index; 32 positions are scanned per ballot.
// Uniform arguments across the warp; fn runs on all lanes.
template <typename Fn>
__device__ __forceinline__ void for_each_entry_of_key(const long long* chunk_keys,
                                                      long long key, int first, int n,
                                                      int64_t begin, int lane, Fn&& fn) {
  for (int start = first; start < n; start += kWarp) {
    const int j = start + lane;
    unsigned matches = __ballot_sync(kFull, j < n && chunk_keys[j] == key);
    while (matches) {
      const int e = start + __ffs(matches) - 1;
      matches &= matches - 1;
      fn(begin + e);
    }
  }
}

// 1 = valid phrase, 0 = padding or invalid (the CUDA op skips both; see pool.h).
template <typename T>
__device__ __forceinline__ bool phrase_usable(const T* tokens, int64_t L) {
  bool ok = true;
  for (int64_t l = 0; l < L; ++l) {
    const long long t = static_cast<long long>(tokens[l]);
    ok = ok && t >= 0 && t <= INT_MAX;
  }
  return ok;
}

template <typename T>
__device__ __forceinline__ bool same_phrase(const int32_t* stored, const T* tokens, int64_t L) {
  bool same = true;
  for (int64_t l = 0; l < L; ++l) same = same && stored[l] == static_cast<int32_t>(tokens[l]);
  return same;
}

// Warp-cooperative insert of one phrase under one key. Uniform arguments across the warp.
template <typename T>
__device__ void warp_insert(int32_t* prow, int64_t* srow, int64_t W, int64_t L,
                            const T* phrase, long long stamp, int lane) {
  int match = INT_MAX, first_empty = INT_MAX, oldest = INT_MAX;
  long long oldest_stamp = LLONG_MAX;
  for (int64_t w = lane; w < W; w += kWarp) {  // each lane visits its slots in increasing w
    const long long s = srow[w];
    if (s == 0) {
      first_empty = min(first_empty, static_cast<int>(w));
    } else {
      if (s < oldest_stamp) {  // strict: the lower slot wins ties within a lane
        oldest_stamp = s;
        oldest = static_cast<int>(w);
      }
      if (match == INT_MAX && same_phrase(prow + w * L, phrase, L)) match = static_cast<int>(w);
    }
  }
  match = warp_min_int(match);
  first_empty = warp_min_int(first_empty);
  oldest = warp_argmin_stamp(oldest_stamp, oldest);
  const int target = match != INT_MAX ? match : (first_empty != INT_MAX ? first_empty : oldest);
  if (target % kWarp == lane) {
    srow[target] = stamp;
    if (match == INT_MAX) {
      for (int64_t l = 0; l < L; ++l) prow[target * L + l] = static_cast<int32_t>(phrase[l]);
    }
  }
}

// Warp-cooperative refine of one slot of one key. Uniform arguments across the warp.
template <typename T>
__device__ void warp_refine(int32_t* prow, int64_t* srow, int64_t W, int64_t L, int slot,
                            const T* phrase, int lane) {
  const int owner = slot % kWarp;
  long long slot_stamp = lane == owner ? srow[slot] : 0;
  slot_stamp = __shfl_sync(kFull, slot_stamp, owner);
  if (slot_stamp == 0) return;  // empty slot: no-op (uniform branch)
  int duplicate = 0;
  for (int64_t w = lane; w < W; w += kWarp) {
    if (w != slot && srow[w] != 0 && same_phrase(prow + w * L, phrase, L)) duplicate = 1;
  }
  duplicate = __any_sync(kFull, duplicate);
  if (lane == owner) {
    if (duplicate) {
      srow[slot] = 0;
      for (int64_t l = 0; l < L; ++l) prow[slot * L + l] = -1;
    } else {
      for (int64_t l = 0; l < L; ++l) prow[slot * L + l] = static_cast<int32_t>(phrase[l]);
    }
  }
}

// The register-cached insert (experimental; off unless set_cuda_insert_cached(true)): for
// W <= 32 and L <= 8, the leader warp of a key loads the key's row once (lane w holds slot
// w's stamp and phrase in registers), applies all of the chunk's entries of that key with
// warp votes and shuffles only, and writes the changed slots back at the end. The default
// path instead goes to global memory twice per entry (stamps, then phrases), which chains
// the latency of a hot key's entries (a Zipf-hot key can own 10-15% of a batch).
constexpr int kCachedMaxL = 8;

template <typename T>
__device__ void warp_insert_cached(int32_t* prow, int64_t* srow, int64_t W, int64_t L,
                                   const long long* chunk_keys, long long key, int first,
                                   int n, int64_t begin, const T* tokens, long long base,
                                   int lane) {
  const bool has_slot = lane < W;
  long long stamp = has_slot ? static_cast<long long>(srow[lane]) : 0;
  int32_t held[kCachedMaxL];
#pragma unroll
  for (int l = 0; l < kCachedMaxL; ++l) held[l] = (has_slot && l < L) ? prow[lane * L + l] : -1;
  bool dirty = false;
  for_each_entry_of_key(chunk_keys, key, first, n, begin, lane, [&](int64_t entry) {
    const T* phrase = tokens + entry * L;
    if (!phrase_usable(phrase, L)) return;  // padding or invalid token: skipped (uniform)
    int32_t token[kCachedMaxL];
#pragma unroll
    for (int l = 0; l < kCachedMaxL; ++l) token[l] = l < L ? static_cast<int32_t>(phrase[l]) : 0;
    bool same = has_slot && stamp != 0;
#pragma unroll
    for (int l = 0; l < kCachedMaxL; ++l) same = same && (l >= L || held[l] == token[l]);
    const unsigned match = __ballot_sync(kFull, same);
    int target;
    if (match != 0) {
      target = __ffs(match) - 1;  // phrases of a key are distinct: at most one
    } else {
      const unsigned empty = __ballot_sync(kFull, has_slot && stamp == 0);
      target = empty != 0 ? __ffs(empty) - 1  // the lowest empty slot, else the least recent
                          : warp_argmin_stamp(has_slot ? stamp : LLONG_MAX, lane);
    }
    if (lane == target) {
      stamp = base + entry + 1;
      if (match == 0) {
#pragma unroll
        for (int l = 0; l < kCachedMaxL; ++l) held[l] = l < L ? token[l] : held[l];
      }
      dirty = true;
    }
  });
  if (dirty) {
    srow[lane] = stamp;
#pragma unroll
    for (int l = 0; l < kCachedMaxL; ++l) {
      if (l < L) prow[lane * L + l] = held[l];
    }
  }
}

// Entries [begin, begin + n) of a batch; warp g of the grid handles entry begin + g.
// kRefine selects the operation; slots is unused (nullptr) for insert.
template <bool kRefine, typename S, typename T>
__global__ void apply_chunk_kernel(int32_t* __restrict__ phrases, int64_t* __restrict__ stamps,
                                   const int64_t* __restrict__ clock,
                                   const int64_t* __restrict__ keys, const S* __restrict__ slots,
                                   const T* __restrict__ tokens, int64_t begin, int n,
                                   int64_t V, int64_t W, int64_t L, bool cached) {
  __shared__ long long chunk_keys[kChunk];
  for (int j = threadIdx.x; j < n; j += blockDim.x) chunk_keys[j] = keys[begin + j];
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int i = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;  // entry within chunk
  if (i >= n) return;  // whole warp
  const long long key = chunk_keys[i];
  if (key < 0 || key >= V) return;  // padding or invalid key: skipped

  // Leader test: does an earlier entry of this chunk have the same key?
  int earlier = 0;
  for (int j = lane; j < i; j += kWarp) earlier |= chunk_keys[j] == key;
  if (__any_sync(kFull, earlier)) return;

  int32_t* prow = phrases + key * W * L;
  int64_t* srow = stamps + key * W;
  const long long base = kRefine ? 0 : clock[0];  // refine neither reads nor needs it
  if (!kRefine && cached && W <= kWarp && L <= kCachedMaxL) {
    warp_insert_cached(prow, srow, W, L, chunk_keys, key, i, n, begin, tokens, base, lane);
    return;
  }
  // Apply this key's entries of the chunk in index order.
  for_each_entry_of_key(chunk_keys, key, i, n, begin, lane, [&](int64_t entry) {
    const T* phrase = tokens + entry * L;
    if (!phrase_usable(phrase, L)) return;  // padding or invalid token: skipped
    if (kRefine) {
      const long long slot = static_cast<long long>(slots[entry]);
      if (slot < 0 || slot >= W) return;
      warp_refine(prow, srow, W, L, static_cast<int>(slot), phrase, lane);
    } else {
      warp_insert(prow, srow, W, L, phrase, base + entry + 1, lane);
    }
    __syncwarp();
  });
}

// One warp per key: lane w % 32 ranks slot w among the key's slots by (stamp desc, slot asc).
__global__ void lookup_kernel(const int32_t* __restrict__ phrases,
                              const int64_t* __restrict__ stamps,
                              const int64_t* __restrict__ keys, int64_t M, int64_t k,
                              int64_t V, int64_t W, int64_t L, int32_t* __restrict__ out_phrases,
                              int32_t* __restrict__ out_counts, int32_t* __restrict__ out_slots) {
  const int lane = threadIdx.x % kWarp;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (m >= M) return;  // whole warp
  const long long key = keys[m];
  const bool usable = key >= 0 && key < V;  // padding and invalid keys: count 0
  int count = 0;
  if (usable) {
    const int32_t* prow = phrases + key * W * L;
    const int64_t* srow = stamps + key * W;
    int occupied = 0;
    for (int64_t w = lane; w < W; w += kWarp) {
      const long long s = srow[w];
      if (s == 0) continue;
      ++occupied;
      int64_t rank = 0;
      for (int64_t v = 0; v < W; ++v) {
        const long long t = srow[v];
        rank += t != 0 && (t > s || (t == s && v < w));
      }
      if (rank < k) {
        int32_t* dst = out_phrases + (m * k + rank) * L;
        for (int64_t l = 0; l < L; ++l) dst[l] = prow[w * L + l];
        out_slots[m * k + rank] = static_cast<int32_t>(w);
      }
    }
    count = warp_sum_int(occupied);
  }
  const int64_t valid = count < k ? count : k;
  for (int64_t r = valid + lane; r < k; r += kWarp) {
    int32_t* dst = out_phrases + (m * k + r) * L;
    for (int64_t l = 0; l < L; ++l) dst[l] = -1;
    out_slots[m * k + r] = -1;
  }
  if (lane == 0) out_counts[m] = static_cast<int32_t>(valid);
}

// The clock advance after an insert batch: a one-thread kernel, stream-ordered after the
// chunks that read the clock (cheaper on the host than an ATen add_).
__global__ void advance_clock_kernel(int64_t* clock, int64_t M) { clock[0] += M; }

template <bool kRefine, typename S, typename T>
void launch_chunks(at::Tensor& phrases, at::Tensor& stamps, const int64_t* clock,
                   const at::Tensor& keys, const S* slots, const at::Tensor& tokens,
                   const PoolDims& d) {
  const int64_t M = keys.size(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t begin = 0; begin < M; begin += kChunk) {
    const int n = static_cast<int>(M - begin < kChunk ? M - begin : kChunk);
    const int blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
    apply_chunk_kernel<kRefine, S, T><<<blocks, kThreads, 0, stream>>>(
        phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(), clock,
        keys.data_ptr<int64_t>(), slots, tokens.data_ptr<T>(), begin, n, d.V, d.W, d.L,
        g_insert_cached_flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void pool_insert_cuda(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                      const at::Tensor& keys, const at::Tensor& new_phrases) {
  const c10::cuda::CUDAGuard guard(phrases.device());
  const PoolDims d = check_state(phrases, stamps);
  check_clock(clock, phrases);
  const at::Tensor keys_c = checked_keys(keys, phrases);
  const int64_t M = keys_c.size(0);
  check_new_phrases(new_phrases, M, d.L, phrases);
  if (M == 0) return;
  const at::Tensor tokens_c = new_phrases.contiguous();
  const int64_t* no_slots = nullptr;
  if (tokens_c.scalar_type() == at::kInt) {
    launch_chunks<false, int64_t, int32_t>(phrases, stamps, clock.data_ptr<int64_t>(), keys_c,
                                           no_slots, tokens_c, d);
  } else {
    launch_chunks<false, int64_t, int64_t>(phrases, stamps, clock.data_ptr<int64_t>(), keys_c,
                                           no_slots, tokens_c, d);
  }
  advance_clock_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      clock.data_ptr<int64_t>(), M);  // stream-ordered after the kernels that read it
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pool_refine_cuda(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                      const at::Tensor& slots, const at::Tensor& new_phrases) {
  const c10::cuda::CUDAGuard guard(phrases.device());
  const PoolDims d = check_state(phrases, stamps);
  const at::Tensor keys_c = checked_keys(keys, phrases);
  const int64_t M = keys_c.size(0);
  check_slots(slots, M, phrases);
  check_new_phrases(new_phrases, M, d.L, phrases);
  if (M == 0) return;
  const at::Tensor slots_c = slots.contiguous();
  const at::Tensor tokens_c = new_phrases.contiguous();
  const bool slots32 = slots_c.scalar_type() == at::kInt;
  const bool tokens32 = tokens_c.scalar_type() == at::kInt;
  if (slots32 && tokens32) {
    launch_chunks<true, int32_t, int32_t>(phrases, stamps, nullptr, keys_c,
                                          slots_c.data_ptr<int32_t>(), tokens_c, d);
  } else if (slots32) {
    launch_chunks<true, int32_t, int64_t>(phrases, stamps, nullptr, keys_c,
                                          slots_c.data_ptr<int32_t>(), tokens_c, d);
  } else if (tokens32) {
    launch_chunks<true, int64_t, int32_t>(phrases, stamps, nullptr, keys_c,
                                          slots_c.data_ptr<int64_t>(), tokens_c, d);
  } else {
    launch_chunks<true, int64_t, int64_t>(phrases, stamps, nullptr, keys_c,
                                          slots_c.data_ptr<int64_t>(), tokens_c, d);
  }
}

namespace {

void launch_lookup(const at::Tensor& phrases, const at::Tensor& stamps, const at::Tensor& keys_c,
                   int64_t k, const PoolDims& d, const LookupOut& out) {
  const int64_t M = keys_c.size(0);
  if (M == 0) return;
  const int64_t blocks = (M + kWarpsPerBlock - 1) / kWarpsPerBlock;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  lookup_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(), keys_c.data_ptr<int64_t>(), M, k,
      d.V, d.W, d.L, out.phrases.data_ptr<int32_t>(), out.counts.data_ptr<int32_t>(),
      out.slots.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void pool_lookup_cuda(const at::Tensor& phrases, const at::Tensor& stamps,
                      const at::Tensor& keys, int64_t k, LookupOut& out) {
  const c10::cuda::CUDAGuard guard(phrases.device());
  const PoolDims d = check_state(phrases, stamps);
  const at::Tensor keys_c = checked_keys(keys, phrases);
  check_lookup_k(k);
  prepare_lookup_out(out, keys_c.size(0), k, d.L, phrases);
  launch_lookup(phrases, stamps, keys_c, k, d, out);
}

}  // namespace ouroboros

#endif  // OUROBOROS_WITH_CUDA
