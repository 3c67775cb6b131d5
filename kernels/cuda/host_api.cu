// The C entry points: argument checks, the plan (slots, workspace layout) and the sequence of
// launches. Every CUDA call and launch is checked; failures become status codes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "errors.h"
#include "passes.h"

namespace i2am {
namespace {

thread_local std::string last_error;

constexpr int kBlocksPerSm = 2;  // target resident blocks per SM when choosing the slot count
constexpr int kMaxHeadDim = 256;

// Device memory carved out of the caller's workspace; with base == nullptr it only measures.
class Arena {
  public:
    explicit Arena(char* base) : base_(base) {}
    template <class X>
    X* take(size_t count) {
        offset_ = (offset_ + 255) / 256 * 256;
        X* at = base_ ? reinterpret_cast<X*>(base_ + offset_) : nullptr;
        offset_ += count * sizeof(X);
        return at;
    }
    size_t bytes() const { return offset_; }

  private:
    char* base_;
    size_t offset_ = 0;
};

struct Plan {
    Params p{};
    int head_dim = 0, n_record = 0, n_ref = 0, probe_chunks = 0;
    float *u = nullptr, *u_scale = nullptr, *m = nullptr, *m_scale = nullptr;
    int* link = nullptr;
    float* ref_map[2] = {};  // caller's ref_key, ref_query
    Strides ref_s[2] = {};
    size_t bytes = 0;
};

void require(bool ok, const std::string& what) {
    if (!ok) throw Error(I2AM_INVALID_ARGUMENT, what);
}

Strides strides_of(const int64_t (&s)[4]) { return {s[0], s[1], s[2], s[3]}; }

bool gen_requested(const i2am_problem& pr) { return pr.maps[I2AM_GEN_QUERY] || pr.maps[I2AM_GEN_KEY]; }
bool ref_requested(const i2am_problem& pr) { return pr.maps[I2AM_REF_KEY] || pr.maps[I2AM_REF_QUERY]; }

void validate(const i2am_problem* pr) {
    require(pr != nullptr, "problem is NULL");
    require(pr->dtype == I2AM_F16 || pr->dtype == I2AM_BF16 || pr->dtype == I2AM_F32,
            "dtype must be I2AM_F16, I2AM_BF16 or I2AM_F32, got " + std::to_string(pr->dtype));
    require(pr->batch > 0 && pr->heads > 0 && pr->nq > 0 && pr->nk > 0 && pr->d > 0 && pr->dv > 0,
            "batch, heads, nq, nk, d and dv must be positive");
    require(pr->d <= kMaxHeadDim && pr->dv <= kMaxHeadDim,
            "head dims up to 256 are supported, got d=" + std::to_string(pr->d) + " dv=" + std::to_string(pr->dv));
    require(pr->heads <= 65535 && pr->n_record <= 65535, "heads and recorded entries are limited to 65535");
    require(pr->n_record > 0 && pr->n_record <= pr->batch, "n_record must be in 1..batch");
    require(pr->n_ref > 0, "n_ref must be positive");
    require(std::isfinite(pr->scale) && pr->scale > 0, "scale must be positive and finite");
    require(std::isfinite(pr->c_from_p_range) && pr->c_from_p_range < 128,
            "c_from_p_range must be finite and below 128 (2^range must fit a float)");
    require(pr->q && pr->k && pr->v && pr->out && pr->record_idx && pr->ref_idx,
            "q, k, v, out, record_idx and ref_idx must be device pointers");
    require(!gen_requested(*pr) || (pr->key_probes && pr->n_key_probes > 0),
            "gen maps need key_probes with n_key_probes > 0");
    require(!ref_requested(*pr) || (pr->query_probes && pr->n_query_probes > 0),
            "ref maps need query_probes with n_query_probes > 0");
}

int head_dim_bucket(int d) { return d <= 64 ? 64 : d <= 128 ? 128 : 256; }

// 16-byte loads need unit column stride and 16-byte aligned rows of every (b, h, n).
bool vector_loads_ok(const void* ptr, const int64_t (&s)[4], size_t elem) {
    const auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
    return s[3] == 1 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && aligned(s[0] * int64_t(elem)) &&
           aligned(s[1] * int64_t(elem)) && aligned(s[2] * int64_t(elem));
}

size_t element_size(int dtype) { return dtype == I2AM_F32 ? 4 : 2; }

// The slot count: enough blocks for kBlocksPerSm per SM, no empty slot. It depends only on
// the problem and the device, so results are reproducible on one device.
void choose_slots(Params& p, int n_record, int sm_count) {
    const int blocks = ceil_div(p.nq, kBlockQ);
    const int want = ceil_div(kBlocksPerSm * sm_count, n_record * p.heads);
    const int slots = want < 1 ? 1 : want > blocks ? blocks : want;
    p.blocks_per_slot = ceil_div(blocks, slots);
    p.slots = ceil_div(blocks, p.blocks_per_slot);
}

Plan make_plan(const i2am_problem& pr, char* workspace, int sm_count) {
    Plan plan;
    Params& p = plan.p;
    const size_t elem = element_size(pr.dtype);
    p.q = pr.q, p.k = pr.k, p.v = pr.v, p.out = pr.out;
    p.qs = strides_of(pr.q_stride), p.ks = strides_of(pr.k_stride), p.vs = strides_of(pr.v_stride);
    p.os = strides_of(pr.out_stride);
    p.q_vec = vector_loads_ok(pr.q, pr.q_stride, elem);
    p.k_vec = vector_loads_ok(pr.k, pr.k_stride, elem);
    p.v_vec = vector_loads_ok(pr.v, pr.v_stride, elem);
    p.heads = pr.heads, p.nq = pr.nq, p.nk = pr.nk, p.d = pr.d, p.dv = pr.dv;
    p.scale_log2 = float(pr.scale * 1.4426950408889634);  // log2(e)
    p.record_idx = pr.record_idx;
    choose_slots(p, pr.n_record, sm_count);
    p.need_c = pr.maps[I2AM_GEN_QUERY] || pr.maps[I2AM_REF_QUERY];
    p.c_range = float(pr.c_from_p_range);
    p.tiny = pr.c_from_p_range < 0 ? INFINITY : std::exp2(-float(pr.c_from_p_range));
    p.n_u = gen_requested(pr) ? pr.n_key_probes : 0;
    p.n_m = ref_requested(pr) ? pr.n_query_probes : 0;
    const int gen_ids[2] = {I2AM_GEN_KEY, I2AM_GEN_QUERY}, ref_ids[2] = {I2AM_REF_KEY, I2AM_REF_QUERY};
    for (int sx = 0; sx < 2; ++sx) {
        p.gen[sx] = pr.maps[gen_ids[sx]];
        p.gen_s[sx] = strides_of(pr.map_stride[gen_ids[sx]]);
        plan.ref_map[sx] = pr.maps[ref_ids[sx]];
        plan.ref_s[sx] = strides_of(pr.map_stride[ref_ids[sx]]);
    }

    const int64_t heads_rec = int64_t(pr.n_record) * pr.heads;
    Arena arena(workspace);
    p.lse_row = arena.take<float>(heads_rec * pr.nq);
    if (p.need_c) {
        p.col_part = arena.take<MaxSum>(heads_rec * p.slots * pr.nk);
        p.lse_col = arena.take<float>(heads_rec * pr.nk);
        p.head_shift = arena.take<float>(heads_rec);
        p.from_p = arena.take<int>(heads_rec);
        p.col_factor = arena.take<float>(heads_rec * pr.nk);
    }
    if (p.n_u) {
        plan.u = arena.take<float>(int64_t(p.n_u) * pr.nk);
        plan.u_scale = arena.take<float>(p.n_u);
        plan.link = arena.take<int>(2 * int64_t(pr.n_ref));
    }
    if (p.n_m) {
        plan.m = arena.take<float>(int64_t(p.n_m) * pr.nq);
        plan.m_scale = arena.take<float>(p.n_m);
    }
    for (int sx = 0; sx < 2; ++sx)
        if (plan.ref_map[sx]) p.ref_part[sx] = arena.take<float>(heads_rec * p.slots * p.n_m * pr.nk);
    p.u = plan.u, p.u_scale = plan.u_scale, p.m = plan.m;

    plan.head_dim = head_dim_bucket(pr.d > pr.dv ? pr.d : pr.dv);
    plan.n_record = pr.n_record;
    plan.n_ref = pr.n_ref;
    const int rows = p.n_u > p.n_m ? p.n_u : p.n_m;
    plan.probe_chunks = rows ? ceil_div(rows, kProbeTile) : 1;
    plan.bytes = arena.bytes();
    return plan;
}

int sm_count_of(int device) {
    check_cuda(cudaSetDevice(device), ("selecting CUDA device " + std::to_string(device)).c_str());
    int n = 0;
    check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "querying the SM count");
    return n;
}

void launch_attention(Pass pass, int dtype, const Params& p, const Plan& plan, cudaStream_t stream) {
    switch (dtype) {
        case I2AM_F16: return launch_attention_pass<__half>(pass, p, plan.n_record, plan.head_dim, stream);
        case I2AM_BF16: return launch_attention_pass<__nv_bfloat16>(pass, p, plan.n_record, plan.head_dim, stream);
        default: return launch_attention_pass<float>(pass, p, plan.n_record, plan.head_dim, stream);
    }
}

void run(const i2am_problem& pr, const Plan& plan, cudaStream_t stream) {
    const Params& p = plan.p;
    if (p.n_u) {
        launch_scatter_key_probes(pr.key_probes, pr.ref_idx, pr.n_ref, p.n_u, p.nk, plan.u, plan.link, stream);
        launch_normalize_rows(plan.u, plan.u, plan.u_scale, p.n_u, p.nk, stream);
    }
    if (p.n_m) launch_normalize_rows(pr.query_probes, plan.m, plan.m_scale, p.n_m, p.nq, stream);
    launch_attention(Pass::kStats, pr.dtype, p, plan, stream);
    launch_exact_lse(ExactLse::kRows, pr.dtype, p, plan.n_record, stream);
    if (p.need_c) {
        launch_column_lse(p, plan.n_record, stream);
        launch_exact_lse(ExactLse::kColumns, pr.dtype, p, plan.n_record, stream);
        launch_c_from_p(p, plan.n_record, stream);
    }
    for (int chunk = 0; chunk < plan.probe_chunks; ++chunk) {
        Params pc = p;  // probe rows r0 .. r0 + kProbeTile of both probe kinds
        pc.r0 = chunk * kProbeTile;
        pc.write_out = chunk == 0;
        launch_attention(Pass::kMain, pr.dtype, pc, plan, stream);
    }
    for (int sx = 0; sx < 2; ++sx)
        if (plan.ref_map[sx])
            launch_reduce_ref(p.ref_part[sx], pr.ref_idx, plan.m_scale, plan.ref_map[sx], plan.ref_s[sx],
                              plan.n_record, p.heads, p.slots, p.n_m, p.nk, plan.n_ref, stream);
}

template <class F>
int guarded(F&& body) {
    try {
        body();
        last_error.clear();
        return I2AM_OK;
    } catch (const Error& e) {
        last_error = e.what();
        return e.status;
    } catch (const std::exception& e) {
        last_error = std::string("internal error: ") + e.what();
    } catch (...) {
        last_error = "internal error";
    }
    return I2AM_INTERNAL;
}

}  // namespace
}  // namespace i2am

extern "C" {

size_t i2am_problem_size(void) { return sizeof(i2am_problem); }

int i2am_workspace_bytes(const i2am_problem* pr, size_t* bytes) {
    return i2am::guarded([&] {
        i2am::validate(pr);
        i2am::require(bytes != nullptr, "bytes is NULL");
        *bytes = i2am::make_plan(*pr, nullptr, i2am::sm_count_of(pr->device)).bytes;
    });
}

int i2am_run(const i2am_problem* pr, void* workspace, size_t workspace_bytes, void* stream) {
    return i2am::guarded([&] {
        i2am::validate(pr);
        const int sms = i2am::sm_count_of(pr->device);
        const i2am::Plan plan = i2am::make_plan(*pr, static_cast<char*>(workspace), sms);
        i2am::require(workspace != nullptr || plan.bytes == 0, "workspace is NULL");
        i2am::require(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace must be 256-byte aligned");
        i2am::require(workspace_bytes >= plan.bytes, "workspace holds " + std::to_string(workspace_bytes) +
                                                         " bytes, the call needs " + std::to_string(plan.bytes));
        i2am::run(*pr, plan, static_cast<cudaStream_t>(stream));
    });
}

const char* i2am_last_error(void) { return i2am::last_error.c_str(); }

}  // extern "C"
