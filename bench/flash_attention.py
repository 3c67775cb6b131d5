"""A plain one-pass FlashAttention-2 forward in Triton: the yardstick of bench/triton_sass.py.

out = softmax(scale q k^T) v for (B, H, N, d) tensors with unit last stride, one program per
(query block, batch * head), an online softmax over the key tiles (Dao 2023, Algorithm 1),
scores in base 2 as in Triton's fused-attention tutorial. No maps, no statistics kept: the
least a key tile of attention costs with the same tiles, the same layout and the same
compile-time specialisation (D a constant, head offsets hinted to ALIGN elements) as the I2AM
kernels, so that their instructions per key tile can be read against it. Like them (and like
FlashAttention's own kernels), it masks keys only in the last key tile when Nk is not a multiple
of BLOCK_N: the whole tiles take no key mask.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(acc, m_i, l_i, q, k_base, v_base, n0, dims, sk_n, sv_n, Nk, qk_scale, D: tl.constexpr,
          BLOCK_N: tl.constexpr, LAST: tl.constexpr):
    """One key tile of the online softmax; only the LAST tile masks keys past Nk."""
    keys = tl.arange(0, BLOCK_N)
    key_ok = keys < (Nk - n0 if LAST else BLOCK_N)
    cols = n0 + keys
    kt = tl.load(k_base + cols[None, :] * sk_n + dims[:, None], mask=key_ok[None, :] & (dims[:, None] < D), other=0.0)
    qk = tl.dot(q, kt)
    if LAST:
        qk = tl.where(key_ok[None, :], qk, -1.0e30)
    # the scale folded into the exponential's shift (one FFMA a score), as in Triton's tutorial
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + cols[:, None] * sv_n + dims[None, :], mask=key_ok[:, None] & (dims[None, :] < D), other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def flash_attention_forward(Q, K, V, OUT, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                            so_b, so_h, so_n, H, Nq, Nk, qk_scale,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    qb, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q_base = Q + tl.multiple_of(b * sq_b + h * sq_h, ALIGN)
    k_base = K + tl.multiple_of(b * sk_b + h * sk_h, ALIGN)
    v_base = V + tl.multiple_of(b * sv_b + h * sv_h, ALIGN)
    o_base = OUT + tl.multiple_of(b * so_b + h * so_h, ALIGN)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_base + rows[:, None] * sq_n + dims[None, :], mask=(rows[:, None] < Nq) & (dims[None, :] < D),
                other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    whole = Nk // BLOCK_N * BLOCK_N
    for n0 in range(0, whole, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, n0, dims, sk_n, sv_n, Nk, qk_scale, D, BLOCK_N, False)
    if whole < Nk:
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base, v_base, whole, dims, sk_n, sv_n, Nk, qk_scale, D, BLOCK_N, True)
    tl.store(o_base + rows[:, None] * so_n + dims[None, :], (acc / l_i[:, None]).to(OUT.dtype.element_ty),
             mask=(rows[:, None] < Nq) & (dims[None, :] < D))
