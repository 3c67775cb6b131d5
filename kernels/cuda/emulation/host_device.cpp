// Fiber scheduler, collectives, PTX emulation and CUDA runtime stand-ins of the host emulation.
// Each warp of a block gets a random speed (it runs in 1 of 1, 2, 4, 8 or 16 scheduling rounds);
// a round runs its threads in shuffled order, each up to its next collective. Warps drift apart
// between block barriers, so a missing barrier lets one warp read tiles another has not
// written yet (NaN poison or stale values).
#include "host_device.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../errors.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace i2am {
namespace emu {
namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kMaxPost = 64;  // bytes a lane may post in one warp exchange
constexpr int kSharedLimit = 227 * 1024;  // opt-in shared memory per block on sm_90
constexpr int kIdleRounds = 4096;  // rounds without progress before a deadlock is declared

struct Barrier {
    int arrived = 0;
    uint64_t generation = 0;
};

struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
};

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    std::vector<AsyncCopy> in_flight;  // cp.async copies issued and not yet waited for
    bool done = false;
};

struct Block {
    int threads = 0, current = 0;
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    std::vector<unsigned char> posts;  // per warp: 32 lanes x kMaxPost
    std::vector<unsigned char> smem;
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    bool progress = false;
    std::string error;
};

Block block;

void yield() { swapcontext(&block.fibers[block.current].context, &block.scheduler); }

// Records the first failure and parks this fiber for good; the scheduler raises it.
[[noreturn]] void fail(const std::string& what) {
    if (block.error.empty())
        block.error = what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                      std::to_string(blockIdx.z) + ", thread " + std::to_string(threadIdx.x) + ")";
    for (;;) yield();
}

void wait(Barrier& b, int count) {
    const uint64_t generation = b.generation;
    block.progress = true;
    if (++b.arrived == count) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) yield();
}

int warp() { return int(threadIdx.x) / 32; }

void check_full_warp() {
    const int first = warp() * 32;
    if (first + 32 > block.threads) fail("warp collective in a partial warp");
    for (int l = first; l < first + 32; ++l)
        if (block.fibers[l].done) fail("warp collective after a lane of the warp exited");
}

void trampoline() {
    block.body(block.ctx);
    if (!block.fibers[block.current].in_flight.empty()) fail("thread exited with cp.async copies not waited for");
    block.fibers[block.current].done = true;
    block.progress = true;
}

void start_fiber(Fiber& f) {
    f.done = false;
    f.in_flight.clear();
    f.stack.resize(kStackBytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, trampoline, 0);
}

void run_block(int threads, size_t smem, std::mt19937& order_rng) {
    block.threads = threads;
    block.fibers.resize(threads);
    block.block_barrier = {};
    block.warp_barriers.assign((threads + 31) / 32, {});
    block.posts.assign(block.warp_barriers.size() * 32 * kMaxPost, 0);
    block.smem.assign(smem, 0xff);  // NaN in fp16, bf16 and fp32: unwritten tiles show up
    std::vector<int> order(threads);
    for (int t = 0; t < threads; ++t) {
        start_fiber(block.fibers[t]);
        order[t] = t;
    }
    std::vector<unsigned> warp_period(block.warp_barriers.size()), warp_runs(warp_period.size());
    for (unsigned& period : warp_period) period = 1u << order_rng() % 5;  // runs in 1 of 1, 2, 4, 8 or 16 rounds
    for (int live = threads, idle_rounds = 0; live > 0;) {
        block.progress = false;
        std::shuffle(order.begin(), order.end(), order_rng);
        for (size_t w = 0; w < warp_runs.size(); ++w) warp_runs[w] = order_rng() % warp_period[w] == 0;
        for (int t : order) {
            if (block.fibers[t].done || !warp_runs[t / 32]) continue;
            block.current = t;
            threadIdx = {unsigned(t), 0, 0};
            swapcontext(&block.scheduler, &block.fibers[t].context);
            if (!block.error.empty()) throw Error(I2AM_INTERNAL, "host emulation: " + block.error);
            live -= block.fibers[t].done;
        }
        idle_rounds = block.progress ? 0 : idle_rounds + 1;
        if (idle_rounds > kIdleRounds)
            throw Error(I2AM_INTERNAL, "host emulation: deadlock, threads wait on barriers that never fill");
    }
}

}  // namespace

void block_barrier() { wait(block.block_barrier, block.threads); }

void warp_barrier() {
    check_full_warp();
    wait(block.warp_barriers[warp()], 32);
}

void warp_exchange(const void* mine, void* all, size_t size) {
    if (size > kMaxPost) fail("warp exchange of more than 64 bytes");
    unsigned char* posts = block.posts.data() + warp() * 32 * kMaxPost;
    std::memcpy(posts + threadIdx.x % 32 * kMaxPost, mine, size);
    warp_barrier();
    for (int l = 0; l < 32; ++l) std::memcpy(static_cast<unsigned char*>(all) + l * size, posts + l * kMaxPost, size);
    warp_barrier();  // no lane posts again before every lane has read
}

void cp_async_16(void* smem, const void* gmem) {
    auto* dst = static_cast<unsigned char*>(smem);
    const unsigned char* lo = block.smem.data();
    if (dst < lo || dst + 16 > lo + block.smem.size()) fail("cp.async destination outside shared memory");
    if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(gmem) % 16)
        fail("cp.async of 16 bytes between addresses not 16-byte aligned");
    AsyncCopy copy{dst, {}};
    std::memcpy(copy.bytes, gmem, 16);
    std::memset(dst, 0xff, 16);  // NaN until it lands: an early reader fails
    block.fibers[block.current].in_flight.push_back(copy);
}

void cp_async_wait_all() {
    auto& in_flight = block.fibers[block.current].in_flight;
    for (const AsyncCopy& c : in_flight) std::memcpy(c.dst, c.bytes, 16);
    in_flight.clear();
}

void ldmatrix(uint32_t* r, int matrices, bool trans, const void* row) {
    const void* rows[32];
    warp_exchange(&row, rows, sizeof(row));
    const unsigned char* lo = block.smem.data();
    for (int l = 0; l < 8 * matrices; ++l) {  // lanes 0 .. 8 matrices - 1 give the row addresses
        const auto* p = static_cast<const unsigned char*>(rows[l]);
        if (p < lo || p + 16 > lo + block.smem.size()) fail("ldmatrix row outside shared memory");
        if (reinterpret_cast<uintptr_t>(p) % 16) fail("ldmatrix row not 16-byte aligned");
    }
    const int lane = threadIdx.x % 32;
    for (int m = 0; m < matrices; ++m) {
        uint16_t e[2];
        for (int h = 0; h < 2; ++h) {  // PTX: lane holds (row lane/4, cols 2 (lane%4) + h), or the transpose
            const int row_in = trans ? 2 * (lane % 4) + h : lane / 4, col = trans ? lane / 4 : 2 * (lane % 4) + h;
            std::memcpy(&e[h], static_cast<const unsigned char*>(rows[8 * m + row_in]) + 2 * col, 2);
        }
        r[m] = uint32_t(e[0]) | uint32_t(e[1]) << 16;
    }
}

void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], float (*to_float)(uint16_t)) {
    struct Fragments {
        uint32_t a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
    warp_exchange(&mine, all, sizeof(Fragments));
    const auto element = [&](uint32_t reg, int i) { return to_float(uint16_t(i % 2 ? reg >> 16 : reg & 0xffff)); };
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 8; ++i)  // PTX m16n8k16 A: rows g (a0,a1,a4,a5) / g+8, cols 2t + i%2 (+8 for i >= 4)
            A[g + 8 * (i / 2 % 2)][2 * t + i % 2 + 8 * (i / 4)] = element(all[l].a[i / 2], i);
        for (int i = 0; i < 4; ++i)  // B: rows 2t + i%2 (+8 for i >= 2), col g
            B[2 * t + i % 2 + 8 * (i / 2)][g] = element(all[l].b[i / 2], i);
    }
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int i = 0; i < 4; ++i) {  // C: rows g (c0,c1) / g+8, cols 2t + i%2
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        double sum = c[i];
        for (int k = 0; k < 16; ++k) sum += double(A[row][k]) * B[k][col];
        c[i] = float(sum);
    }
}

float half_to_float(uint16_t bits) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
}

float bfloat16_to_float(uint16_t bits) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
}

unsigned char* shared_memory() { return block.smem.data(); }

void run_grid(dim3 grid, int threads, size_t smem, void (*body)(void*), void* ctx) {
    if (threads < 1 || threads > 1024) throw Error(I2AM_INTERNAL, "host emulation: bad block size");
    const char* seed = std::getenv("I2AM_EMULATION_SEED");
    std::mt19937 order_rng(seed ? unsigned(std::atoi(seed)) : 1u);
    gridDim = grid;
    blockDim = {unsigned(threads), 1, 1};
    block.body = body;
    block.ctx = ctx;
    block.error.clear();
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                run_block(threads, smem, order_rng);
            }
}

}  // namespace emu
}  // namespace i2am

// CUDA runtime stand-ins for the calls the host code makes; memory is host memory.
extern "C" {

I2AM_API int i2am_host_emulation(void) { return 1; }

cudaError_t cudaSetDevice(int) { return cudaSuccess; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
    const char* sms = std::getenv("I2AM_EMULATED_SMS");  // drives the slot count
    *value = attr == cudaDevAttrMultiProcessorCount ? (sms ? std::atoi(sms) : 4) : 0;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
const char* cudaGetErrorString(cudaError_t) { return "error in the host emulation"; }

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
    std::memset(ptr, value, count);
    return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute attr, int value) {
    const bool ok = attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value <= i2am::emu::kSharedLimit;
    return ok ? cudaSuccess : cudaErrorInvalidValue;
}

}  // extern "C"
