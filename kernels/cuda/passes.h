// Host-side launchers of the kernels, shared by host_api.cu and the per-dtype units.
#pragma once

#include <cuda_runtime.h>

#include "params.cuh"

namespace i2am {

enum class Pass { kStats, kMain };

// One attention pass for input type T; head_dim: the bucket 64, 128 or 256 holding d and dv.
// Grid: (p.slots, p.heads, recorded entries).
template <class T>
void launch_attention_pass(Pass pass, const Params& p, int n_record, int head_dim, cudaStream_t stream);

// Dense key probes: u[r][ref_idx[j]] = sum of key_probes[r][j'] over j' with the same key, in
// increasing j' (deterministic also when ref_idx repeats a key). u: zeroed [rows][nk];
// link: 2 * n_ref ints of scratch.
void launch_scatter_key_probes(const float* key_probes, const int64_t* ref_idx, int n_ref, int rows, int nk,
                               float* u, int* link, cudaStream_t stream);

// dst[r] = src[r] / scale[r] with scale[r] the power of two >= max |src[r]| (1 for a zero
// row): exact, and keeps probe values near 1 when rounded to fp16/bf16 tiles.
void launch_normalize_rows(const float* src, float* dst, float* scale, int rows, int cols, cudaStream_t stream);

// lse_col[ih][k] from the per-slot (max, sum) partials of the stats pass; +inf where the sum
// fell below p.tiny (stats_pass.cuh).
void launch_column_lse(const Params& p, int n_record, cudaStream_t stream);

// lse_row (kRows) or lse_col (kColumns) recomputed with each row's (column's) own shift where
// it holds +inf; elsewhere left as it is. dtype: enum i2am_dtype of q and k.
enum class ExactLse { kRows, kColumns };
void launch_exact_lse(ExactLse which, int dtype, const Params& p, int n_record, cudaStream_t stream);

// Per (entry, head): head_shift, from_p and col_factor (params.cuh) from lse_row and lse_col.
void launch_c_from_p(const Params& p, int n_record, cudaStream_t stream);

// map[i][h][r][j] += m_scale[r] * sum over slots of part[ih][slot][r][ref_idx[j]].
void launch_reduce_ref(const float* part, const int64_t* ref_idx, const float* m_scale, float* map,
                       const Strides& map_strides, int n_record, int heads, int slots, int rows, int nk, int n_ref,
                       cudaStream_t stream);

}  // namespace i2am
