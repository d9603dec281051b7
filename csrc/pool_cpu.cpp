// The candidate pool on the CPU, the op schemas, and the Python module with build info.
// Semantics: see pool.h. Everything here is sequential by design: the pool's result is
// defined as the sequential one, and a step's batch is small (hundreds of entries).
#include "pool.h"

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

// Whether every value of values[0 .. n) lies in [lo, hi] (vectorisable min/max).
template <typename T>
inline bool all_in_range(const T* values, int64_t n, int64_t lo, int64_t hi) {
  int64_t vmin = lo, vmax = hi;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(values[i]);
    vmin = v < vmin ? v : vmin;
    vmax = v > vmax ? v : vmax;
  }
  return vmin >= lo && vmax <= hi;
}

inline void check_key_value(int64_t key, int64_t V, int64_t row) {
  TORCH_CHECK_VALUE(key >= -1 && key < V, "keys: entry ", row, " is ", key,
                    " (keys must be in [0, ", V, "), or -1 to mark padding)");
}

template <typename T>
inline bool same_phrase(const int32_t* stored, const T* tokens, int64_t L) {
  for (int64_t l = 0; l < L; ++l) {
    if (stored[l] != static_cast<int32_t>(tokens[l])) return false;
  }
  return true;
}

template <typename T>
inline void store_phrase(int32_t* stored, const T* tokens, int64_t L) {
  for (int64_t l = 0; l < L; ++l) stored[l] = static_cast<int32_t>(tokens[l]);
}

// The occupied slot of a key that holds `phrase`, or -1. A branch-free pass marks the slots
// whose first token matches (rarely more than one); only those are compared in full.
template <typename T>
inline int64_t find_phrase(const int32_t* prow, const int64_t* srow, const T* phrase,
                           int64_t W, int64_t L) {
  const int32_t first = static_cast<int32_t>(phrase[0]);
  for (int64_t base = 0; base < W; base += 64) {
    const int64_t n = W - base < 64 ? W - base : 64;
    const int32_t* column = prow + base * L;
    uint64_t hits = 0;
    for (int64_t w = 0; w < n; ++w) hits |= static_cast<uint64_t>(column[w * L] == first) << w;
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
// (stamp, slot): one branch-free pass.
inline int64_t slot_for_new_phrase(const int64_t* srow, int64_t W) {
  int64_t target = 0, target_stamp = srow[0];
  for (int64_t w = 1; w < W; ++w) {
    const int64_t s = srow[w];
    target = s < target_stamp ? w : target;
    target_stamp = s < target_stamp ? s : target_stamp;
  }
  return target;
}

// Rows of upcoming entries are prefetched: with a large vocabulary the pool (tens of MB)
// does not fit in cache, and each insert would otherwise wait for its lines in turn.
constexpr int64_t kPrefetchDistance = 6;

inline void prefetch_row(const int32_t* phrases, const int64_t* stamps, int64_t key,
                         const PoolDims& d) {
#if defined(__GNUC__)
  if (key < 0 || key >= d.V) return;
  const char* srow = reinterpret_cast<const char*>(stamps + key * d.W);
  for (int64_t off = 0; off < d.W * 8; off += 64) __builtin_prefetch(srow + off, 1);
  const char* prow = reinterpret_cast<const char*>(phrases + key * d.W * d.L);
  for (int64_t off = 0; off < d.W * d.L * 4; off += 64) __builtin_prefetch(prow + off, 1);
#endif
}

template <typename T>
void insert_impl(int32_t* phrases, int64_t* stamps, int64_t* clock, const int64_t* keys,
                 const T* tokens, int64_t M, const PoolDims& d) {
  const int64_t W = d.W, L = d.L;
  // Validate everything first so that a bad batch changes nothing: one branch-free pass
  // over keys and tokens, and the row-by-row search for the culprit only if it fails.
  if (!all_in_range(keys, M, -1, d.V - 1) ||
      !all_in_range(tokens, M * L, -1, std::numeric_limits<int32_t>::max())) {
    for (int64_t i = 0; i < M; ++i) {
      check_key_value(keys[i], d.V, i);
      check_phrase_row(tokens + i * L, L, i);
    }
  }
  const int64_t base = clock[0];
  for (int64_t i = 0; i < M && i < kPrefetchDistance; ++i) {
    prefetch_row(phrases, stamps, keys[i], d);
  }
  for (int64_t i = 0; i < M; ++i) {
    if (i + kPrefetchDistance < M) prefetch_row(phrases, stamps, keys[i + kPrefetchDistance], d);
    const int64_t key = keys[i];
    const T* phrase = tokens + i * L;
    if (key < 0 || phrase_kind(phrase, L) != kValid) continue;  // padding
    const int64_t stamp = base + i + 1;
    int64_t* srow = stamps + key * W;
    int32_t* prow = phrases + key * W * L;
    int64_t target = find_phrase(prow, srow, phrase, W, L);
    if (target >= 0) {  // already there: becomes the most recent
      srow[target] = stamp;
      continue;
    }
    target = slot_for_new_phrase(srow, W);
    srow[target] = stamp;
    store_phrase(prow + target * L, phrase, L);
  }
  clock[0] = base + M;
}

template <typename S, typename T>
void refine_impl(int32_t* phrases, int64_t* stamps, const int64_t* keys, const S* slots,
                 const T* tokens, int64_t M, const PoolDims& d) {
  const int64_t W = d.W, L = d.L;
  for (int64_t i = 0; i < M; ++i) {
    check_key_value(keys[i], d.V, i);
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
    int64_t* srow = stamps + key * W;
    int32_t* prow = phrases + key * W * L;
    if (srow[slot] == 0) continue;  // refining an empty slot is a no-op
    bool duplicate = false;
    for (int64_t w = 0; w < W && !duplicate; ++w) {
      duplicate = w != slot && srow[w] != 0 && same_phrase(prow + w * L, phrase, L);
    }
    if (duplicate) {
      srow[slot] = 0;
      for (int64_t l = 0; l < L; ++l) prow[slot * L + l] = -1;
    } else {
      store_phrase(prow + slot * L, phrase, L);
    }
  }
}

}  // namespace

void pool_insert_cpu(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                     const at::Tensor& keys, const at::Tensor& new_phrases) {
  const PoolDims d = check_state(phrases, stamps);
  check_clock(clock, phrases);
  const at::Tensor keys_c = checked_keys(keys, phrases);
  const int64_t M = keys_c.size(0);
  check_new_phrases(new_phrases, M, d.L, phrases);
  const at::Tensor tokens_c = new_phrases.contiguous();
  if (tokens_c.scalar_type() == at::kInt) {
    insert_impl(phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(),
                clock.data_ptr<int64_t>(), keys_c.data_ptr<int64_t>(),
                tokens_c.data_ptr<int32_t>(), M, d);
  } else {
    insert_impl(phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(),
                clock.data_ptr<int64_t>(), keys_c.data_ptr<int64_t>(),
                tokens_c.data_ptr<int64_t>(), M, d);
  }
}

namespace {

// Lookup of keys[0 .. M) into op [M, k, L], oc [M], os [M, k] (keys already range-checked).
void lookup_fill(const int32_t* pp, const int64_t* sp, const int64_t* key_ptr, int64_t M,
                 int64_t k, const PoolDims& d, int32_t* op, int32_t* oc, int32_t* os) {
  const int64_t W = d.W, L = d.L;
  // Occupied slots of a key, newest first; on the stack for the usual W <= 64.
  int32_t order_local[64];
  std::vector<int32_t> order_heap(W > 64 ? W : 0);
  int32_t* order = W > 64 ? order_heap.data() : order_local;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t key = key_ptr[m];
    int64_t count = 0;
    if (key >= 0) {
      const int64_t* srow = sp + key * W;
      const int32_t* prow = pp + key * W * L;
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
at::Tensor checked_lookup_keys(const at::Tensor& phrases, const at::Tensor& stamps,
                               const at::Tensor& keys, int64_t k, PoolDims* d) {
  *d = check_state(phrases, stamps);
  at::Tensor keys_c = checked_keys(keys, phrases);
  TORCH_CHECK_VALUE(k >= 1, "k: expected k >= 1, got ", k);
  const int64_t M = keys_c.size(0);
  const int64_t* key_ptr = keys_c.data_ptr<int64_t>();
  if (!all_in_range(key_ptr, M, -1, d->V - 1)) {
    for (int64_t m = 0; m < M; ++m) check_key_value(key_ptr[m], d->V, m);
  }
  return keys_c;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_lookup_cpu(const at::Tensor& phrases,
                                                               const at::Tensor& stamps,
                                                               const at::Tensor& keys,
                                                               int64_t k) {
  PoolDims d;
  const at::Tensor keys_c = checked_lookup_keys(phrases, stamps, keys, k, &d);
  const int64_t M = keys_c.size(0);
  auto opts = phrases.options();  // int32, CPU
  at::Tensor out_phrases = at::empty({M, k, d.L}, opts);
  at::Tensor out_counts = at::empty({M}, opts);
  at::Tensor out_slots = at::empty({M, k}, opts);
  lookup_fill(phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(),
              keys_c.data_ptr<int64_t>(), M, k, d, out_phrases.data_ptr<int32_t>(),
              out_counts.data_ptr<int32_t>(), out_slots.data_ptr<int32_t>());
  return {out_phrases, out_counts, out_slots};
}

void pool_lookup_out_cpu(const at::Tensor& phrases, const at::Tensor& stamps,
                         const at::Tensor& keys, int64_t k, at::Tensor& out_phrases,
                         at::Tensor& out_counts, at::Tensor& out_slots) {
  PoolDims d;
  const at::Tensor keys_c = checked_lookup_keys(phrases, stamps, keys, k, &d);
  const int64_t M = keys_c.size(0);
  check_lookup_out(out_phrases, out_counts, out_slots, M, k, d.L, phrases);
  lookup_fill(phrases.data_ptr<int32_t>(), stamps.data_ptr<int64_t>(),
              keys_c.data_ptr<int64_t>(), M, k, d, out_phrases.data_ptr<int32_t>(),
              out_counts.data_ptr<int32_t>(), out_slots.data_ptr<int32_t>());
}

void pool_refine_cpu(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                     const at::Tensor& slots, const at::Tensor& new_phrases) {
  const PoolDims d = check_state(phrases, stamps);
  const at::Tensor keys_c = checked_keys(keys, phrases);
  const int64_t M = keys_c.size(0);
  check_slots(slots, M, phrases);
  check_new_phrases(new_phrases, M, d.L, phrases);
  const at::Tensor slots_c = slots.contiguous();
  const at::Tensor tokens_c = new_phrases.contiguous();
  int32_t* pp = phrases.data_ptr<int32_t>();
  int64_t* sp = stamps.data_ptr<int64_t>();
  const int64_t* kp = keys_c.data_ptr<int64_t>();
  const bool slots32 = slots_c.scalar_type() == at::kInt;
  const bool tokens32 = tokens_c.scalar_type() == at::kInt;
  if (slots32 && tokens32) {
    refine_impl(pp, sp, kp, slots_c.data_ptr<int32_t>(), tokens_c.data_ptr<int32_t>(), M, d);
  } else if (slots32) {
    refine_impl(pp, sp, kp, slots_c.data_ptr<int32_t>(), tokens_c.data_ptr<int64_t>(), M, d);
  } else if (tokens32) {
    refine_impl(pp, sp, kp, slots_c.data_ptr<int64_t>(), tokens_c.data_ptr<int32_t>(), M, d);
  } else {
    refine_impl(pp, sp, kp, slots_c.data_ptr<int64_t>(), tokens_c.data_ptr<int64_t>(), M, d);
  }
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
}

TORCH_LIBRARY_IMPL(ouroboros_kernels, CPU, m) {
  m.impl("pool_insert", &ouroboros::pool_insert_cpu);
  m.impl("pool_lookup", &ouroboros::pool_lookup_cpu);
  m.impl("pool_refine", &ouroboros::pool_refine_cpu);
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
  m.attr("built_with_cuda") = true;
  const int64_t v = ouroboros::cuda_runtime_build_version();
  m.attr("cuda_version") = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
  m.attr("built_with_cuda") = false;
  m.attr("cuda_version") = pybind11::none();
#endif
  m.attr("torch_version") = torch_build_version();
  m.def("pool_insert", &insert_direct, "Same as torch.ops.ouroboros_kernels.pool_insert");
  m.def("pool_lookup", &lookup_direct, "Same as torch.ops.ouroboros_kernels.pool_lookup");
  m.def("pool_lookup_out", &lookup_out_direct,
        "pool_lookup written into caller-provided int32 tensors (phrases [M, k, L], "
        "counts [M], slots [M, k]); returns None");
  m.def("pool_refine", &refine_direct, "Same as torch.ops.ouroboros_kernels.pool_refine");
}
