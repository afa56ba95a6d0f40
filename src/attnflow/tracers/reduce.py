"""The math that runs inside a trace: attention probabilities from an `attention_interface` call.

Only torch and einops are used here, so NDIF's server can run this module
(`nnsight.register` it) and a remote trace sends back only the reduced result.

    query [batch, head, query, d]  key [batch, kv_head, key, d]  ->  P [batch, head, row, key]

`attention_pattern` recomputes `softmax(q·kᵀ·scaling + mask)` in float32 for the
selected query rows only (gathered *before* the product, so memory is
O(rows·seq) per head, not O(seq²)), honouring every variant transformers'
attention interfaces honour: boolean or additive masks, `mask=None` with
`is_causal`, sliding windows, logit soft-capping (Gemma 2), attention sinks
(gpt-oss `s_aux`), additive position biases, and grouped-query attention.

    >>> q = torch.randn(1, 4, 5, 8); k = torch.randn(1, 2, 5, 8)       # GQA: 4 query heads, 2 kv heads
    >>> rows = torch.tensor([[3, 4]])                                    # query rows 3 and 4
    >>> P = attention_pattern(q, k, None, 8**-0.5, is_causal=True, row_index=rows)
    >>> P.shape, bool(P.sum(-1).allclose(torch.ones(1, 4, 2)))          # [batch, head, row, key]; rows sum to 1
    (torch.Size([1, 4, 2, 5]), True)
    >>> P[0, 0, 0, 4]                                                    # row 3 cannot see key 4
    tensor(0.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import einops
import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: NDIF's server need not have jaxtyping
    from jaxtyping import Bool, Float, Int


def attention_pattern(
    query: Float[Tensor, "batch head query d"],
    key: Float[Tensor, "batch kv_head key d"],
    mask: Tensor | None,
    scaling: float | None = None,
    *,
    is_causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Float[Tensor, "head"] | None = None,
    position_bias: Tensor | None = None,
    row_index: Int[Tensor, "batch row"] | None = None,
    key_end: int | None = None,
    buffers: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "batch head row key"]:
    """Float32 attention probabilities of the query rows in `row_index` (all rows when None).

    `mask` is what the model passed to its attention interface: boolean (True =
    attend) or additive, [batch, head or 1, query, key]; or flash attention's
    [batch, key] padding mask (1 = real key), which leaves causality to
    `is_causal`.  With `mask=None` and `is_causal`, query i attends keys <= i
    (aligned to the last key when there are more keys than queries).
    `sliding_window=w` keeps keys with `q - k < w`; `softcap=c` maps logits to
    `tanh(x / c) * c` before the mask; `sinks` [head] adds one logit column that takes probability mass and
    is dropped after the softmax.  `row_index` [batch, row] holds query indices,
    -1 for "no row": those rows come back all zero.  Masked logits are set to
    float32's finfo.min (not -inf), so a fully masked row is finite (uniform),
    never NaN.  `key_end` computes only keys `0 .. key_end - 1` (the result has
    that many columns): for a caller that knows the later keys are masked.
    `buffers` are two flat float32 tensors of at least batch·head·row·key
    elements that the scores and probabilities are written into (the result is a
    view of the second): a caller computing chunk after chunk allocates once, not
    twice per chunk (fresh multi-MB allocations page-fault on every first touch).
    """
    B, Hq, Q, d = query.shape
    Bk, Hkv, K, dk = key.shape
    if (Bk, dk) != (B, d) or Hq % Hkv:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} do not fit: need the same batch and head size, "
            "and query heads a multiple of kv heads"
        )
    if row_index is None:
        row_index = torch.arange(Q, device=query.device).expand(B, Q)
    row_index = row_index.to(query.device)
    present = row_index >= 0  # [batch, row]
    rows = row_index.clamp(min=0)
    R = rows.shape[1]

    K_all = K  # queries are the last Q of all K keys, whatever part of the keys is computed
    if key_end is not None and key_end < K:
        key, K = key[:, :, :key_end], key_end

    q = gather_rows(query, rows).float() * (d**-0.5 if scaling is None else scaling)
    # query head h*g+j reads kv head h (repeat_kv); one batched matmul per kv head, output already [b, (h g), r, k]
    q = einops.rearrange(q, "b (h g) r d -> b h (g r) d", h=Hkv)
    size = B * Hq * R * K
    if buffers is not None and min(b.numel() for b in buffers) < size:
        buffers = None
    out = None if buffers is None else buffers[0][:size].view(B, Hkv, Hq // Hkv * R, K)
    scores = torch.matmul(q, key.float().transpose(-1, -2), out=out).view(B, Hq, R, K)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores += gather_rows(_broadcast(position_bias, B, Hq, Q, K), rows).float()

    lowest = torch.finfo(torch.float32).min
    padding_only = mask is not None and mask.ndim == 2  # flash attention's [batch, key] mask: causality not in it
    causal = (mask is None or padding_only) and is_causal
    lo, keep = _allowed_keys(rows, Q, K_all, causal=causal, sliding_window=sliding_window, n_keys=K)
    if keep is not None:  # only keys lo.. can be masked for these rows: the diagonal block of a causal chunk
        scores[..., lo:].masked_fill_(~keep.unsqueeze(1), lowest)
    if padding_only:
        real = mask[:, -K_all:][:, :K].bool()  # [batch, key]
        if not bool(real.all()):
            scores.masked_fill_(~real.view(B, 1, 1, K), lowest)
    elif mask is not None:
        apply_mask(scores, gather_rows(_broadcast(mask[..., :K], B, mask.shape[-3] if mask.ndim == 4 else 1, Q, K), rows))

    if sinks is not None:
        sink = einops.repeat(sinks.float().to(scores.device), "h -> b h r 1", b=B, r=R)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        out = None if buffers is None else buffers[1][:size].view(B, Hq, R, K)
        probs = torch.softmax(scores, dim=-1, out=out)  # one fused kernel: row max, exp and sum
    if not bool(present.all()):
        probs.transpose(1, 2)[~present] = 0  # rows without a query: touches only those rows
    return probs


def apply_mask(scores: Float[Tensor, "batch head row key"], mask: Tensor) -> None:
    """Mask float32 `scores` in place: boolean (True = attend) or additive, broadcastable to them.

    Masked logits become float32's finfo.min (an additive -inf too), so a fully masked row stays finite.
    """
    lowest = torch.finfo(torch.float32).min
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, lowest)
    else:
        scores.add_(mask.float()).clamp_(min=lowest)


def gather_rows(x: Tensor, rows: Int[Tensor, "batch row"]) -> Tensor:
    """x[b, h, rows[b, r], ...] for every b, h, r: [batch, h, query, *] -> [batch, h, row, *]."""
    B, H = x.shape[:2]
    idx = rows.view(B, 1, -1, *([1] * (x.ndim - 3))).expand(B, H, rows.shape[1], *x.shape[3:])
    return x.gather(2, idx)


def _broadcast(m: Tensor, B: int, H: int, Q: int, K: int) -> Tensor:
    """A mask or bias of 2 to 4 dims ([query, key], [batch, query, key], [batch, head, query, key]) -> 4 dims."""
    while m.ndim < 4:
        m = m.unsqueeze(1) if m.ndim == 3 else m.unsqueeze(0)
    return m.expand(B, H, Q, K)


def _allowed_keys(
    rows: Int[Tensor, "batch row"], Q: int, K: int, *, causal: bool, sliding_window: int | None, n_keys: int | None = None
) -> tuple[int, Bool[Tensor, "batch row key"] | None]:
    """`(lo, allowed)`: which of keys `lo .. n_keys - 1` each selected row may see when no mask says so (causal)
    or within the window; every row sees every key before `lo`.  `(0, None)` when nothing is masked.

    Under causality alone `lo` is one past the earliest row's position, so a chunk of
    consecutive rows builds and applies only its diagonal block.

        >>> _allowed_keys(torch.tensor([[2, 3]]), 4, 4, causal=True, sliding_window=None)
        (3, tensor([[[False],
                 [ True]]]))
    """
    n = K if n_keys is None else n_keys
    causal = causal and Q > 1
    if not causal and sliding_window is None:
        return 0, None
    pos = (rows + (K - Q)).unsqueeze(-1)  # absolute position of each query row; queries are the last Q keys
    lo = 0 if sliding_window is not None else max(0, min(n, int(pos.min()) + 1))
    keys = torch.arange(lo, n, device=rows.device).view(1, 1, n - lo)
    allowed = keys <= pos if causal else torch.ones_like(keys - pos, dtype=torch.bool)
    if sliding_window is not None:
        allowed = allowed & (pos - keys < sliding_window)
    return lo, allowed


def reduce_heads(
    P: Float[Tensor, "batch head row key"], heads: str | Float[Tensor, "head"],
    value_norms: Float[Tensor, "batch head key"] | None = None,
) -> Float[Tensor, "batch head_out row key"]:
    """Reduce the head dim: "all" keeps it, "mean"/"max"/"norm" make it 1, a [head] weight vector averages with it.

    Weights are used as given (the tracer normalises them to sum to 1 per layer),
    so rows of a weighted result still sum to 1.  "norm" weighs each head by each
    key's `value_norms` (`norm_weighted`).

        >>> reduce_heads(torch.ones(2, 4, 3, 5), "mean").shape
        torch.Size([2, 1, 3, 5])
    """
    if isinstance(heads, Tensor):
        return torch.einsum("bhrk,h->brk", P, heads.to(P)).unsqueeze(1)
    if heads == "all":
        return P
    if heads == "mean":
        return P.mean(dim=1, keepdim=True)
    if heads == "max":
        return P.amax(dim=1, keepdim=True)
    if heads == "norm":
        if value_norms is None:
            raise ValueError("heads='norm' needs value_norms [batch, head, key]")
        return norm_weighted(P, value_norms, inplace=True).unsqueeze(1)
    raise ValueError(f"heads={heads!r}; use 'all', 'mean', 'max', 'norm' or a tensor of weights")


def norm_weighted(
    P: Float[Tensor, "*batch head query key"], value_norms: Float[Tensor, "*batch head key"], inplace: bool = False,
    dtype: torch.dtype | None = None,
) -> Float[Tensor, "*batch query key"]:
    """`Σ_h P^h_ij·‖W_O^h v^h_j‖`, rows renormalised (zero rows stay zero): Kobayashi et al. 2020's head sum.

    The one implementation of heads="norm", used in the trace and by `attnflow.flow`.
    `inplace=True` scales P itself (the tracer's own float32 chunk: no second buffer);
    otherwise the heads are summed one at a time in `dtype` (`head_sum`: float32 or wider when None).

        >>> P = torch.tensor([[[1., 0.], [.5, .5]], [[1., 0.], [.1, .9]]])   # head query key
        >>> norm_weighted(P, torch.tensor([[1., 3.], [1., 1.]]))            # row 1: (.5 + .1, 1.5 + .9) / 3
        tensor([[1.0000, 0.0000],
                [0.2000, 0.8000]])
    """
    if inplace:
        W = P.mul_(value_norms.to(P).unsqueeze(-2)).sum(-3)  # [*batch, query, key]
    else:
        W = head_sum(P, value_norms, dtype)
    total = W.sum(-1, keepdim=True)
    return W.div_(torch.where(total != 0, total, torch.ones_like(total)))


def head_sum(
    P: Float[Tensor, "*batch head query key"], weights: Tensor | None = None, dtype: torch.dtype | None = None
) -> Float[Tensor, "*batch query key"]:
    """`Σ_h w_h ⊙ P[..., h, :, :]` in `dtype` (when None: float32, or P's if wider), one head at a time.

    `weights` is None (1 each), `[head]` (one number per head) or `[*batch, head, key]`
    (one per key, as heads="norm" weighs them).  Contiguous adds, not a reduction over
    the head dim: on CPU that walks memory with the head stride, and `torch.mean(...,
    dtype=float32)` of a float16 layer of 9 heads x 1,400² is ~6x slower than this, which
    also upcasts as it reads (no float32 copy of every head).

        >>> P = torch.tensor([[[1., 0.], [.5, .5]], [[1., 0.], [.1, .9]]])   # head query key
        >>> head_sum(P), head_sum(P, torch.tensor([.75, .25]))[1]
        (tensor([[2.0000, 0.0000],
                [0.6000, 1.4000]]), tensor([0.4000, 0.6000]))
    """
    dtype = torch.promote_types(P.dtype, torch.float32) if dtype is None else dtype
    scalars = weights.tolist() if weights is not None and weights.ndim == 1 else None  # one host sync
    out = None
    for h in range(P.shape[-3]):
        x = P.select(-3, h)  # [*batch, query, key]
        w = None if weights is None or scalars is not None else weights.select(-2, h).unsqueeze(-2).to(P.device, dtype)
        if out is None:
            out = x.to(dtype, copy=True)
            if w is not None or scalars is not None:
                out.mul_(w if w is not None else scalars[0])
        elif w is not None:
            out.addcmul_(x.to(dtype), w)
        elif scalars is not None:
            out.add_(x, alpha=scalars[h])
        else:
            out.add_(x)
    return out


# --- norms (Kobayashi et al. 2020, 2021) --------------------------------------------------------------
def output_blocks(weight: Tensor, heads: int, conv1d: bool = False) -> Float[Tensor, "head d hidden"]:
    """Head h's block of an output projection's weight, `[head, d, hidden]` (input features first).

    An `nn.Linear` o_proj has weight `[hidden, heads·d]` (head h = columns h·d:(h+1)·d);
    GPT-2's `Conv1D` c_proj has `[heads·d, hidden]` (head h = rows h·d:(h+1)·d).

        >>> output_blocks(torch.arange(12.).view(2, 6), 3).shape     # hidden 2, 3 heads of d 2
        torch.Size([3, 2, 2])
    """
    W = weight if conv1d else weight.T  # [heads·d, hidden]
    return W.reshape(heads, W.shape[0] // heads, W.shape[1])


def value_factors(blocks: Float[Tensor, "head d hidden"]) -> Float[Tensor, "head d d"]:
    """`R_h` with `‖v·W_O^h‖ = ‖v·R_hᵀ‖` for every v: the R of the QR of each block `W_O^hᵀ = Q_h R_h`.

    Q_h has orthonormal columns, so it keeps the norm, and a value's norm costs
    d² instead of d·hidden per key and head (computed in float64, returned in float32).

        >>> blocks = torch.randn(2, 4, 16); v = torch.randn(2, 5, 4)        # head d hidden; head key d
        >>> R = value_factors(blocks)
        >>> bool(torch.allclose((v @ blocks).norm(dim=-1), (v @ R.transpose(-1, -2)).norm(dim=-1), atol=1e-5))
        True
    """
    return torch.linalg.qr(blocks.detach().transpose(-1, -2).double(), mode="r").R.float()


def value_norms(
    value: Float[Tensor, "batch kv_head key d"], factors: Float[Tensor, "head d d"]
) -> Float[Tensor, "batch head key"]:
    """`‖W_O^h v^h_j‖` for every query head h and key j, in float32 (query head h reads kv head h // (head / kv_head)).

        >>> v = torch.randn(1, 2, 5, 4); blocks = torch.randn(4, 4, 16)     # GQA: 4 query heads over 2 kv heads
        >>> n = value_norms(v, value_factors(blocks))
        >>> n.shape, bool(torch.allclose(n[0, 3], (v[0, 1] @ blocks[3]).norm(dim=-1), atol=1e-5))
        (torch.Size([1, 4, 5]), True)
    """
    B, Hkv, K, d = value.shape
    R = einops.rearrange(factors.to(device=value.device, dtype=torch.float32), "(h g) e d -> h g e d", h=Hkv)
    fv = torch.einsum("bhkd,hged->bhgke", value.float(), R)  # [batch, kv_head, group, key, d]
    return torch.linalg.vector_norm(fv, dim=-1).reshape(B, -1, K)


def position_norms(x: Float[Tensor, "batch pos hidden"]) -> Float[Tensor, "batch pos"]:
    """The float32 L2 norm of each position's vector (a residual input or an attention output)."""
    return torch.linalg.vector_norm(x.float(), dim=-1)


def to_storage(P: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Cast to the storage dtype (float16 by default) once every reduction is done in float32; None keeps it."""
    return P if dtype is None else P.to(dtype)


CAUSAL_CHUNK = 64  # query rows per chunk when keys after the chunk are skipped (measured on 2 CPU cores at 2,048
# keys: faster than 16, 32, 128 or 256 rows)


def interface_pattern(
    args: tuple,
    kwargs: dict,
    *,
    row_index: Int[Tensor, "batch row"],
    heads: str | Float[Tensor, "head"],
    dtype: torch.dtype | None,
    is_causal: bool,
    out: Tensor | None = None,
    memory_budget: int | None = None,
    value_norms: Float[Tensor, "batch head key"] | None = None,
) -> Float[Tensor, "batch head_out row key"]:
    """The stored pattern of one layer from the `(args, kwargs)` of its `attention_interface(...)` call.

    The call is `attention_interface(module, query, key, value, attention_mask, scaling=..., ...)`;
    `is_causal` is the module's own flag (a kwarg of the same name overrides it,
    as in transformers' sdpa interface).

    Rows are computed `chunk_rows(memory_budget, ...)` at a time and each chunk's
    heads reduced at once, so the float32 transient is O(chunk x key x head) and
    never the whole `[batch, head, row, key]`; each chunk is written into `out`
    ([batch, head_out, row, key], any dtype: the copy casts) or into a new
    tensor of `dtype` (float32 when None).  heads="norm" weighs the heads by
    `value_norms` [batch, head, key] (`value_norms(...)` of the same call's value).

        >>> q = torch.randn(1, 4, 6, 8); k = torch.randn(1, 2, 6, 8)
        >>> args = (None, q, k, None, None); rows = torch.arange(6)[None]
        >>> whole = interface_pattern(args, {}, row_index=rows, heads="mean", dtype=None, is_causal=True)
        >>> chunked = interface_pattern(args, {}, row_index=rows, heads="mean", dtype=None, is_causal=True,
        ...                             memory_budget=1)          # one row at a time
        >>> whole.shape, bool((whole - chunked).abs().max() < 1e-6)   # the same up to float32 rounding
        (torch.Size([1, 1, 6, 6]), True)
    """
    bound = bind(args, kwargs)
    causal = kwargs.get("is_causal")
    query, key, mask = bound["query"], bound["key"], bound.get("attention_mask")
    sinks = _first(kwargs.get("s_aux"), kwargs.get("sinks"))
    B, R, K, Q = query.shape[0], row_index.shape[1], key.shape[2], query.shape[2]
    if R == 1 and Q == 1 and _plain_one_query(kwargs, mask, sinks) and int(row_index.min()) == 0:  # a decode step
        P = one_query_pattern(query, key, mask, kwargs.get("scaling"))  # [batch, head, 1, key] float32
        reduced = reduce_heads(P, heads, value_norms)
        if out is None:
            return reduced if dtype is None else reduced.to(dtype)
        return out.copy_(reduced)
    causal_flag = is_causal if causal is None else bool(causal)
    # without a mask (or with a padding-only one) causality is the rule: keys after a chunk's last row are masked,
    # so they are not computed at all (half the work of an every-row recording); a 4-D mask may say otherwise
    skip_later = causal_flag and Q > 1 and (mask is None or mask.ndim == 2) and kwargs.get("position_bias") is None
    step = chunk_rows(memory_budget, batch=B, heads=query.shape[1], keys=K, rows=R, sinks=sinks is not None)
    if skip_later:  # short chunks: less of the masked upper triangle is computed
        step = min(step, CAUSAL_CHUNK)
    if out is None:
        head_out = query.shape[1] if isinstance(heads, str) and heads == "all" else 1
        out = query.new_zeros((B, head_out, R, K), dtype=torch.float32 if dtype is None else dtype)
    size = B * query.shape[1] * min(step, R) * K
    buffers = (query.new_empty(size, dtype=torch.float32), query.new_empty(size, dtype=torch.float32)) if R > 1 else None
    for r0 in range(0, R, step):
        rows = row_index[:, r0 : r0 + step]
        end = max(1, min(K, int(rows.max()) + 1 + (K - Q))) if skip_later else K
        P = attention_pattern(  # [batch, head, chunk, key] float32
            query,
            key,
            mask,
            kwargs.get("scaling"),
            is_causal=is_causal if causal is None else bool(causal),
            sliding_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
            sinks=sinks,
            position_bias=kwargs.get("position_bias"),
            row_index=rows,
            key_end=end,
            buffers=buffers,
        )
        n = None if value_norms is None else value_norms[..., :end]
        out[:, :, r0 : r0 + step, :end] = reduce_heads(P, heads, n)  # the copy casts to the storage dtype
        if end < K:
            out[:, :, r0 : r0 + step, end:] = 0
        del P
    return out


def key_columns(num_keys: int, seen: int) -> slice:
    """Generation columns of a decode step's keys: the last `num_keys` of the `seen` positions so far.

    A dynamic cache returns all `seen` keys, a sliding-window one the last window;
    a static cache returns its whole buffer, the first `seen` slots filled.
    """
    return slice(seen - num_keys, seen) if num_keys <= seen else slice(0, seen)


def _plain_one_query(kwargs: dict, mask: Tensor | None, sinks: Tensor | None) -> bool:
    """Whether a one-query call needs nothing of `attention_pattern` but a product, its mask and a softmax."""
    plain = sinks is None and all(kwargs.get(k) is None for k in ("sliding_window", "softcap", "position_bias"))
    return plain and (mask is None or (mask.ndim == 4 and mask.shape[-2] == 1))


def one_query_pattern(
    query: Float[Tensor, "batch head 1 d"], key: Float[Tensor, "batch kv_head key d"], mask: Tensor | None,
    scaling: float | None = None,
) -> Float[Tensor, "batch head 1 key"]:
    """Float32 probabilities of a call with one query (a decode step), which sees every key its mask allows.

    `attention_pattern` for that case without its row, window and causal bookkeeping: a
    decode step runs once per layer per new token, where those few small ops are
    most of the cost.  `mask`: None, or [batch, 1 or head, 1, key], boolean (True =
    attend) or additive.

        >>> q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8)
        >>> m = torch.ones(2, 1, 1, 6, dtype=torch.bool); m[1, ..., :2] = False   # example 1 is left-padded
        >>> fast = one_query_pattern(q, k, m)
        >>> bool((fast - attention_pattern(q, k, m)).abs().max() < 1e-6), fast[1, :, 0, :2].abs().max().item()
        (True, 0.0)
    """
    B, Hq, _, d = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    q = query.float().view(B, Hkv, Hq // Hkv, d) * (d**-0.5 if scaling is None else scaling)  # head h*g+j reads kv h
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(B, Hq, 1, K)
    if mask is not None:
        apply_mask(scores, mask[..., :K])
    return torch.softmax(scores, dim=-1)


def bind(args: tuple, kwargs: dict) -> dict:
    """{module, query, key, value, attention_mask} of an `attention_interface(...)` call, positional or keyword."""
    names = ("module", "query", "key", "value", "attention_mask")
    bound = dict(zip(names, args))
    bound.update({n: kwargs[n] for n in names if n in kwargs})
    return bound


def chunk_rows(
    memory_budget: int | None, *, batch: int, heads: int, keys: int, rows: int, sinks: bool = False
) -> int:
    """How many query rows to compute at once so one chunk's float32 transient fits `memory_budget` bytes.

    A row costs the float32 scores and probabilities of every head (`8·heads·keys`
    bytes per example; four such buffers with attention sinks, whose softmax
    concatenates), plus a mask row, a keep row and the reduced row (`16·keys` bounds them).
    None = every row at once; at least one row, whatever the budget.

        >>> chunk_rows(2**21, batch=1, heads=9, keys=8192, rows=8192)   # 2 MiB: 2 rows of 9 heads x 8,192 keys
        2
        >>> chunk_rows(None, batch=1, heads=9, keys=8192, rows=8192)
        8192
    """
    if memory_budget is None:
        return max(rows, 1)
    per_row = batch * keys * (4 * heads * (4 if sinks else 2) + 16)
    return max(1, min(rows, memory_budget // per_row))


def _first(*xs):
    return next((x for x in xs if x is not None), None)

