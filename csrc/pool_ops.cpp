// The op table: every pool op's schema (torch.ops.ouroboros_kernels.*), the kernel that
// the dispatcher runs for it on each device, and the same device choice for the direct
// path (ouroboros::pool_insert / pool_lookup / pool_refine, used by pool_module.cpp).
// Adding a device or an op means editing this file and pool.h, nothing else.
#include "pool.h"

#include <torch/library.h>

#include <cstdlib>

namespace ouroboros {
namespace {

using LookupTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The registered lookups return their result (schema: -> (Tensor, Tensor, Tensor)); the
// entry points write into a LookupOut, allocated here.
template <void (*Lookup)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                         LookupOut&)>
LookupTuple lookup_op(const at::Tensor& phrases, const at::Tensor& stamps,
                      const at::Tensor& keys, int64_t k) {
  LookupOut out;
  Lookup(phrases, stamps, keys, k, out);
  return {std::move(out.phrases), std::move(out.counts), std::move(out.slots)};
}

LookupTuple lookup_packed_op(const at::Tensor& record, int64_t capacity, int64_t phrase_len,
                             const at::Tensor& keys, int64_t k) {
  LookupOut out;
  pool_lookup_packed_cpu(record, capacity, phrase_len, keys, k, out);
  return {std::move(out.phrases), std::move(out.counts), std::move(out.slots)};
}

[[noreturn]] void unsupported_device(const at::Tensor& phrases) {
  TORCH_CHECK_VALUE(false, "pool: no kernel for device ", phrases.device(),
                    phrases.is_cuda() ? " (the extension was built without CUDA)" : "");
  std::abort();  // unreachable
}

}  // namespace

void pool_insert(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                 const at::Tensor& keys, const at::Tensor& new_phrases) {
  if (phrases.is_cpu()) return pool_insert_cpu(phrases, stamps, clock, keys, new_phrases);
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) return pool_insert_cuda(phrases, stamps, clock, keys, new_phrases);
#endif
  unsupported_device(phrases);
}

void pool_lookup(const at::Tensor& phrases, const at::Tensor& stamps, const at::Tensor& keys,
                 int64_t k, LookupOut& out) {
  if (phrases.is_cpu()) return pool_lookup_cpu(phrases, stamps, keys, k, out);
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) return pool_lookup_cuda(phrases, stamps, keys, k, out);
#endif
  unsupported_device(phrases);
}

void pool_refine(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                 const at::Tensor& slots, const at::Tensor& new_phrases) {
  if (phrases.is_cpu()) return pool_refine_cpu(phrases, stamps, keys, slots, new_phrases);
#ifdef OUROBOROS_WITH_CUDA
  if (phrases.is_cuda()) return pool_refine_cuda(phrases, stamps, keys, slots, new_phrases);
#endif
  unsupported_device(phrases);
}

}  // namespace ouroboros

TORCH_LIBRARY(ouroboros_kernels, m) {
  // The generic layout (pool.h), on every device.
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
  m.impl("pool_lookup", &ouroboros::lookup_op<&ouroboros::pool_lookup_cpu>);
  m.impl("pool_refine", &ouroboros::pool_refine_cpu);
  m.impl("pool_insert_packed", &ouroboros::pool_insert_packed_cpu);
  m.impl("pool_lookup_packed", &ouroboros::lookup_packed_op);
  m.impl("pool_refine_packed", &ouroboros::pool_refine_packed_cpu);
}

#ifdef OUROBOROS_WITH_CUDA
TORCH_LIBRARY_IMPL(ouroboros_kernels, CUDA, m) {
  m.impl("pool_insert", &ouroboros::pool_insert_cuda);
  m.impl("pool_lookup", &ouroboros::lookup_op<&ouroboros::pool_lookup_cuda>);
  m.impl("pool_refine", &ouroboros::pool_refine_cuda);
}
#endif
