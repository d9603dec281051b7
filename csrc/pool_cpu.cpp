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

#include <cstring>
#include <limits>
#include <string>

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

void check_keys(const at::Tensor& keys, const at::Tensor& phrases, const char* name) {
  TORCH_CHECK_TYPE(keys.scalar_type() == at::kLong, name, ": expected int64, got ",
                   keys.scalar_type());
  TORCH_CHECK_VALUE(keys.dim() == 1, name, ": expected shape [M], got ", keys.sizes());
  TORCH_CHECK_VALUE(keys.device() == phrases.device(), name, ": on ", keys.device(),
                    " but the pool is on ", phrases.device());
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

// ---------------------------------------------------------------- CPU kernels

namespace {

// 1 = valid phrase, 0 = padding (contains -1); raises on any other out-of-range token.
template <typename T>
bool phrase_is_valid_or_throw(const T* tokens, int64_t L, int64_t row) {
  bool padding = false;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t t = static_cast<int64_t>(tokens[l]);
    if (t == -1) {
      padding = true;
    } else {
      TORCH_CHECK_VALUE(t >= 0 && t <= std::numeric_limits<int32_t>::max(), "phrases: row ",
                        row, " holds token ", t,
                        " (tokens must be in [0, 2**31), or -1 to mark a padding row)");
    }
  }
  return !padding;
}

inline void check_key_value(int64_t key, int64_t V, int64_t row, const char* name) {
  TORCH_CHECK_VALUE(key >= -1 && key < V, name, ": entry ", row, " is ", key,
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

template <typename T>
void insert_impl(int32_t* phrases, int64_t* stamps, int64_t* clock, const int64_t* keys,
                 const T* tokens, int64_t M, const PoolDims& d) {
  const int64_t W = d.W, L = d.L;
  // Validate everything first so that a bad batch changes nothing.
  // (Heap use avoided: the validity of each row is recomputed below, which is cheap.)
  for (int64_t i = 0; i < M; ++i) {
    check_key_value(keys[i], d.V, i, "keys");
    phrase_is_valid_or_throw(tokens + i * L, L, i);
  }
  const int64_t base = clock[0];
  for (int64_t i = 0; i < M; ++i) {
    const int64_t key = keys[i];
    const T* phrase = tokens + i * L;
    if (key < 0 || !phrase_is_valid_or_throw(phrase, L, i)) continue;  // padding
    const int64_t stamp = base + i + 1;
    int64_t* srow = stamps + key * W;
    int32_t* prow = phrases + key * W * L;
    int64_t first_empty = -1, oldest = -1;
    int64_t oldest_stamp = std::numeric_limits<int64_t>::max();
    int64_t target = -1;
    for (int64_t w = 0; w < W; ++w) {
      const int64_t s = srow[w];
      if (s == 0) {
        if (first_empty < 0) first_empty = w;
        continue;
      }
      if (same_phrase(prow + w * L, phrase, L)) {
        target = w;  // phrases of a key are distinct: at most one match
        break;
      }
      if (s < oldest_stamp) {
        oldest_stamp = s;
        oldest = w;
      }
    }
    if (target >= 0) {
      srow[target] = stamp;
      continue;
    }
    // The scan stopped early only on a match, so first_empty/oldest cover all slots here.
    target = first_empty >= 0 ? first_empty : oldest;
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
    check_key_value(keys[i], d.V, i, "keys");
    const int64_t slot = static_cast<int64_t>(slots[i]);
    TORCH_CHECK_VALUE(slot >= -1 && slot < W, "slots: entry ", i, " is ", slot,
                      " (slots must be in [0, ", W, "), or -1 to mark padding)");
    phrase_is_valid_or_throw(tokens + i * L, L, i);
  }
  for (int64_t i = 0; i < M; ++i) {
    const int64_t key = keys[i];
    const int64_t slot = static_cast<int64_t>(slots[i]);
    const T* phrase = tokens + i * L;
    if (key < 0 || slot < 0 || !phrase_is_valid_or_throw(phrase, L, i)) continue;
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
  check_keys(keys, phrases, "keys");
  const int64_t M = keys.size(0);
  check_new_phrases(new_phrases, M, d.L, phrases);
  const at::Tensor keys_c = keys.contiguous();
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_lookup_cpu(const at::Tensor& phrases,
                                                               const at::Tensor& stamps,
                                                               const at::Tensor& keys,
                                                               int64_t k) {
  const PoolDims d = check_state(phrases, stamps);
  check_keys(keys, phrases, "keys");
  TORCH_CHECK_VALUE(k >= 1, "k: expected k >= 1, got ", k);
  const int64_t M = keys.size(0), W = d.W, L = d.L;
  const at::Tensor keys_c = keys.contiguous();
  const int64_t* key_ptr = keys_c.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) check_key_value(key_ptr[m], d.V, m, "keys");

  auto opts = phrases.options();  // int32, CPU
  at::Tensor out_phrases = at::empty({M, k, L}, opts);
  at::Tensor out_counts = at::empty({M}, opts);
  at::Tensor out_slots = at::empty({M, k}, opts);
  int32_t* op = out_phrases.data_ptr<int32_t>();
  int32_t* oc = out_counts.data_ptr<int32_t>();
  int32_t* os = out_slots.data_ptr<int32_t>();
  const int32_t* pp = phrases.data_ptr<int32_t>();
  const int64_t* sp = stamps.data_ptr<int64_t>();

  for (int64_t m = 0; m < M; ++m) {
    const int64_t key = key_ptr[m];
    int64_t count = 0;
    if (key >= 0) {
      const int64_t* srow = sp + key * W;
      const int32_t* prow = pp + key * W * L;
      // Selection by (stamp descending, slot ascending): each round takes the best slot
      // that ranks strictly after the previous pick. O(min(k, W) * W) with no allocation.
      int64_t prev_stamp = std::numeric_limits<int64_t>::max();
      int64_t prev_slot = -1;
      while (count < k) {
        int64_t best = -1, best_stamp = 0;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t s = srow[w];
          if (s == 0) continue;
          const bool after_prev = s < prev_stamp || (s == prev_stamp && w > prev_slot);
          if (after_prev && (best < 0 || s > best_stamp)) {  // ties keep the lower slot
            best = w;
            best_stamp = s;
          }
        }
        if (best < 0) break;
        std::memcpy(op + (m * k + count) * L, prow + best * L, L * sizeof(int32_t));
        os[m * k + count] = static_cast<int32_t>(best);
        prev_stamp = best_stamp;
        prev_slot = best;
        ++count;
      }
    }
    oc[m] = static_cast<int32_t>(count);
    for (int64_t r = count; r < k; ++r) {
      for (int64_t l = 0; l < L; ++l) op[(m * k + r) * L + l] = -1;
      os[m * k + r] = -1;
    }
  }
  return {out_phrases, out_counts, out_slots};
}

void pool_refine_cpu(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                     const at::Tensor& slots, const at::Tensor& new_phrases) {
  const PoolDims d = check_state(phrases, stamps);
  check_keys(keys, phrases, "keys");
  const int64_t M = keys.size(0);
  check_slots(slots, M, phrases);
  check_new_phrases(new_phrases, M, d.L, phrases);
  const at::Tensor keys_c = keys.contiguous();
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
}
