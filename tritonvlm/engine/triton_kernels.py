"""The engine's Triton kernels, loaded through :mod:`tritonvlm.engine.triton_runtime` (compiled, or
interpreted on a CPU). ``decode_split`` / ``decode_merge``: decode attention over the KV blocks
(:mod:`tritonvlm.engine.paged_attention`); ``rms_norm``: a fused RMSNorm
(:mod:`tritonvlm.engine.fused_norm`)."""

# ruff: noqa: N803  (Triton's convention: pointer arguments in capitals)

import triton
import triton.language as tl


@triton.jit
def decode_split(
    Q, K, V, Tables, Lengths, PartOut, PartLse, scale,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_tb,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    group = tl.arange(0, BLOCK_H)
    head_ok = group < GROUP
    heads = kv_head * GROUP + group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        Q + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    length = tl.load(Lengths + row).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, BLOCK_N), splits) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)
        ok = pos < end
        block = tl.load(Tables + row * stride_tb + pos // PAGE, mask=ok, other=0)
        token = block * PAGE + pos % PAGE
        kv_mask = ok[:, None] & dim_ok[None, :]
        k_at = K + token[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_at, mask=kv_mask, other=0.0)
        if UPCAST:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v_at = V + token[:, None] * stride_vt + kv_head * stride_vh + dims[None, :]
        v = tl.load(v_at, mask=kv_mask, other=0.0)
        if UPCAST:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        elif IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    some = total > 0
    out = acc / tl.where(some, total, 1.0)[:, None]
    lse = tl.where(some, m + tl.log(tl.where(some, total, 1.0)), float("-inf"))
    base = row * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(PartOut + base[:, None] + dims[None, :], out, mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(PartLse + row * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def decode_merge(
    PartOut, PartLse, Out, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    stride_ob, stride_oh, splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, BLOCK_S)
    split_ok = parts < splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    base = row * stride_pb + head * stride_ph
    lse_at = PartLse + row * stride_lb + head * stride_lh + parts
    lse = tl.load(lse_at, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp(lse - tl.where(top > float("-inf"), top, 0.0))  # an empty split weighs 0
    part = tl.load(
        PartOut + base + parts[:, None] * stride_ps + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    norm = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(norm > 0, norm, 1.0)
    out_at = Out + row * stride_ob + head * stride_oh + dims
    tl.store(out_at, out.to(Out.dtype.element_ty), mask=dim_ok)


@triton.jit
def rms_norm(
    X, W, Out, stride_x, stride_o, eps,
    N: tl.constexpr, BLOCK: tl.constexpr, GEMMA: tl.constexpr,
):  # fmt: skip
    # One row per program, in float32 as transformers' RMSNorm modules compute it; Llama style rounds
    # the normalised row to the input's dtype before the weight, Gemma style scales by (1 + weight).
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if GEMMA:  # noqa: SIM108  (a constexpr branch)
        out = y * (1.0 + w)
    else:
        out = w * y.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=ok)


@triton.jit
def rotary(
    Q, K, Cos, Sin, OutQ, OutK,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_cb, stride_cs, stride_oqb, stride_oqh, stride_oqs, stride_okb, stride_okh, stride_oks,
    seq_len, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One token per program, all its query and key heads: x * cos + rotate_half(x) * sin, where
    # rotate_half(x) = cat(-x[half:], x[:half]); each product and the sum rounded to the input's dtype
    # as transformers' three separate operations round them (launched without FMA contraction).
    token = tl.program_id(0)
    b = token // seq_len
    s = token % seq_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < DIM
    half: tl.constexpr = DIM // 2
    partner = tl.where(dims < half, dims + half, dims - half)
    sign = tl.where(dims < half, -1.0, 1.0)
    cos = tl.load(Cos + b * stride_cb + s * stride_cs + dims, mask=dim_ok, other=0.0).to(tl.float32)
    sin = tl.load(Sin + b * stride_cb + s * stride_cs + dims, mask=dim_ok, other=0.0).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)
    for which in tl.static_range(2):
        if which == 0:
            src = Q + b * stride_qb + s * stride_qs
            dst = OutQ + b * stride_oqb + s * stride_oqs
            src_h, dst_h, count = stride_qh, stride_oqh, Q_HEADS
        else:
            src = K + b * stride_kb + s * stride_ks
            dst = OutK + b * stride_okb + s * stride_oks
            src_h, dst_h, count = stride_kh, stride_okh, K_HEADS
        ok = (heads < count)[:, None] & dim_ok[None, :]
        x = tl.load(src + heads[:, None] * src_h + dims[None, :], mask=ok, other=0.0)
        rot = tl.load(src + heads[:, None] * src_h + partner[None, :], mask=ok, other=0.0)
        kind = x.dtype
        first = (x.to(tl.float32) * cos[None, :]).to(kind).to(tl.float32)
        second = (rot.to(tl.float32) * sign[None, :] * sin[None, :]).to(kind).to(tl.float32)
        tl.store(dst + heads[:, None] * dst_h + dims[None, :], (first + second).to(kind), mask=ok)
