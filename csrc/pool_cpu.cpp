// The candidate pool on the CPU, the op schemas, and the Python module with build info.
// Semantics: see pool.h. Everything here is sequential by design: the pool's result is
// defined as the sequential one, and a step's batch is small (hundreds of entries).
#include "pool.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>
#include <torch/library.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ouroboros {

// ---------------------------------------------------------------- argument checks

PoolDims check_state(const at::Tensor& phrases, const at::Tensor& stamps) {
  TORCH_CHECK_TYPE(phrases.scalar_type() == at::kInt,
                   "pool phrases: expected int32, got ", phrases.scalar_type());
  TORCH_CHECK_TYPE(stamps.scalar_type() == at::kLong,
                   "pool stamps: expected int64, got ", stamps.scalar_type());
  TORCH_CHECK_VALUE(phrases.dim() == 3, "pool phrases: expected shape [V, W, L], got ",
                    phrases.sizes());
  TORCH_CHECK_VALUE(stamps.dim() == 2 && stamps.size(0) == phrases.size(0) &&
                        stamps.size(1) == phrases.size(1),
                    "pool stamps: expected shape [V, W] = [", phrases.size(0), ", ",
                    phrases.size(1), "], got ", stamps.sizes());
  TORCH_CHECK_VALUE(phrases.size(1) >= 1 && phrases.size(2) >= 1,
                    "pool phrases: W and L must be >= 1, got ", phrases.sizes());
  TORCH_CHECK_VALUE(phrases.is_contiguous() && stamps.is_contiguous(),
                    "pool phrases and stamps must be contiguous");
  TORCH_CHECK_VALUE(stamps.device() == phrases.device(), "pool stamps: on ", stamps.device(),
                    " but phrases on ", phrases.device());
  return {phrases.size(0), phrases.size(1), phrases.size(2)};
}

void check_clock(const at::Tensor& clock, const at::Tensor& phrases) {
  TORCH_CHECK_TYPE(clock.scalar_type() == at::kLong, "pool clock: expected int64, got ",
                   clock.scalar_type());
  TORCH_CHECK_VALUE(clock.dim() == 1 && clock.size(0) == 1,
                    "pool clock: expected shape [1], got ", clock.sizes());
  TORCH_CHECK_VALUE(clock.device() == phrases.device(), "pool clock: on ", clock.device(),
                    " but phrases on ", phrases.device());
}

at::Tensor checked_keys(const at::Tensor& keys, const at::Tensor& phrases) {
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kLong || keys.scalar_type() == at::kInt,
                   "keys: expected int64 or int32, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(keys.dim() == 1, "keys: expected shape [M], got ", keys.sizes());
  TORCH_CHECK_VALUE(keys.device() == phrases.device(), "keys: on ", keys.device(),
                    " but the pool is on ", phrases.device());
  if (keys.scalar_type() == at::kInt) return keys.to(at::kLong);  // contiguous copy
  return keys.contiguous();
}

void check_new_phrases(const at::Tensor& new_phrases, int64_t M, int64_t L,
                       const at::Tensor& phrases) {
  TORCH_CHECK_TYPE(
      new_phrases.scalar_type() == at::kInt || new_phrases.scalar_type() == at::kLong,
      "phrases: expected int32 or int64, got ", new_phrases.scalar_type());
  TORCH_CHECK_VALUE(new_phrases.dim() == 2 && new_phrases.size(0) == M &&
                        new_phrases.size(1) == L,
                    "phrases: expected shape [M, L] = [", M, ", ", L, "], got ",
                    new_phrases.sizes());
  TORCH_CHECK_VALUE(new_phrases.device() == phrases.device(), "phrases: on ",
                    new_phrases.device(), " but the pool is on ", phrases.device());
}

void check_slots(const at::Tensor& slots, int64_t M, const at::Tensor& phrases) {
  TORCH_CHECK_TYPE(slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong,
                   "slots: expected int32 or int64, got ", slots.scalar_type());
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.size(0) == M, "slots: expected shape [M] = [",
                    M, "], got ", slots.sizes());
  TORCH_CHECK_VALUE(slots.device() == phrases.device(), "slots: on ", slots.device(),
                    " but the pool is on ", phrases.device());
}

namespace {
void check_out_tensor(const at::Tensor& out, const char* name, at::IntArrayRef shape,
                      const at::Tensor& phrases) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kInt, "out.", name, ": expected int32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.sizes() == shape, "out.", name, ": expected shape ", shape, ", got ",
                    out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out.", name, ": must be contiguous");
  TORCH_CHECK_VALUE(out.device() == phrases.device(), "out.", name, ": on ", out.device(),
                    " but the pool is on ", phrases.device());
}
}  // namespace

void check_lookup_out(const at::Tensor& out_phrases, const at::Tensor& out_counts,
                      const at::Tensor& out_slots, int64_t M, int64_t k, int64_t L,
                      const at::Tensor& phrases) {
  const int64_t phrases_shape[3] = {M, k, L};
  const int64_t slots_shape[2] = {M, k};
  check_out_tensor(out_phrases, "phrases", phrases_shape, phrases);
  check_out_tensor(out_counts, "counts", at::IntArrayRef(&M, 1), phrases);
  check_out_tensor(out_slots, "slots", slots_shape, phrases);
}

// ---------------------------------------------------------------- CPU kernels

namespace {

// The state as the kernels below see it: per key, a stamps row, a phrase row and (packed
// layout only) a first-token index row, each contiguous, at any per-key stride. Generic
// ops: phrases [V, W, L] and stamps [V, W] tensors (contiguous or strided by key, e.g.
// views of a packed record), no index. Packed ops: one record buffer (see pool.h).
struct CpuState {
  int32_t* phrases;
  int64_t* stamps;
  int32_t* firsts;  // nullptr: no index
  int64_t sp, ss, si;  // per-key strides in elements
  int64_t V, W, L;
  int32_t* prow(int64_t key) const { return phrases + key * sp; }
  int64_t* srow(int64_t key) const { return stamps + key * ss; }
  int32_t* frow(int64_t key) const { return firsts + key * si; }
};

void check_row_strided(const at::Tensor& t, const char* name, int64_t row_elems) {
  // Dense within a key (unit strides inside), any key stride that does not overlap rows.
  bool inner_dense = true;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    inner_dense = inner_dense && (t.size(d) == 1 || t.stride(d) == expected);
    expected *= t.size(d);
  }
  TORCH_CHECK_VALUE(inner_dense && (t.size(0) <= 1 || t.stride(0) >= row_elems),
                    name, ": each key's row must be contiguous (strides ", t.strides(), ")");
}

CpuState cpu_state(const at::Tensor& phrases, const at::Tensor& stamps) {
  TORCH_CHECK_TYPE(phrases.scalar_type() == at::kInt,
                   "pool phrases: expected int32, got ", phrases.scalar_type());
  TORCH_CHECK_TYPE(stamps.scalar_type() == at::kLong,
                   "pool stamps: expected int64, got ", stamps.scalar_type());
  TORCH_CHECK_VALUE(phrases.dim() == 3, "pool phrases: expected shape [V, W, L], got ",
                    phrases.sizes());
  TORCH_CHECK_VALUE(stamps.dim() == 2 && stamps.size(0) == phrases.size(0) &&
                        stamps.size(1) == phrases.size(1),
                    "pool stamps: expected shape [V, W] = [", phrases.size(0), ", ",
                    phrases.size(1), "], got ", stamps.sizes());
  TORCH_CHECK_VALUE(phrases.size(1) >= 1 && phrases.size(2) >= 1,
                    "pool phrases: W and L must be >= 1, got ", phrases.sizes());
  TORCH_CHECK_VALUE(stamps.device() == phrases.device(), "pool stamps: on ", stamps.device(),
                    " but phrases on ", phrases.device());
  const int64_t V = phrases.size(0), W = phrases.size(1), L = phrases.size(2);
  check_row_strided(phrases, "pool phrases", W * L);
  check_row_strided(stamps, "pool stamps", W);
  return {phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(), nullptr,
          phrases.stride(0), stamps.stride(0), 0, V, W, L};
}

CpuState packed_state(const at::Tensor& record, int64_t W, int64_t L) {
  TORCH_CHECK_VALUE(W >= 1 && L >= 1, "capacity and phrase_len must be >= 1, got ", W, " and ",
                    L);
  TORCH_CHECK_TYPE(record.scalar_type() == at::kInt, "pool record: expected int32, got ",
                   record.scalar_type());
  TORCH_CHECK_VALUE(record.is_cpu(), "pool record: the packed layout is CPU-only, got ",
                    record.device());
  TORCH_CHECK_VALUE(record.dim() == 2 && record.is_contiguous() && record.size(1) % 2 == 0 &&
                        record.size(1) >= W * (3 + L),
                    "pool record: expected a contiguous int32 [V, R] with R even and R >= "
                    "capacity * (3 + phrase_len) = ", W * (3 + L), ", got shape ",
                    record.sizes());
  int32_t* base = record.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(base) % alignof(int64_t) == 0,
                    "pool record: must be 8-byte aligned (it holds the int64 stamps)");
  const int64_t R = record.size(1);
  return {base + 3 * W, reinterpret_cast<int64_t*>(base), base + 2 * W, R, R / 2, R,
          record.size(0), W, L};
}

enum PhraseKind { kValid, kPadding, kInvalid };

// Valid: every token in [0, 2**31). Padding: some token is -1 and none is invalid.
template <typename T>
inline PhraseKind phrase_kind(const T* tokens, int64_t L) {
  int64_t lo = static_cast<int64_t>(tokens[0]), hi = lo;
  for (int64_t l = 1; l < L; ++l) {  // branch-free: the common case is one compare
    const int64_t t = static_cast<int64_t>(tokens[l]);
    lo = t < lo ? t : lo;
    hi = t > hi ? t : hi;
  }
  if (lo >= 0 && hi <= std::numeric_limits<int32_t>::max()) return kValid;
  PhraseKind kind = kValid;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t t = static_cast<int64_t>(tokens[l]);
    if (t == -1) {
      kind = kPadding;
    } else if (t < 0 || t > std::numeric_limits<int32_t>::max()) {
      return kInvalid;
    }
  }
  return kind;
}

template <typename T>
void check_phrase_row(const T* tokens, int64_t L, int64_t row) {
  if (phrase_kind(tokens, L) != kInvalid) return;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t t = static_cast<int64_t>(tokens[l]);
    TORCH_CHECK_VALUE(t >= -1 && t <= std::numeric_limits<int32_t>::max(), "phrases: row ",
                      row, " holds token ", t,
                      " (tokens must be in [0, 2**31), or -1 to mark a padding row)");
  }
}

// One pass over a batch's tokens (or keys): whether any value is outside [-1, hi] (hi < 2**31
// for tokens) and whether any is -1. Written as independent OR-accumulations of unsigned
// arithmetic so that the compiler vectorises it (no data-dependent branch, no min/max chain).
struct BatchScan {
  bool out_of_range, has_padding;
};

template <typename T>
inline BatchScan scan_values(const T* values, int64_t n, int64_t hi) {
  // u = v + 1 maps the allowed range [-1, hi] to [0, hi + 1]; -1 maps to 0.
  const uint64_t bound = static_cast<uint64_t>(hi) + 1;
  uint64_t above = 0, zero = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t u = static_cast<uint64_t>(static_cast<int64_t>(values[i])) + 1;
    above |= static_cast<uint64_t>(u > bound);
    zero |= static_cast<uint64_t>(u == 0);
  }
  return {above != 0, zero != 0};
}

// The same for phrase tokens (allowed: [-1, 2**31 - 1]) with shifts only, which SSE2
// vectorises: u = v + 1 must be < 2**31 (u == 2**31, i.e. v == INT32_MAX, is flagged too
// and left to the exact per-row check), and u - 1 has its top bit set iff u == 0 (v == -1)
// or v was below -1 (flagged by the first test as well). The batch is fresh from the
// caller, often not in cache: its lines are prefetched ahead of the scan.
template <typename T>
inline BatchScan scan_tokens(const T* values, int64_t n) {
  uint64_t high = 0, minus_one = 0;
  constexpr int64_t kAhead = 512 / sizeof(T);
  for (int64_t i = 0; i < n; ++i) {
#if defined(__GNUC__)
    if ((i & (64 / sizeof(T) - 1)) == 0) __builtin_prefetch(values + i + kAhead);
#endif
    const uint64_t u = static_cast<uint64_t>(static_cast<int64_t>(values[i])) + 1;
    high |= u >> 31;
    minus_one |= (u - 1) >> 63;
  }
  return {high != 0, minus_one != 0};
}

inline void check_key_value(int64_t key, int64_t V, int64_t row) {
  TORCH_CHECK_VALUE(key >= -1 && key < V, "keys: entry ", row, " is ", key,
                    " (keys must be in [0, ", V, "), or -1 to mark padding)");
}

template <typename T>
inline bool same_phrase(const int32_t* stored, const T* tokens, int64_t L) {
  bool same = true;
  for (int64_t l = 0; l < L; ++l) same &= stored[l] == static_cast<int32_t>(tokens[l]);
  return same;
}

template <typename T>
inline void store_phrase(int32_t* stored, const T* tokens, int64_t L) {
  for (int64_t l = 0; l < L; ++l) stored[l] = static_cast<int32_t>(tokens[l]);
}

// Write a phrase into slot `slot` of `key`, keeping the first-token index (if any) in step.
template <typename T>
inline void write_slot(const CpuState& st, int64_t key, int64_t slot, const T* phrase) {
  store_phrase(st.prow(key) + slot * st.L, phrase, st.L);
  if (st.firsts != nullptr) st.frow(key)[slot] = static_cast<int32_t>(phrase[0]);
}

// Bit w set for every w in [0, n) with row[w * stride] == value (n <= 64), branch-free. With
// a unit stride (the first_tokens index) this is four-lane SSE2 compares.
inline uint64_t match_mask(const int32_t* row, int64_t stride, int64_t n, int32_t value) {
  uint64_t hits = 0;
  int64_t w = 0;
#if defined(__SSE2__)
  if (stride == 1) {
    const __m128i v = _mm_set1_epi32(value);
    for (; w + 4 <= n; w += 4) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + w));
      const int bits = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(x, v)));
      hits |= static_cast<uint64_t>(bits) << w;
    }
  }
#endif
  for (; w < n; ++w) hits |= static_cast<uint64_t>(row[w * stride] == value) << w;
  return hits;
}

// The occupied slot of a key that holds `phrase`, or -1. Candidates are the slots whose
// first token matches (from the index when there is one, else a strided pass over the
// phrases); only those are compared in full.
template <typename T>
inline int64_t find_phrase(const CpuState& st, int64_t key, const T* phrase) {
  const int64_t W = st.W, L = st.L;
  const int32_t* prow = st.prow(key);
  const int64_t* srow = st.srow(key);
  const int32_t first = static_cast<int32_t>(phrase[0]);
  for (int64_t base = 0; base < W; base += 64) {
    const int64_t n = W - base < 64 ? W - base : 64;
    uint64_t hits = st.firsts != nullptr ? match_mask(st.frow(key) + base, 1, n, first)
                                         : match_mask(prow + base * L, L, n, first);
    while (hits != 0) {
      const int64_t w = base + __builtin_ctzll(hits);
      hits &= hits - 1;
      if (srow[w] != 0 && same_phrase(prow + w * L + 1, phrase + 1, L - 1)) return w;
    }
  }
  return -1;
}

// Where a new phrase goes: the lowest empty slot, else the least recent one (lowest slot on
// a tie). Empty slots have stamp 0, the smallest possible, so this is simply the arg-min of
// (stamp, slot). Four independent lanes shorten the compare/select chain; the lanes are
// merged with ties going to the lower slot.
inline int64_t slot_for_new_phrase(const int64_t* srow, int64_t W) {
  if (W < 8) {
    int64_t target = 0, target_stamp = srow[0];
    for (int64_t w = 1; w < W; ++w) {
      const int64_t s = srow[w];
      target = s < target_stamp ? w : target;
      target_stamp = s < target_stamp ? s : target_stamp;
    }
    return target;
  }
  int64_t best[4] = {0, 1, 2, 3};
  int64_t low[4] = {srow[0], srow[1], srow[2], srow[3]};
  int64_t w = 4;
  for (; w + 4 <= W; w += 4) {
    for (int j = 0; j < 4; ++j) {
      const int64_t s = srow[w + j];
      const bool less = s < low[j];
      best[j] = less ? w + j : best[j];
      low[j] = less ? s : low[j];
    }
  }
  for (; w < W; ++w) {
    const int j = static_cast<int>(w & 3);
    const int64_t s = srow[w];
    const bool less = s < low[j];
    best[j] = less ? w : best[j];
    low[j] = less ? s : low[j];
  }
  int64_t target = best[0], target_stamp = low[0];
  for (int j = 1; j < 4; ++j) {
    const bool better = low[j] < target_stamp || (low[j] == target_stamp && best[j] < target);
    target = better ? best[j] : target;
    target_stamp = better ? low[j] : target_stamp;
  }
  return target;
}

// The lines of upcoming entries' rows are prefetched: with a large vocabulary the pool
// (tens of MB) does not fit in cache, and each entry would otherwise wait for its lines in
// turn. With the index, a key's stamps and first tokens are what every entry reads (the
// phrase row is then touched at one slot only); without it, the whole phrase row is.
constexpr int64_t kPrefetchDistance = 10;

inline void prefetch_lines(const void* start, int64_t bytes) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(start);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 1);
#endif
}

inline void prefetch_key(const CpuState& st, int64_t key) {
  if (key < 0 || key >= st.V) return;
  prefetch_lines(st.srow(key), st.W * 8);
  if (st.firsts != nullptr) {
    prefetch_lines(st.frow(key), st.W * 4);
  } else {
    prefetch_lines(st.prow(key), st.W * st.L * 4);
  }
}

template <typename T>
void insert_impl(const CpuState& st, int64_t* clock, const int64_t* keys, const T* tokens,
                 int64_t M) {
  const int64_t W = st.W, L = st.L;
  // Validate everything first so that a bad batch changes nothing: one vectorisable pass
  // over keys and tokens, and the row-by-row search for the culprit only if it fails.
  const BatchScan key_scan = scan_values(keys, M, st.V - 1);
  const BatchScan token_scan = scan_tokens(tokens, M * L);
  if (key_scan.out_of_range || token_scan.out_of_range) {
    for (int64_t i = 0; i < M; ++i) {
      check_key_value(keys[i], st.V, i);
      check_phrase_row(tokens + i * L, L, i);
    }
  }
  const bool padding = key_scan.has_padding || token_scan.has_padding;
  const int64_t base = clock[0];
  for (int64_t i = 0; i < M && i < kPrefetchDistance; ++i) prefetch_key(st, keys[i]);
  for (int64_t i = 0; i < M; ++i) {
    if (i + kPrefetchDistance < M) prefetch_key(st, keys[i + kPrefetchDistance]);
    const int64_t key = keys[i];
    const T* phrase = tokens + i * L;
    if (padding && (key < 0 || phrase_kind(phrase, L) != kValid)) continue;
    const int64_t stamp = base + i + 1;
    int64_t* srow = st.srow(key);
    int64_t target = find_phrase(st, key, phrase);
    if (target >= 0) {  // already there: becomes the most recent
      srow[target] = stamp;
      continue;
    }
    target = slot_for_new_phrase(srow, W);
    srow[target] = stamp;
    write_slot(st, key, target, phrase);
  }
  clock[0] = base + M;
}

template <typename S, typename T>
void refine_impl(const CpuState& st, const int64_t* keys, const S* slots, const T* tokens,
                 int64_t M) {
  const int64_t W = st.W, L = st.L;
  for (int64_t i = 0; i < M; ++i) {
    check_key_value(keys[i], st.V, i);
    const int64_t slot = static_cast<int64_t>(slots[i]);
    TORCH_CHECK_VALUE(slot >= -1 && slot < W, "slots: entry ", i, " is ", slot,
                      " (slots must be in [0, ", W, "), or -1 to mark padding)");
    check_phrase_row(tokens + i * L, L, i);
  }
  for (int64_t i = 0; i < M; ++i) {
    const int64_t key = keys[i];
    const int64_t slot = static_cast<int64_t>(slots[i]);
    const T* phrase = tokens + i * L;
    if (key < 0 || slot < 0 || phrase_kind(phrase, L) != kValid) continue;  // padding
    int64_t* srow = st.srow(key);
    int32_t* prow = st.prow(key);
    if (srow[slot] == 0) continue;  // refining an empty slot is a no-op
    bool duplicate = false;
    for (int64_t w = 0; w < W && !duplicate; ++w) {
      duplicate = w != slot && srow[w] != 0 && same_phrase(prow + w * L, phrase, L);
    }
    if (duplicate) {
      srow[slot] = 0;
      for (int64_t l = 0; l < L; ++l) prow[slot * L + l] = -1;
      if (st.firsts != nullptr) st.frow(key)[slot] = -1;
    } else {
      write_slot(st, key, slot, phrase);
    }
  }
}

// Lookup of keys[0 .. M) into op [M, k, L], oc [M], os [M, k] (keys already range-checked).
void lookup_fill(const CpuState& st, const int64_t* key_ptr, int64_t M, int64_t k,
                 int32_t* op, int32_t* oc, int32_t* os) {
  const int64_t W = st.W, L = st.L;
  // Occupied slots of a key, newest first; on the stack for the usual W <= 64.
  int32_t order_local[64];
  std::vector<int32_t> order_heap(W > 64 ? W : 0);
  int32_t* order = W > 64 ? order_heap.data() : order_local;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t key = key_ptr[m];
    int64_t count = 0;
    if (key >= 0) {
      const int64_t* srow = st.srow(key);
      const int32_t* prow = st.prow(key);
      // Insertion sort by stamp descending while scanning slots in ascending order: equal
      // stamps are never moved past each other, so ties keep the lower slot first.
      int64_t occupied = 0;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t s = srow[w];
        if (s == 0) continue;
        int64_t j = occupied++;
        while (j > 0 && srow[order[j - 1]] < s) {
          order[j] = order[j - 1];
          --j;
        }
        order[j] = static_cast<int32_t>(w);
      }
      count = occupied < k ? occupied : k;
      for (int64_t r = 0; r < count; ++r) {
        std::memcpy(op + (m * k + r) * L, prow + order[r] * L, L * sizeof(int32_t));
        os[m * k + r] = order[r];
      }
    }
    oc[m] = static_cast<int32_t>(count);
    for (int64_t r = count; r < k; ++r) {
      for (int64_t l = 0; l < L; ++l) op[(m * k + r) * L + l] = -1;
      os[m * k + r] = -1;
    }
  }
}

// Checks shared by both lookup entry points; returns the keys as contiguous int64.
at::Tensor checked_lookup_keys(const CpuState& st, const at::Tensor& phrases,
                               const at::Tensor& keys, int64_t k) {
  at::Tensor keys_c = checked_keys(keys, phrases);
  TORCH_CHECK_VALUE(k >= 1, "k: expected k >= 1, got ", k);
  const int64_t M = keys_c.size(0);
  const int64_t* key_ptr = keys_c.data_ptr<int64_t>();
  if (scan_values(key_ptr, M, st.V - 1).out_of_range) {
    for (int64_t m = 0; m < M; ++m) check_key_value(key_ptr[m], st.V, m);
  }
  return keys_c;
}

// The generic ops write through raw pointers; like ATen's in-place ops they then bump the
// version counters of what they wrote, so that a CandidatePool whose packed buffer these
// tensors view notices the write (and rebuilds its first-token index).
void bump_versions(const at::Tensor& phrases, const at::Tensor& stamps) {
  for (const at::Tensor* t : {&phrases, &stamps}) {
    if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
  }
}

template <typename Fn>
void with_tokens(const at::Tensor& new_phrases, Fn&& fn) {
  const at::Tensor tokens_c = new_phrases.contiguous();
  if (tokens_c.scalar_type() == at::kInt) {
    fn(tokens_c.data_ptr<int32_t>());
  } else {
    fn(tokens_c.data_ptr<int64_t>());
  }
}

void insert_checked(const CpuState& st, at::Tensor& clock, const at::Tensor& keys,
                    const at::Tensor& new_phrases, const at::Tensor& like) {
  check_clock(clock, like);
  const at::Tensor keys_c = checked_keys(keys, like);
  const int64_t M = keys_c.size(0);
  check_new_phrases(new_phrases, M, st.L, like);
  int64_t* clock_ptr = clock.data_ptr<int64_t>();
  const int64_t* key_ptr = keys_c.data_ptr<int64_t>();
  with_tokens(new_phrases, [&](auto tokens) { insert_impl(st, clock_ptr, key_ptr, tokens, M); });
}

void refine_checked(const CpuState& st, const at::Tensor& keys, const at::Tensor& slots,
                    const at::Tensor& new_phrases, const at::Tensor& like) {
  const at::Tensor keys_c = checked_keys(keys, like);
  const int64_t M = keys_c.size(0);
  check_slots(slots, M, like);
  check_new_phrases(new_phrases, M, st.L, like);
  const at::Tensor slots_c = slots.contiguous();
  const int64_t* kp = keys_c.data_ptr<int64_t>();
  with_tokens(new_phrases, [&](auto tokens) {
    if (slots_c.scalar_type() == at::kInt) {
      refine_impl(st, kp, slots_c.data_ptr<int32_t>(), tokens, M);
    } else {
      refine_impl(st, kp, slots_c.data_ptr<int64_t>(), tokens, M);
    }
  });
}

void lookup_checked(const CpuState& st, const at::Tensor& keys, int64_t k, const at::Tensor& like,
                    at::Tensor* out_phrases, at::Tensor* out_counts, at::Tensor* out_slots) {
  const at::Tensor keys_c = checked_lookup_keys(st, like, keys, k);
  const int64_t M = keys_c.size(0);
  if (!out_phrases->defined()) {
    auto opts = like.options().dtype(at::kInt);
    *out_phrases = at::empty({M, k, st.L}, opts);
    *out_counts = at::empty({M}, opts);
    *out_slots = at::empty({M, k}, opts);
  } else {
    check_lookup_out(*out_phrases, *out_counts, *out_slots, M, k, st.L, like);
  }
  lookup_fill(st, keys_c.data_ptr<int64_t>(), M, k, out_phrases->data_ptr<int32_t>(),
              out_counts->data_ptr<int32_t>(), out_slots->data_ptr<int32_t>());
}

}  // namespace

void pool_insert_cpu(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                     const at::Tensor& keys, const at::Tensor& new_phrases) {
  insert_checked(cpu_state(phrases, stamps), clock, keys, new_phrases, phrases);
  bump_versions(phrases, stamps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_lookup_cpu(const at::Tensor& phrases,
                                                               const at::Tensor& stamps,
                                                               const at::Tensor& keys,
                                                               int64_t k) {
  at::Tensor out_phrases, out_counts, out_slots;
  lookup_checked(cpu_state(phrases, stamps), keys, k, phrases, &out_phrases, &out_counts,
                 &out_slots);
  return {out_phrases, out_counts, out_slots};
}

void pool_lookup_out_cpu(const at::Tensor& phrases, const at::Tensor& stamps,
                         const at::Tensor& keys, int64_t k, at::Tensor& out_phrases,
                         at::Tensor& out_counts, at::Tensor& out_slots) {
  lookup_checked(cpu_state(phrases, stamps), keys, k, phrases, &out_phrases, &out_counts,
                 &out_slots);
}

void pool_refine_cpu(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                     const at::Tensor& slots, const at::Tensor& new_phrases) {
  refine_checked(cpu_state(phrases, stamps), keys, slots, new_phrases, phrases);
  bump_versions(phrases, stamps);
}

void pool_insert_packed_cpu(at::Tensor& record, at::Tensor& clock, int64_t capacity,
                            int64_t phrase_len, const at::Tensor& keys,
                            const at::Tensor& new_phrases) {
  insert_checked(packed_state(record, capacity, phrase_len), clock, keys, new_phrases, record);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_lookup_packed_cpu(
    const at::Tensor& record, int64_t capacity, int64_t phrase_len, const at::Tensor& keys,
    int64_t k) {
  at::Tensor out_phrases, out_counts, out_slots;
  lookup_checked(packed_state(record, capacity, phrase_len), keys, k, record, &out_phrases,
                 &out_counts, &out_slots);
  return {out_phrases, out_counts, out_slots};
}

void pool_lookup_packed_out_cpu(const at::Tensor& record, int64_t capacity, int64_t phrase_len,
                                const at::Tensor& keys, int64_t k, at::Tensor& out_phrases,
                                at::Tensor& out_counts, at::Tensor& out_slots) {
  lookup_checked(packed_state(record, capacity, phrase_len), keys, k, record, &out_phrases,
                 &out_counts, &out_slots);
}

void pool_refine_packed_cpu(at::Tensor& record, int64_t capacity, int64_t phrase_len,
                            const at::Tensor& keys, const at::Tensor& slots,
                            const at::Tensor& new_phrases) {
  refine_checked(packed_state(record, capacity, phrase_len), keys, slots, new_phrases, record);
}

}  // namespace ouroboros

// ---------------------------------------------------------------- registration

TORCH_LIBRARY(ouroboros_kernels, m) {
  m.def(
      "pool_insert(Tensor(a!) phrases, Tensor(b!) stamps, Tensor(c!) clock, Tensor keys, "
      "Tensor new_phrases) -> ()");
  m.def(
      "pool_lookup(Tensor phrases, Tensor stamps, Tensor keys, int k) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "pool_refine(Tensor(a!) phrases, Tensor(b!) stamps, Tensor keys, Tensor slots, "
      "Tensor new_phrases) -> ()");
  // The packed CPU layout (pool.h); CandidatePool's CPU path.
  m.def(
      "pool_insert_packed(Tensor(a!) record, Tensor(b!) clock, int capacity, int phrase_len, "
      "Tensor keys, Tensor new_phrases) -> ()");
  m.def(
      "pool_lookup_packed(Tensor record, int capacity, int phrase_len, Tensor keys, int k) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "pool_refine_packed(Tensor(a!) record, int capacity, int phrase_len, Tensor keys, "
      "Tensor slots, Tensor new_phrases) -> ()");
}

TORCH_LIBRARY_IMPL(ouroboros_kernels, CPU, m) {
  m.impl("pool_insert", &ouroboros::pool_insert_cpu);
  m.impl("pool_lookup", &ouroboros::pool_lookup_cpu);
  m.impl("pool_refine", &ouroboros::pool_refine_cpu);
  m.impl("pool_insert_packed", &ouroboros::pool_insert_packed_cpu);
  m.impl("pool_lookup_packed", &ouroboros::pool_lookup_packed_cpu);
  m.impl("pool_refine_packed", &ouroboros::pool_refine_packed_cpu);
}

namespace {

// Direct entry points for the Python wrapper's hot path: the same implementations as the
// registered ops, minus the dispatcher's per-call overhead (a few µs, which is most of a
// CPU step). The device decides, exactly as dispatch would.
[[noreturn]] void unsupported_device(const at::Tensor& phrases) {
  TORCH_CHECK_VALUE(false, "pool: no kernel for device ", phrases.device(),
                    phrases.is_cuda() ? " (the extension was built without CUDA)" : "");
  std::abort();  // unreachable
}

void insert_direct(at::Tensor phrases, at::Tensor stamps, at::Tensor clock,
                   const at::Tensor& keys, const at::Tensor& new_phrases) {
  if (phrases.is_cpu()) return ouroboros::pool_insert_cpu(phrases, stamps, clock, keys, new_phrases);
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) {
    return ouroboros::pool_insert_cuda(phrases, stamps, clock, keys, new_phrases);
  }
#endif
  unsupported_device(phrases);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lookup_direct(const at::Tensor& phrases,
                                                             const at::Tensor& stamps,
                                                             const at::Tensor& keys, int64_t k) {
  if (phrases.is_cpu()) return ouroboros::pool_lookup_cpu(phrases, stamps, keys, k);
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) return ouroboros::pool_lookup_cuda(phrases, stamps, keys, k);
#endif
  unsupported_device(phrases);
}

void lookup_out_direct(const at::Tensor& phrases, const at::Tensor& stamps,
                       const at::Tensor& keys, int64_t k, at::Tensor out_phrases,
                       at::Tensor out_counts, at::Tensor out_slots) {
  if (phrases.is_cpu()) {
    return ouroboros::pool_lookup_out_cpu(phrases, stamps, keys, k, out_phrases, out_counts,
                                          out_slots);
  }
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) {
    return ouroboros::pool_lookup_out_cuda(phrases, stamps, keys, k, out_phrases, out_counts,
                                           out_slots);
  }
#endif
  unsupported_device(phrases);
}

void refine_direct(at::Tensor phrases, at::Tensor stamps, const at::Tensor& keys,
                   const at::Tensor& slots, const at::Tensor& new_phrases) {
  if (phrases.is_cpu()) return ouroboros::pool_refine_cpu(phrases, stamps, keys, slots, new_phrases);
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) {
    return ouroboros::pool_refine_cuda(phrases, stamps, keys, slots, new_phrases);
  }
#endif
  unsupported_device(phrases);
}

// ---------------------------------------------------------------- vectorcall bindings
//
// The hot entry points are plain CPython METH_FASTCALL functions rather than pybind11
// ones. A pool op is a few hundred ns of work, and in a decoding step it runs with cold
// caches (the model ran in between): measured over the benchmark's step, pybind11's
// generic argument machinery cost about 0.4 µs per call there, unpacking the tensors
// directly well under 0.05 µs. Errors from the checks come out as the same ValueError /
// TypeError as from the registered ops.

bool translate_exception() {
  try {
    throw;
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return false;
}

void check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* fn) {
  TORCH_CHECK_TYPE(nargs == expected, fn, ": expected ", expected,
                   " positional arguments, got ", nargs);
}

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), name, ": expected a torch.Tensor, got ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

int64_t int_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(PyLong_Check(obj) && !PyBool_Check(obj), name, ": expected an int, got ",
                   Py_TYPE(obj)->tp_name);
  const long long value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_VALUE(false, name, ": out of the int64 range");
  }
  return value;
}

// Each binding: check the count, unpack, call; any C++ exception becomes a Python one.
template <typename Body>
PyObject* guarded(Body&& body) {
  try {
    body();
  } catch (...) {
    translate_exception();
    return nullptr;
  }
  Py_RETURN_NONE;
}

// pool_insert(phrases, stamps, clock, keys, new_phrases)
PyObject* fast_insert(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 5, "pool_insert");
    insert_direct(tensor_arg(args[0], "phrases"), tensor_arg(args[1], "stamps"),
                  tensor_arg(args[2], "clock"), tensor_arg(args[3], "keys"),
                  tensor_arg(args[4], "new_phrases"));
  });
}

// pool_lookup_out(phrases, stamps, keys, k, out_phrases, out_counts, out_slots)
PyObject* fast_lookup_out(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 7, "pool_lookup_out");
    lookup_out_direct(tensor_arg(args[0], "phrases"), tensor_arg(args[1], "stamps"),
                      tensor_arg(args[2], "keys"), int_arg(args[3], "k"),
                      tensor_arg(args[4], "out.phrases"), tensor_arg(args[5], "out.counts"),
                      tensor_arg(args[6], "out.slots"));
  });
}

// pool_refine(phrases, stamps, keys, slots, new_phrases)
PyObject* fast_refine(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 5, "pool_refine");
    refine_direct(tensor_arg(args[0], "phrases"), tensor_arg(args[1], "stamps"),
                  tensor_arg(args[2], "keys"), tensor_arg(args[3], "slots"),
                  tensor_arg(args[4], "new_phrases"));
  });
}

// The packed ops take the buffer and its dimensions first, so that a caller can bind them
// once (functools.partial) and pass only the step's arguments.

// pool_insert_packed(record, clock, capacity, phrase_len, keys, new_phrases)
PyObject* fast_insert_packed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 6, "pool_insert_packed");
    at::Tensor record = tensor_arg(args[0], "record");
    at::Tensor clock = tensor_arg(args[1], "clock");
    ouroboros::pool_insert_packed_cpu(record, clock, int_arg(args[2], "capacity"),
                                      int_arg(args[3], "phrase_len"), tensor_arg(args[4], "keys"),
                                      tensor_arg(args[5], "new_phrases"));
  });
}

// pool_lookup_packed_out(record, capacity, phrase_len, keys, k, out_phrases, out_counts,
//                        out_slots)
PyObject* fast_lookup_packed_out(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 8, "pool_lookup_packed_out");
    at::Tensor out_phrases = tensor_arg(args[5], "out.phrases");
    at::Tensor out_counts = tensor_arg(args[6], "out.counts");
    at::Tensor out_slots = tensor_arg(args[7], "out.slots");
    ouroboros::pool_lookup_packed_out_cpu(
        tensor_arg(args[0], "record"), int_arg(args[1], "capacity"),
        int_arg(args[2], "phrase_len"), tensor_arg(args[3], "keys"), int_arg(args[4], "k"),
        out_phrases, out_counts, out_slots);
  });
}

// pool_refine_packed(record, capacity, phrase_len, keys, slots, new_phrases)
PyObject* fast_refine_packed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&] {
    check_nargs(nargs, 6, "pool_refine_packed");
    at::Tensor record = tensor_arg(args[0], "record");
    ouroboros::pool_refine_packed_cpu(record, int_arg(args[1], "capacity"),
                                      int_arg(args[2], "phrase_len"), tensor_arg(args[3], "keys"),
                                      tensor_arg(args[4], "slots"),
                                      tensor_arg(args[5], "new_phrases"));
  });
}

template <typename F>
PyCFunction as_pycfunction(F* fn) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn));
}

PyMethodDef fast_methods[] = {
    {"pool_insert", as_pycfunction(fast_insert), METH_FASTCALL,
     "pool_insert(phrases, stamps, clock, keys, new_phrases): same as "
     "torch.ops.ouroboros_kernels.pool_insert (positional arguments)"},
    {"pool_lookup_out", as_pycfunction(fast_lookup_out), METH_FASTCALL,
     "pool_lookup_out(phrases, stamps, keys, k, out_phrases, out_counts, out_slots): "
     "pool_lookup written into caller-provided contiguous int32 tensors (phrases [M, k, L], "
     "counts [M], slots [M, k]); returns None"},
    {"pool_refine", as_pycfunction(fast_refine), METH_FASTCALL,
     "pool_refine(phrases, stamps, keys, slots, new_phrases): same as "
     "torch.ops.ouroboros_kernels.pool_refine (positional arguments)"},
    {"pool_insert_packed", as_pycfunction(fast_insert_packed), METH_FASTCALL,
     "pool_insert_packed(record, clock, capacity, phrase_len, keys, new_phrases): same as "
     "torch.ops.ouroboros_kernels.pool_insert_packed (positional arguments)"},
    {"pool_lookup_packed_out", as_pycfunction(fast_lookup_packed_out), METH_FASTCALL,
     "pool_lookup_packed_out(record, capacity, phrase_len, keys, k, out_phrases, out_counts, "
     "out_slots): pool_lookup_packed written into caller-provided buffers; returns None"},
    {"pool_refine_packed", as_pycfunction(fast_refine_packed), METH_FASTCALL,
     "pool_refine_packed(record, capacity, phrase_len, keys, slots, new_phrases): same as "
     "torch.ops.ouroboros_kernels.pool_refine_packed (positional arguments)"},
    {nullptr, nullptr, 0, nullptr}};

std::string torch_build_version() {
#if defined(TORCH_VERSION_MAJOR)
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Ouroboros candidate-pool ops (registered as torch.ops.ouroboros_kernels.*)";
#ifdef OUROBOROS_WITH_CUDA
  m.def("set_cuda_insert_cached", &ouroboros::set_cuda_insert_cached,
        "Experimental CUDA insert path: the leader warp keeps the key's row in registers");
  m.def("cuda_insert_cached", &ouroboros::cuda_insert_cached);
  m.attr("built_with_cuda") = true;
  const int64_t v = ouroboros::cuda_runtime_build_version();
  m.attr("cuda_version") = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  m.attr("built_with_cuda") = false;
  m.attr("cuda_version") = pybind11::none();
#endif
  m.attr("torch_version") = torch_build_version();
  m.def("pool_lookup", &lookup_direct, "Same as torch.ops.ouroboros_kernels.pool_lookup");
  if (PyModule_AddFunctions(m.ptr(), fast_methods) != 0) throw pybind11::error_already_set();
}
