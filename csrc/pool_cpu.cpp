// The candidate pool on the CPU: the kernels over raw key rows (generic and packed layouts)
// and their tensor entry points (declared in pool.h; registered in pool_ops.cpp).
// Semantics: see pool.h. Everything here is sequential by design: the pool's result is
// defined as the sequential one, and a step's batch is small (hundreds of entries).
#include "pool.h"

#include <cstring>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ouroboros {

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
  const auto [V, W, L] = check_state(phrases, stamps, /*require_contiguous=*/false);
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
                    LookupOut& out) {
  const at::Tensor keys_c = checked_keys(keys, like);
  check_lookup_k(k);
  const int64_t M = keys_c.size(0);
  const int64_t* key_ptr = keys_c.data_ptr<int64_t>();
  if (scan_values(key_ptr, M, st.V - 1).out_of_range) {
    for (int64_t m = 0; m < M; ++m) check_key_value(key_ptr[m], st.V, m);
  }
  prepare_lookup_out(out, M, k, st.L, like);
  lookup_fill(st, key_ptr, M, k, out.phrases.data_ptr<int32_t>(),
              out.counts.data_ptr<int32_t>(), out.slots.data_ptr<int32_t>());
}

}  // namespace

void pool_insert_cpu(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                     const at::Tensor& keys, const at::Tensor& new_phrases) {
  insert_checked(cpu_state(phrases, stamps), clock, keys, new_phrases, phrases);
  bump_versions(phrases, stamps);
}

void pool_lookup_cpu(const at::Tensor& phrases, const at::Tensor& stamps,
                     const at::Tensor& keys, int64_t k, LookupOut& out) {
  lookup_checked(cpu_state(phrases, stamps), keys, k, phrases, out);
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

void pool_lookup_packed_cpu(const at::Tensor& record, int64_t capacity, int64_t phrase_len,
                            const at::Tensor& keys, int64_t k, LookupOut& out) {
  lookup_checked(packed_state(record, capacity, phrase_len), keys, k, record, out);
}

void pool_refine_packed_cpu(at::Tensor& record, int64_t capacity, int64_t phrase_len,
                            const at::Tensor& keys, const at::Tensor& slots,
                            const at::Tensor& new_phrases) {
  refine_checked(packed_state(record, capacity, phrase_len), keys, slots, new_phrases, record);
}

}  // namespace ouroboros
