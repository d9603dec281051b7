// Argument checks shared by the CPU and CUDA entry points (declared in pool.h). They read
// only shapes, dtypes, strides and devices, never tensor data, so they never synchronise a
// device; errors are ValueError / TypeError naming the argument.
#include "pool.h"

namespace ouroboros {

PoolDims check_state(const at::Tensor& phrases, const at::Tensor& stamps,
                     bool require_contiguous) {
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
  TORCH_CHECK_VALUE(!require_contiguous || (phrases.is_contiguous() && stamps.is_contiguous()),
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

void check_lookup_k(int64_t k) { TORCH_CHECK_VALUE(k >= 1, "k: expected k >= 1, got ", k); }

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

void prepare_lookup_out(LookupOut& out, int64_t M, int64_t k, int64_t L,
                        const at::Tensor& phrases) {
  if (!out.phrases.defined()) {
    const auto opts = phrases.options().dtype(at::kInt);  // on the pool's device
    out.phrases = at::empty({M, k, L}, opts);
    out.counts = at::empty({M}, opts);
    out.slots = at::empty({M, k}, opts);
    return;
  }
  const int64_t phrases_shape[3] = {M, k, L};
  const int64_t slots_shape[2] = {M, k};
  check_out_tensor(out.phrases, "phrases", phrases_shape, phrases);
  check_out_tensor(out.counts, "counts", at::IntArrayRef(&M, 1), phrases);
  check_out_tensor(out.slots, "slots", slots_shape, phrases);
}

}  // namespace ouroboros
