/* C ABI of libi2am_cuda: attention with I2AM attribution maps (docs/maps.md).
 *
 * One call computes out = softmax(scale q k^T) v for the recorded batch entries and ADDS the
 * requested maps into float32 buffers, with exactly the semantics of kernels/api.py:
 *   gen_query (Br,H,Ru,Nq)  sum_j u[r,j] C[x,ref[j]]      C: softmax over queries
 *   gen_key   (Br,H,Ru,Nq)  sum_j u[r,j] P[x,ref[j]]      P: softmax over keys
 *   ref_key   (Br,H,Rw,Kr)  sum_x m[r,x] P[x,ref[j]]
 *   ref_query (Br,H,Rw,Kr)  sum_x m[r,x] C[x,ref[j]]
 * Never materialises Nq x Nk; results are bit-identical run after run on one device.
 * All pointers are device pointers of the device `device`; strides count elements.
 * Functions return 0 on success, else an error code; i2am_last_error() says what failed.
 */
#ifndef I2AM_CUDA_H
#define I2AM_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define I2AM_API __attribute__((visibility("default")))

enum i2am_dtype { I2AM_F16 = 0, I2AM_BF16 = 1, I2AM_F32 = 2 };
enum i2am_map { I2AM_GEN_QUERY = 0, I2AM_GEN_KEY = 1, I2AM_REF_KEY = 2, I2AM_REF_QUERY = 3 };
enum i2am_status { I2AM_OK = 0, I2AM_INVALID_ARGUMENT = 1, I2AM_CUDA_ERROR = 2, I2AM_INTERNAL = 3 };

typedef struct i2am_problem {
    int32_t device;                 /* CUDA device ordinal of every pointer below */
    int32_t dtype;                  /* enum i2am_dtype of q, k, v and out */
    int32_t batch, heads, nq, nk, d, dv;
    int32_t n_record;               /* Br: entries of record_idx */
    int32_t n_ref;                  /* Kr: entries of ref_idx */
    int32_t n_key_probes;           /* Ru: rows of key_probes */
    int32_t n_query_probes;         /* Rw: rows of query_probes */
    double scale;                   /* score scale, > 0 */
    double c_from_p_range;          /* log2 spread of a head's scores up to which one exponential per
                                       score serves both softmaxes (the Python binding passes 80);
                                       negative: two exponentials everywhere */
    const void *q, *k, *v;          /* (B,H,Nq,d), (B,H,Nk,d), (B,H,Nk,dv) */
    void *out;                      /* (B,H,Nq,dv), dtype: rows record_idx are written */
    int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4];
    const int64_t *record_idx;      /* (Br,) distinct batch indices */
    const int64_t *ref_idx;         /* (Kr,) key indices of the reference grid */
    const float *key_probes;        /* (Ru,Kr) contiguous; may be NULL without gen maps */
    const float *query_probes;      /* (Rw,Nq) contiguous; may be NULL without ref maps */
    float *maps[4];                 /* indexed by enum i2am_map; NULL = not requested */
    int64_t map_stride[4][4];
} i2am_problem;

/* sizeof(i2am_problem): lets a binding check its mirror of the struct. */
I2AM_API size_t i2am_problem_size(void);

/* Bytes of device workspace i2am_run needs for this problem. */
I2AM_API int i2am_workspace_bytes(const i2am_problem *p, size_t *bytes);

/* Enqueue the computation on `stream` (a cudaStream_t; NULL = legacy default stream).
 * workspace: device memory of at least i2am_workspace_bytes, 256-byte aligned, not used by
 * anything else until the stream has run the call. */
I2AM_API int i2am_run(const i2am_problem *p, void *workspace, size_t workspace_bytes, void *stream);

/* Message of this thread's last call into the library if it failed, else "". */
I2AM_API const char *i2am_last_error(void);

#ifdef __cplusplus
}
#endif

#endif
