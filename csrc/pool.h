// The candidate pool: the semantics every implementation follows, and the C++ interface
// shared by the files of csrc/:
//
//   pool.h          this file: semantics, argument checks, per-device entry points
//   pool_checks.cpp the argument checks (shapes, dtypes, devices; no data read)
//   pool_cpu.cpp    the CPU kernels (generic and packed layouts) and their entry points
//   pool_cuda.cu    the CUDA kernels and their entry points (built with OUROBOROS_WITH_CUDA)
//   pool_ops.cpp    the op schemas, their registration per device, and the device choice of
//                   the direct path (pool_insert / pool_lookup / pool_refine below)
//   pool_module.cpp the Python module ouroboros_kernels._C: a direct (METH_FASTCALL) twin of
//                   each registered op, and the build information
//
// State (plain tensors, all on one device):
//   phrases  int32 [V, W, L]  the phrase stored in each slot; an empty slot holds -1s
//   stamps   int64 [V, W]     recency stamp of each slot, 0 = empty slot
//   clock    int64 [1]        stamps handed out so far (lives on the device: no host sync)
// V = vocabulary size (keys are token ids in [0, V)), W = capacity (slots per key),
// L = phrase length. Invariant: the non-empty phrases of one key are distinct.
// On the CPU, phrases and stamps may be strided by key (each key's row contiguous, rows
// not overlapping), and the CPU ops that write bump their version counters (as ATen's
// in-place ops do). CUDA requires contiguous tensors.
//
// The packed CPU layout (what CandidatePool uses on the CPU): one int32 buffer
// record [V, R] (contiguous, R even, R >= W * (3 + L)) holding, for key v in row v:
//   int32 [0, 2W)        the W int64 stamps of the key,
//   int32 [2W, 3W)       first_tokens: the first token of each slot's phrase, -1 if empty
//                        (a derived index, equal to phrases[v, :, 0]),
//   int32 [3W, 3W + WL)  the W phrases of L tokens.
// One key's stamps and index share a few adjacent cache lines, and the duplicate search
// reads the index instead of the phrase rows. pool_*_packed(record, W, L, ...) are the same
// ops on that layout (CPU only; the buffer and its dimensions come first); they keep the index
// up to date.
//
// pool_insert(phrases, stamps, clock, keys int64[M], new_phrases int32|int64[M, L])
//   Entries are applied in index order; entry i gets stamp clock + i + 1 and the clock
//   advances by M after the batch (so recency across keys is the sequential one).
//   A phrase already under its key gets the new stamp (becomes the most recent);
//   otherwise it takes the lowest-index empty slot, else it evicts the slot with the
//   smallest stamp (ties: lowest slot index), and gets the new stamp.
// pool_lookup(phrases, stamps, keys int64[M], k) -> (int32[M, k, L], int32[M], int32[M, k])
//   The min(k, #non-empty) most recent phrases of each key, newest first (stamp
//   descending, ties: lowest slot first), their count and slot indices; rows past the
//   count hold -1. Reads never change recency. k >= 1; k > W is allowed.
//   The C++ entry points (and the direct Python twins) also write the result into
//   caller-provided buffers: contiguous int32 tensors of exactly those shapes on the pool's
//   device, which a caller can reuse every step (no allocation). See LookupOut.
// pool_refine(phrases, stamps, keys int64[M], slots int32|int64[M], new_phrases int32|int64[M, L])
//   Entries are applied in index order. The phrase in (key, slot) is overwritten and keeps
//   its stamp; if the new phrase already sits in another non-empty slot of that key, the
//   refined slot is emptied instead (stamp 0, phrase -1s). Refining an empty slot is a no-op.
//
// Padding and invalid entries (identical on every device for padding):
//   * key == -1, slot == -1, or any phrase token == -1 marks an entry as padding: it is
//     skipped (an insert entry still consumes its stamp number; lookup of key -1 returns
//     count 0 and -1 rows). This lets callers pass fixed-size batches without a host sync.
//   * Any other value out of range (key < -1 or >= V, slot < -1 or >= W, token < -1, or an
//     int64 token > INT32_MAX) is invalid: the CPU ops raise ValueError before changing
//     anything; the CUDA ops cannot raise without a host sync, so they skip such entries
//     like padding (the Python layer checks them on request with validate=True).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace ouroboros {

// ---------------------------------------------------------------- argument checks
// (pool_checks.cpp; cheap: no data is read, so they never synchronise a device)

struct PoolDims {
  int64_t V, W, L;
};
// Shapes, dtypes and devices of the generic state. Returns {V, W, L}. With
// `require_contiguous` (the CUDA kernels) both tensors must be contiguous; the CPU kernels
// pass false and check their row strides themselves (cpu_state).
PoolDims check_state(const at::Tensor& phrases, const at::Tensor& stamps,
                     bool require_contiguous = true);
void check_clock(const at::Tensor& clock, const at::Tensor& phrases);
// Keys as a contiguous int64 tensor (int32 keys are converted; other dtypes raise).
at::Tensor checked_keys(const at::Tensor& keys, const at::Tensor& phrases);
void check_lookup_k(int64_t k);
void check_new_phrases(const at::Tensor& new_phrases, int64_t M, int64_t L,
                       const at::Tensor& phrases);
void check_slots(const at::Tensor& slots, int64_t M, const at::Tensor& phrases);

// The three result tensors of a lookup. Passed to a lookup entry point either empty (all
// three undefined: the entry point allocates them, int32 on the pool's device) or holding
// the caller's buffers (checked with check_lookup_out, then overwritten entirely).
struct LookupOut {
  at::Tensor phrases, counts, slots;  // [M, k, L], [M], [M, k]
};
// Allocate `out` if it is empty, else check its tensors' dtypes, shapes and devices.
void prepare_lookup_out(LookupOut& out, int64_t M, int64_t k, int64_t L,
                        const at::Tensor& phrases);

// ---------------------------------------------------------------- CPU (pool_cpu.cpp)

void pool_insert_cpu(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                     const at::Tensor& keys, const at::Tensor& new_phrases);
void pool_lookup_cpu(const at::Tensor& phrases, const at::Tensor& stamps,
                     const at::Tensor& keys, int64_t k, LookupOut& out);
void pool_refine_cpu(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                     const at::Tensor& slots, const at::Tensor& new_phrases);
// The same on the packed layout (record, W = capacity, L = phrase_len).
void pool_insert_packed_cpu(at::Tensor& record, at::Tensor& clock, int64_t capacity,
                            int64_t phrase_len, const at::Tensor& keys,
                            const at::Tensor& new_phrases);
void pool_lookup_packed_cpu(const at::Tensor& record, int64_t capacity, int64_t phrase_len,
                            const at::Tensor& keys, int64_t k, LookupOut& out);
void pool_refine_packed_cpu(at::Tensor& record, int64_t capacity, int64_t phrase_len,
                            const at::Tensor& keys, const at::Tensor& slots,
                            const at::Tensor& new_phrases);

#ifdef OUROBOROS_WITH_CUDA
// ---------------------------------------------------------------- CUDA (pool_cuda.cu)

void pool_insert_cuda(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                      const at::Tensor& keys, const at::Tensor& new_phrases);
void pool_lookup_cuda(const at::Tensor& phrases, const at::Tensor& stamps,
                      const at::Tensor& keys, int64_t k, LookupOut& out);
void pool_refine_cuda(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                      const at::Tensor& slots, const at::Tensor& new_phrases);
// The CUDA runtime version the .cu was compiled against (CUDART_VERSION).
int64_t cuda_runtime_build_version();
// Experimental insert path (the leader warp of a key keeps its row in registers while it
// applies the key's entries; W <= 32, L <= 8): off by default until measured on a GPU.
void set_cuda_insert_cached(bool enabled);
bool cuda_insert_cached();
#endif

// ---------------------------------------------------------------- any device (pool_ops.cpp)
// The generic ops on the kernel of the state's device, chosen as the dispatcher would
// choose it (the direct path: no dispatcher overhead). A device without a kernel raises
// ValueError.

void pool_insert(at::Tensor& phrases, at::Tensor& stamps, at::Tensor& clock,
                 const at::Tensor& keys, const at::Tensor& new_phrases);
void pool_lookup(const at::Tensor& phrases, const at::Tensor& stamps, const at::Tensor& keys,
                 int64_t k, LookupOut& out);
void pool_refine(at::Tensor& phrases, at::Tensor& stamps, const at::Tensor& keys,
                 const at::Tensor& slots, const at::Tensor& new_phrases);

}  // namespace ouroboros
