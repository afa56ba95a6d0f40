"""Compose per-layer attention patterns into rollout, residual flow and total attention.

Pure tensor functions (torch + einops, batched, on the input's device).  Every
function takes patterns `A` of shape `[*batch, layer, head, query, key]` (head = 1
when already reduced) with any number of leading batch dims, and returns
`[*batch, query, key]`, or `[*batch, len(rows), key]` when `rows=` is given:

    >>> A = torch.rand(2, 4, 8, 5, 5).tril()              # batch layer head query key
    >>> A = A / A.sum(-1, keepdim=True)                   # causal, rows sum to 1
    >>> rollout(A, alpha=0.5).shape                       # heads averaged, 4 layers composed
    torch.Size([2, 5, 5])
    >>> rollout(A, rows=[-1]).shape                       # only the last row, O(L·N²) not O(L·N³)
    torch.Size([2, 1, 5])
    >>> torch.allclose(rollout(A, rows=[-1]), rollout(A)[:, -1:])
    True
    >>> residual_flow(A).sum(-1).round()                  # unnormalised flow: rows sum to 2^L
    tensor([[16., 16., 16., 16., 16.],
            [16., 16., 16., 16., 16.]])

Formulas (Ā_l is layer l after the head reduction, I the identity on real positions):

    raw              Ā_l                                   (one layer, `layer=-1` by default)
    sum              Σ_l Ā_l, rows renormalised
    flow             X_0 = I,  X_l = Ā_l X_{l-1} + X_{l-1}   (the residual recurrence: 2^L x rollout on
                     row-stochastic patterns; NOT the paper's "attention flow", which is maxflow)
    flow_normalized  the same with rows renormalised each layer  (= rollout with alpha 0.5)
    rollout          Â_l = alpha·Ā_l + (1-alpha)·I, rows renormalised,  R = Â_L ··· Â_1
    rollout_measured the same with a measured weight per layer and query row (Kobayashi et al. 2021):
                     w_li = ‖a_li‖ / (‖a_li‖ + ‖x_li‖),  Â_l = diag(w_l)·Ā_l + diag(1-w_l)·I,
                     a_li the attention output and x_li the residual input of layer l at position i
                     (`attn_norms`, `residual_norms` [*batch, layer, query]); equal norms give alpha 0.5
    maxflow          Abnar & Zuidema's attention flow: for target row t and key s, the maximum flow from
                     node (0, s) to node (L, t) of the layered graph with capacities rownorm(alpha·Ā_l +
                     (1-alpha)·I), shares per row (`max_flow`, exact, scipy's compiled Dinic); from a span of
                     keys as a whole (one super-source), `attnflow.maxflow.span_max_flow`
    heads="norm"     Ā_l = rownorm(Σ_h α^h_ij·‖W_O^h v^h_j‖)   (Kobayashi et al. 2020; `value_norms`
                     [*batch, layer, head, key]: each key's transformed-value norm per head)

`af.trace(..., norms=True)` records all three norms in the same forward:
`tr.norms["value"]` (value_norms), `tr.norms["attn"]` (attn_norms) and
`tr.norms["residual"]` (residual_norms), padded like the trace's keys.

Padding.  Pad query rows and pad key columns are zero.  Real positions come from
`key_mask` (`[*batch, key]`, 1 = real) or, when it is None, from the row sums of
the patterns (a real row sums to 1, a pad row to 0).  The identity is added on
real positions only, so pad rows stay zero and an example gives the same result
alone or inside a left-padded batch.  (Recorded patterns put no attention on pad
keys; should a real row put some on a key that `key_mask` marks as pad, that
mass is dropped from the result, not renormalised away.)

`exclude_keys` zeroes key columns (e.g. `(0,)`, the BOS attention sink) and
renormalises the rows before composing.  Its positions count each example's
*real* keys, so `0` is the first real token of every example of a left-padded
batch and `-1` the last.  A boolean tensor `[*batch, key]` (padded coordinates,
True = exclude) names different keys per example instead, e.g. the sinks
`attnflow.attribution.exclusion_mask` finds.  `rows` index the query dim as given (padded
coordinates): a list shared by the batch, or an integer tensor `[*batch, rows]`.

Compute is float32 for float16 / bfloat16 / float32 input and float64 for float64
input; nothing is ever composed in float16.  The layer loop never synchronises
with the host: non-finite values are flagged on the device and raised
(`NonFiniteError`, naming the layer) once the loop is done.

Validation.  By default (`validate=True`) every function checks that its patterns
are attention: each row of each head sums to 1 (a real query) or 0 (padding)
within `ROW_TOL`, and no weight is negative; anything else is a `DataError` naming
the layer, raised with the non-finite check after the loop.  It costs two
reductions over each layer's patterns (a row sum and a minimum, on the device, no
copy).  Pass `validate=False` to skip it, for speed on patterns known to be good
or to compose rows that are not row-stochastic on purpose: heads reduced with
"max", or a model with attention sinks (their rows sum to less than 1).  Argument
types and ranges are always checked: `alpha` a number in [0, 1], `rows` and
`exclude_keys` integers in range, `layer` an integer:

    >>> B = A.clone(); B[1, 2, 0, 3] *= 5                 # example 1, layer 2, head 0, query 3: a row summing to 5
    >>> rollout(B)
    Traceback (most recent call last):
    attnflow.errors.DataError: rows of layer 2 sum to 5 (at [*batch, head, query] = (1, 0, 3)), not 1 (or 0 for \
padding); pass attention probabilities, or validate=False to compose them anyway
    >>> rollout(B, validate=False).shape
    torch.Size([2, 5, 5])
    >>> rollout(A, rows=[0.5])
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: rows=[0.5]; use a list of integer query rows or an integer tensor [*batch, rows]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnflow import _checks
from attnflow.errors import BadArgumentError, DataError, NonFiniteError, ShapeError

__all__ = [
    "METHODS",
    "ROW_TOL",
    "FlowAccumulator",
    "check_alpha",
    "check_attention",
    "compose",
    "max_flow",
    "normalize_head_weights",
    "raw",
    "reduce_heads",
    "residual_flow",
    "measured_rollout",
    "mixing_weights",
    "rollout",
    "total_attention",
]

METHODS = ("rollout", "flow", "flow_normalized", "sum", "raw", "rollout_measured", "maxflow")
_COMPOSED = ("rollout", "flow", "flow_normalized", "sum")
ROW_TOL = 0.02  # how far a row sum may be from 1 (or 0): float16 rounding over long rows stays far below

Heads = str | Float[Tensor, "layer head"]
Rows = Sequence[int] | Int[Tensor, "*batch rows"] | None
Exclude = Sequence[int] | Tensor


# ------------------------------------------------------------------------------------
# head reduction
# ------------------------------------------------------------------------------------
def reduce_heads(
    A: Float[Tensor, "*batch layer head query key"],
    heads: Heads = "mean",
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
) -> Float[Tensor, "*batch layer 1 query key"]:
    """Reduce the head dim to 1: `"mean"`, `"max"`, `"norm"`, or a weight tensor `[layer, head]`.

    Weights are normalised to sum to 1 within each layer, so the result of a
    weighted reduction of row-stochastic patterns is row-stochastic.  `"max"` rows
    do not sum to 1; rollout and `flow_normalized` renormalise them.  `"norm"`
    (Kobayashi et al. 2020) weighs each head's pattern by the norm of each key's
    transformed value, `α^h_ij·‖W_O^h v^h_j‖` given as `value_norms`, sums the heads
    as the model sums their outputs, and renormalises the rows.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]], [[1., 0.], [.1, .9]]]]])  # 1 layer, 2 heads
        >>> reduce_heads(A, "mean")[0, 0, 0]
        tensor([[1.0000, 0.0000],
                [0.3000, 0.7000]])
        >>> reduce_heads(A, torch.tensor([[3., 1.]]))[0, 0, 0]        # weights 0.75, 0.25
        tensor([[1.0000, 0.0000],
                [0.4000, 0.6000]])
        >>> n = torch.tensor([[[[1., 3.], [1., 1.]]]])                 # batch layer head key
        >>> reduce_heads(A, "norm", value_norms=n)[0, 0, 0]            # row 1: (.5 + .1, 1.5 + .9) / 3
        tensor([[1.0000, 0.0000],
                [0.2000, 0.8000]])
    """
    _check_patterns(A)
    w = _head_weights(heads, A.shape[-4], A.shape[-3], A)
    _check_value_norms(heads, value_norms, A)
    out = torch.empty((*A.shape[:-3], 1, *A.shape[-2:]), dtype=_compute_dtype(A), device=A.device)
    for l in range(A.shape[-4]):  # each layer written in place: no list of layers stacked into a second copy
        out[..., l, 0, :, :] = _reduce_layer(A[..., l, :, :, :], heads, None if w is None else w[l], _layer_norms(value_norms, l))
    return out


def _layer_norms(value_norms: Tensor | None, l: int) -> Tensor | None:
    return None if value_norms is None else value_norms[..., l, :, :]


def _check_value_norms(heads: Heads, value_norms: Tensor | None, A: Tensor) -> None:
    """`value_norms [*batch, layer, head, key]` comes with heads="norm" and only with it."""
    if not (isinstance(heads, str) and heads == "norm"):
        if value_norms is not None:
            raise BadArgumentError("value_norms= weighs heads only with heads='norm'; pass heads='norm' or drop value_norms")
        return
    if value_norms is None:
        raise BadArgumentError("heads='norm' needs value_norms= [*batch, layer, head, key] (each key's ‖W_O^h v^h_j‖)")
    expected = (*A.shape[:-2], A.shape[-1])
    if tuple(value_norms.shape) != expected:
        raise ShapeError(f"value_norms have shape {tuple(value_norms.shape)}, expected {expected} (*batch, layer, head, key)")


def _head_weights(heads: Heads, L: int | None, H: int, A: Tensor) -> Tensor | None:
    """Per-layer normalised weights `[layer, head]` in A's compute dtype, or None for "mean"/"max"/"norm"."""
    if isinstance(heads, str):
        if heads not in ("mean", "max", "norm"):
            raise BadArgumentError(f"heads={heads!r}; use 'mean', 'max', 'norm' or a weight tensor [layer, head]")
        return None
    if not isinstance(heads, Tensor):
        raise BadArgumentError(f"heads has type {type(heads).__name__}; use 'mean', 'max' or a weight tensor [layer, head]")
    L = heads.shape[0] if L is None else L
    if heads.shape != (L, H):
        raise ShapeError(f"head weights have shape {tuple(heads.shape)}, expected (layer={L}, head={H})")
    return normalize_head_weights(heads.to(device=A.device, dtype=_compute_dtype(A)))


def normalize_head_weights(w: Float[Tensor, "layer head"]) -> Float[Tensor, "layer head"]:
    """Head weights scaled to sum to 1 within each layer; they must be finite, non-negative, not all zero in a layer.

    The one check of head weights, used by the head reductions here and by the tracers.

        >>> normalize_head_weights(torch.tensor([[3., 1.], [0., 2.]]))
        tensor([[0.7500, 0.2500],
                [0.0000, 1.0000]])
    """
    total = w.sum(-1, keepdim=True)
    ok = torch.isfinite(w).all() & (w >= 0).all() & (total > 0).all()
    if not bool(ok):  # one host synchronisation
        raise BadArgumentError("head weights must be finite and non-negative, with a positive sum in every layer")
    return w / total


def _reduce_layer(
    A_l: Float[Tensor, "*batch head query key"], heads: Heads, w_l: Tensor | None, norms_l: Tensor | None = None
) -> Float[Tensor, "*batch query key"]:
    dtype = _compute_dtype(A_l)
    H = A_l.shape[-3]
    from attnflow.tracers.reduce import head_sum, norm_weighted  # here: attnflow.tracers imports this module

    if norms_l is not None:  # heads="norm": Σ_h α^h_ij·‖f_h(x_j)‖, rows renormalised (the tracer's own math)
        return norm_weighted(A_l, norms_l.to(device=A_l.device, dtype=dtype), dtype=dtype)
    if w_l is None and H == 1:
        return A_l[..., 0, :, :].to(dtype)
    if w_l is None and heads == "max":
        return A_l.amax(dim=-3).to(dtype)
    # one head at a time, upcast as read: on CPU an einsum over the head dim is ~15x slower (it permutes a copy
    # first), a matmul of the weights with the (query key) plane ~1.2x (float32) to ~5x (float16: a copy)
    return head_sum(A_l, w_l, dtype) if w_l is not None else head_sum(A_l, None, dtype).div_(H)


# ------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------
class FlowAccumulator:
    """Fold layers into rollout / flow / total attention one at a time, with O(N²) memory.

    Bottom-up (default) keeps the running product `X [*batch, query, key]`; add
    layers from the first to the last, as a tracer records them.  Top-down
    (`top_down=True`, with `rows`) keeps only `E_T Â_L ··· Â_l  [*batch, rows, key]`:
    add layers from the last to the first, `O(|T|·N²)` per layer.

        >>> A = torch.rand(2, 4, 8, 5, 5).tril()
        >>> A = A / A.sum(-1, keepdim=True)
        >>> acc = FlowAccumulator("rollout", alpha=0.5)
        >>> for l in range(A.shape[1]):
        ...     acc.add(A[:, l])                     # [batch, head, query, key]
        >>> torch.allclose(acc.result(), rollout(A))
        True

    `add(A_l, layer=l)` names the layer in errors and picks the row of a weight
    tensor `heads=[layer, head]`; it defaults to the count of layers added so far
    (so a top-down accumulator with head weights must be told `layer`).
    `add(A_l, value_norms=n_l)` gives the layer's `[*batch, head, key]` norms for
    `heads="norm"`; `add(A_l, alpha=w_l)` a rollout's measured mixing weights
    `[*batch, query]` for this layer (`mixing_weights`), in place of the fixed alpha.
    With `validate=True` (the default) each added layer is checked as the module
    docstring says; the error comes from `result()`.
    """

    def __init__(
        self,
        method: str = "rollout",
        *,
        alpha: float = 0.5,
        heads: Heads = "mean",
        rows: Rows = None,
        exclude_keys: Exclude = (),
        key_mask: Int[Tensor, "*batch key"] | None = None,
        top_down: bool = False,
        validate: bool = True,
    ):
        if method not in _COMPOSED:
            raise BadArgumentError(f"method={method!r} cannot be accumulated; use one of {', '.join(_COMPOSED)}")
        alpha = check_alpha(alpha)
        if top_down and rows is None and method != "sum":
            raise BadArgumentError("top_down=True composes selected rows; pass rows=[...] (or use top_down=False)")
        self.method, self.alpha, self.heads = method, alpha, heads
        self.top_down, self.validate = _checks.flag("top_down", top_down), _checks.flag("validate", validate)
        self.rows, self.exclude_keys, self.key_mask = _rows_form(rows), _exclusion(exclude_keys), key_mask
        self._has_excluded = _any_excluded(self.exclude_keys)
        self.state: Tensor | None = None
        self.count = 0
        self._finite: list[Tensor] = []
        self._checked: list[tuple] = []  # per layer, with validate: what `_row_check` found, on the device
        self._layers: list[int] = []
        self._weights: Tensor | None = None

    def add(
        self,
        A_l: Float[Tensor, "*batch head query key"],
        layer: int | None = None,
        *,
        value_norms: Float[Tensor, "*batch head key"] | None = None,
        alpha: Float[Tensor, "*batch query"] | None = None,
    ) -> None:
        """Fold in one layer's patterns (head dim 1 when already reduced)."""
        if A_l.ndim < 3:
            raise ShapeError(f"one layer's patterns have shape {tuple(A_l.shape)}, expected (*batch, head, query, key)")
        if self._weights is None:  # validated and normalised once (a host sync), not per layer
            self._weights = _head_weights(self.heads, None, A_l.shape[-3], A_l)
        weights = self._weights
        if layer is None:
            if self.top_down and weights is not None:
                raise BadArgumentError("a top-down accumulator with head weights needs add(A_l, layer=l)")
            layer = self.count
        w_l = None if weights is None else weights[layer]
        if (value_norms is not None) != (isinstance(self.heads, str) and self.heads == "norm"):
            raise BadArgumentError("heads='norm' needs add(A_l, value_norms=...) for every layer, and only it takes them")
        if alpha is not None and self.method != "rollout":
            raise BadArgumentError(f"per-token mixing weights apply to rollout, not {self.method!r}")
        if self.validate:
            self._checked.append(_row_check(A_l))
        P = _reduce_layer(A_l, self.heads, w_l, value_norms)
        if self.method == "sum":
            self._add_sum(P)
        else:
            self._add_product(P, alpha)
        self.count += 1
        self._layers.append(layer)

    def result(self) -> Float[Tensor, "*batch query key"]:
        """The composition so far: `[*batch, query, key]`, or `[*batch, rows, key]` with `rows`."""
        if self.state is None:
            raise BadArgumentError("no layer was added; call add(A_l) once per layer first")
        _raise_non_finite(self._finite, self._layers)
        if self._checked:
            _raise_invalid(self._checked, self._layers)
        out = self.state
        if self.method == "sum":
            out = out * _safe_inv(out.sum(-1))[..., None]
        elif not self.top_down and self.rows is not None:
            out = _take_rows(out, self._idx)
        return out

    # --- internals ---------------------------------------------------------------------
    def _setup(self, P: Tensor, row_sums: Tensor) -> None:
        N = P.shape[-1]
        if P.shape[-2] != N:
            raise ShapeError(
                f"{self.method} needs square patterns (*batch, layer, head, {N}, {N}); got query={P.shape[-2]}, key={N}: "
                "record every query row (rows=None)"
            )
        self.real = _real_positions(row_sums, P, self.key_mask)  # [*batch, N]
        self.keep, self._drop_pos, self._drop_valid = _excluded(self.real, self.exclude_keys)
        # without excluded keys or a key_mask, pad key columns of P are zero (pad keys are known
        # only from P's own zero rows), so masking them again would be a no-op
        self._mask_keys = self._has_excluded or self.key_mask is not None
        self._idx = None if self.rows is None else _row_index(self.rows, P.shape[:-2], N, P.device)

    def _gains(self, P: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(g, h) with this layer's step `M = diag(g) · P · diag(keep) + diag(h)`; also flags non-finite P."""
        row_sums = P.sum(-1)  # one pass over P; NaN / inf anywhere in P shows here
        self._finite.append(torch.isfinite(row_sums).all())
        if self.state is None:
            self._setup(P, row_sums)
        kept = row_sums  # attention mass on kept keys (recorded patterns put none on pad keys)
        if isinstance(self.exclude_keys, Tensor):
            kept = (P @ self.keep[..., :, None])[..., 0]
        elif self.exclude_keys:
            idx = self._drop_pos[..., None, :].expand(*P.shape[:-1], self._drop_pos.shape[-1])
            kept = row_sums - (P.gather(-1, idx) * self._drop_valid[..., None, :]).sum(-1)
        a = self.real * _safe_inv(kept) if self._has_excluded else self.real
        if self.method == "flow":
            return a, self.real
        if alpha is None:
            alpha = 0.5 if self.method == "flow_normalized" else self.alpha
        else:
            alpha = alpha.to(device=P.device, dtype=P.dtype)
        inv = _safe_inv(alpha * a * kept + (1 - alpha) * self.real)
        return alpha * a * inv, (1 - alpha) * self.real * inv

    def _add_product(self, P: Tensor, alpha: Tensor | None = None) -> None:
        g, h = self._gains(P, alpha)
        keep = self.keep
        if self.state is None:  # the first step is the layer's own matrix (or its selected rows)
            if self.top_down:
                idx = self._idx
                rows_P = _take_rows(P, idx)
                eye = (idx[..., None] == torch.arange(P.shape[-1], device=P.device)).to(P.dtype)  # no one_hot: it syncs
                self.state = _take(g, idx)[..., None] * rows_P * keep[..., None, :] + _take(h, idx)[..., None] * eye
            else:  # diag(h) added on the diagonal in place: no [.., N, N] diag_embed and no second sum
                self.state = g[..., :, None] * P * keep[..., None, :]
                self.state.diagonal(dim1=-2, dim2=-1).add_(h)
        elif self.top_down:  # Y ← Y·M = (Y·diag(g))·P·diag(keep) + Y·diag(h), in as few kernels as we can
            Y = self.state
            Yg, Yh = Y * torch.stack([g, h])[:, ..., None, :]  # one kernel for both scalings
            if self._mask_keys:
                self.state = (Yg @ P).mul_(keep[..., None, :]).add_(Yh)
            else:
                T, N = Y.shape[-2:]
                out = torch.baddbmm(Yh.reshape(-1, T, N), Yg.reshape(-1, T, N), P.reshape(-1, N, N))
                self.state = out.view(Y.shape)
        else:  # X ← M·X = diag(g)·P·(diag(keep)·X) + diag(h)·X
            X = self.state
            out = P @ (keep[..., :, None] * X) if self._mask_keys else P @ X
            self.state = out.mul_(g[..., :, None]).addcmul_(X, h[..., :, None])

    def _add_sum(self, P: Tensor) -> None:
        row_sums = P.sum(-1)
        self._finite.append(torch.isfinite(row_sums).all())
        if self.state is None:
            self._setup(P, row_sums)
        if self._idx is not None:
            P, real = _take_rows(P, self._idx), _take(self.real, self._idx)
        else:
            real = self.real
        A = P * real[..., :, None] * self.keep[..., None, :]
        if self._has_excluded:
            A = A * _safe_inv(A.sum(-1))[..., None]
        self.state = A if self.state is None else self.state + A


def rollout(
    A: Float[Tensor, "*batch layer head query key"],
    alpha: float = 0.5,
    heads: Heads = "mean",
    rows: Rows = None,
    exclude_keys: Exclude = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"]:
    """Attention rollout (Abnar & Zuidema 2020): `R = Â_L ··· Â_1`, `Â_l = rownorm(alpha·Ā_l + (1-alpha)·I)`.

    Rows of the result sum to 1 (0 for pad rows).  With `rows`, only those rows,
    computed top-down in `O(L·|T|·N²)`.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]]]])            # batch layer head query key
        >>> rollout(A, alpha=0.5)                                    # Â = [[1, 0], [.25, .75]]
        tensor([[[1.0000, 0.0000],
                 [0.2500, 0.7500]]])
        >>> rollout(A, rows=[1], exclude_keys=(0,))                 # BOS column zeroed first
        tensor([[[0., 1.]]])
    """
    return _compose(A, "rollout", heads, rows, exclude_keys, key_mask, alpha=alpha, value_norms=value_norms, validate=validate)


def residual_flow(
    A: Float[Tensor, "*batch layer head query key"],
    normalize: bool = False,
    heads: Heads = "mean",
    rows: Rows = None,
    exclude_keys: Exclude = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"]:
    """Residual-inclusive flow: `X_0 = I`, `X_l = Ā_l X_{l-1} + X_{l-1}`; rows sum to 2^L.

    `normalize=True` renormalises rows each layer, which equals `rollout(alpha=0.5)`.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]]]])
        >>> residual_flow(A)                                         # Ā + I
        tensor([[[2.0000, 0.0000],
                 [0.5000, 1.5000]]])
        >>> residual_flow(A, normalize=True)
        tensor([[[1.0000, 0.0000],
                 [0.2500, 0.7500]]])
    """
    method = "flow_normalized" if _checks.flag("normalize", normalize) else "flow"
    return _compose(A, method, heads, rows, exclude_keys, key_mask, value_norms=value_norms, validate=validate)


def total_attention(
    A: Float[Tensor, "*batch layer head query key"],
    heads: Heads = "mean",
    rows: Rows = None,
    exclude_keys: Exclude = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"]:
    """Total attention `Σ_l Ā_l`, rows renormalised to sum to 1.

        >>> A = torch.tensor([[[[[1., 0.], [1., 0.]]], [[[1., 0.], [0., 1.]]]]])   # 2 layers
        >>> total_attention(A)
        tensor([[[1.0000, 0.0000],
                 [0.5000, 0.5000]]])
    """
    return _compose(A, "sum", heads, rows, exclude_keys, key_mask, value_norms=value_norms, validate=validate)


def raw(
    A: Float[Tensor, "*batch layer head query key"],
    layer: int = -1,
    heads: Heads = "mean",
    rows: Rows = None,
    exclude_keys: Exclude = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"]:
    """One layer's head-reduced patterns `Ā_layer` (the last by default).

    Unlike the composed methods it accepts a subset of query rows (query < key),
    e.g. a trace recorded with `rows="last"`.  Only the chosen layer is checked
    for NaN/inf.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]], [[1., 0.], [.1, .9]]]]])
        >>> raw(A, heads="max")
        tensor([[[1.0000, 0.0000],
                 [0.5000, 0.9000]]])
        >>> raw(A, exclude_keys=(0,))
        tensor([[[0., 0.],
                 [0., 1.]]])
    """
    _check_patterns(A)
    L = A.shape[-4]
    layer = _checks.integer("layer", layer, -L, L) % L
    w = _head_weights(heads, L, A.shape[-3], A)
    _check_value_norms(heads, value_norms, A)
    exclude_keys, idx_rows = _exclusion(exclude_keys), _rows_form(rows)
    P = _reduce_layer(A[..., layer, :, :, :], heads, None if w is None else w[layer], _layer_norms(value_norms, layer))
    _raise_non_finite([torch.isfinite(P.sum(-1)).all()], [layer])
    if _checks.flag("validate", validate):
        _raise_invalid([_row_check(A[..., layer, :, :, :])], [layer])
    Q, N = P.shape[-2:]
    if Q == N:
        real = _real_positions(P.sum(-1), P, key_mask)
        P = P * real[..., :, None]
    else:
        real = _real_keys_from_columns(P, key_mask)
    P = P * _excluded(real, exclude_keys)[0][..., None, :]
    if _any_excluded(exclude_keys):
        P = P * _safe_inv(P.sum(-1))[..., None]
    if idx_rows is not None:
        P = _take_rows(P, _row_index(idx_rows, P.shape[:-2], Q, P.device))
    return P


def compose(
    A: Float[Tensor, "*batch layer head query key"],
    method: str = "rollout",
    *,
    alpha: float = 0.5,
    heads: Heads = "mean",
    rows: Rows = None,
    exclude_keys: Exclude = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    layer: int = -1,
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
    attn_norms: Float[Tensor, "*batch layer query"] | None = None,
    residual_norms: Float[Tensor, "*batch layer query"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"]:
    """Dispatch on a method name: rollout, flow, flow_normalized, sum, raw, rollout_measured, maxflow.

    Every method takes the same arguments, so a loop over methods can pass them
    all: `alpha` is used by rollout only (flow_normalized is alpha 0.5), `layer` by raw only,
    `attn_norms` / `residual_norms` by rollout_measured only (and needed there).

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]]]])
        >>> compose(A, "flow_normalized", rows=[-1])      # == residual_flow(A, normalize=True, rows=[-1])
        tensor([[[0.2500, 0.7500]]])
    """
    kw = {"heads": heads, "rows": rows, "exclude_keys": exclude_keys, "key_mask": key_mask, "value_norms": value_norms,
          "validate": validate}
    if method == "rollout_measured":
        if attn_norms is None or residual_norms is None:
            raise BadArgumentError("method='rollout_measured' needs attn_norms= and residual_norms= [*batch, layer, query]")
        return measured_rollout(A, attn_norms, residual_norms, **kw)
    if method == "rollout":
        return rollout(A, alpha=alpha, **kw)
    if method in ("flow", "flow_normalized"):
        return residual_flow(A, normalize=method == "flow_normalized", **kw)
    if method == "sum":
        return total_attention(A, **kw)
    if method == "raw":
        return raw(A, layer=layer, **kw)
    if method == "maxflow":
        if value_norms is not None:
            raise BadArgumentError("method='maxflow' takes no value_norms=; reduce heads with heads='mean' or weights")
        return max_flow(A, rows=rows, heads=heads, alpha=alpha, exclude_keys=exclude_keys, key_mask=key_mask, validate=validate)
    raise BadArgumentError(f"method={method!r}; use one of {', '.join(METHODS)}")


def max_flow(A: Float[Tensor, "*batch layer head query key"], **kwargs) -> Float[Tensor, "*batch query key"]:
    """Abnar & Zuidema's *attention flow*: the exact max flow from each key to each target row.

    Unlike "flow" above (the residual recurrence, 2^L x rollout on row-stochastic
    patterns), this is the paper's maximum flow through the layered graph with
    capacities `alpha·Ā_l + (1-alpha)·I`, rows renormalised; see `attnflow.maxflow.max_flow`
    for every argument.  The solver is scipy's compiled Dinic, imported here on first
    use so this module itself stays torch-only.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]]]])
        >>> max_flow(A, rows=[-1])                        # one layer: max flow == the rollout row
        tensor([[[0.2500, 0.7500]]])
    """
    from attnflow.maxflow import max_flow as solve

    return solve(A, **kwargs)


def _compose(
    A: Tensor, method: str, heads: Heads, rows: Rows, exclude_keys, key_mask, alpha: float = 0.5,
    value_norms: Tensor | None = None, mixing: Tensor | None = None, validate: bool = True,
) -> Tensor:
    _check_patterns(A)
    _head_weights(heads, A.shape[-4], A.shape[-3], A)  # validate once, before the loop
    _check_value_norms(heads, value_norms, A)
    top_down = rows is not None and method != "sum"
    acc = FlowAccumulator(
        method, alpha=alpha, heads=heads, rows=rows, exclude_keys=exclude_keys, key_mask=key_mask, top_down=top_down,
        validate=validate,
    )
    L = A.shape[-4]
    for l in reversed(range(L)) if top_down else range(L):
        w_l = None if mixing is None else mixing[..., l, :]
        acc.add(A[..., l, :, :, :], layer=l, value_norms=_layer_norms(value_norms, l), alpha=w_l)
    return acc.result()


def mixing_weights(
    attn_norms: Float[Tensor, "*batch layer query"], residual_norms: Float[Tensor, "*batch layer query"]
) -> Float[Tensor, "*batch layer query"]:
    """Measured mixing weights `w = ‖a‖ / (‖a‖ + ‖x‖)` (0 where both norms are 0), Kobayashi et al. 2021.

    `a` is a layer's attention output and `x` its residual input at each position;
    `w` is the share of the attention in the updated residual stream, so rollout with
    `alpha = w` weighs context against the token itself as the model measurably does.

        >>> mixing_weights(torch.tensor([[1., 3., 0.]]), torch.tensor([[1., 1., 0.]]))
        tensor([[0.5000, 0.7500, 0.0000]])
    """
    if attn_norms.shape != residual_norms.shape:
        raise ShapeError(f"attn_norms {tuple(attn_norms.shape)} and residual_norms {tuple(residual_norms.shape)} differ in shape")
    dtype = torch.float64 if attn_norms.dtype == torch.float64 else torch.float32
    a, x = attn_norms.to(dtype), residual_norms.to(device=attn_norms.device, dtype=dtype)
    ok = torch.isfinite(a).all() & torch.isfinite(x).all() & (a >= 0).all() & (x >= 0).all()
    if not bool(ok):  # one host synchronisation, before any layer is composed
        raise BadArgumentError("attn_norms and residual_norms must be finite and non-negative (they are vector norms)")
    return a * _safe_inv(a + x)


def measured_rollout(
    A: Float[Tensor, "*batch layer head query key"],
    attn_norms: Float[Tensor, "*batch layer query"],
    residual_norms: Float[Tensor, "*batch layer query"],
    heads: Heads = "mean",
    rows: Rows = None,
    exclude_keys: Exclude = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    value_norms: Float[Tensor, "*batch layer head key"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"]:
    """Rollout with measured residual mixing (Kobayashi et al. 2021): `Â_l = diag(w_l)·Ā_l + diag(1-w_l)·I`.

    `w_l = mixing_weights(attn_norms, residual_norms)[..., l, :]` is each query
    position's measured attention share in layer l (query positions in the patterns'
    padded coordinates); rows are renormalised after `exclude_keys`, as in `rollout`.
    Equal norms everywhere give `rollout(alpha=0.5)`.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]]]])                 # batch layer head query key
        >>> measured_rollout(A, torch.tensor([[[1., 3.]]]), torch.tensor([[[1., 1.]]]))   # w = [.5, .75]
        tensor([[[1.0000, 0.0000],
                 [0.3750, 0.6250]]])
    """
    _check_patterns(A)
    expected = (*A.shape[:-3], A.shape[-2])
    for name, t in (("attn_norms", attn_norms), ("residual_norms", residual_norms)):
        if tuple(t.shape) != expected:
            raise ShapeError(f"{name} have shape {tuple(t.shape)}, expected {expected} (*batch, layer, query)")
    w = mixing_weights(attn_norms, residual_norms).to(A.device)
    return _compose(A, "rollout", heads, rows, exclude_keys, key_mask, value_norms=value_norms, mixing=w, validate=validate)


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------
def _compute_dtype(A: Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _check_patterns(A: Tensor) -> None:
    if not isinstance(A, Tensor):
        raise BadArgumentError(f"patterns must be a torch.Tensor, got {type(A).__name__}")
    if A.ndim < 4:
        raise ShapeError(f"patterns have shape {tuple(A.shape)}, expected (*batch, layer, head, query, key)")
    if not A.is_floating_point():
        raise BadArgumentError(f"patterns have dtype {A.dtype}; pass floating-point attention weights")
    if 0 in A.shape[-4:]:
        raise ShapeError(f"patterns have shape {tuple(A.shape)}, expected non-empty (*batch, layer, head, query, key)")


def _raise_non_finite(flags: list[Tensor], layers: list[int]) -> None:
    finite = torch.stack(flags)
    if not bool(finite.all()):  # the one host synchronisation, after the layer loop
        bad = layers[int((~finite).nonzero()[0, 0])]
        raise NonFiniteError(f"patterns hold NaN or inf in layer {bad} (index into the layer dim); re-record them in float32")


def _safe_inv(x: Tensor) -> Tensor:
    """1/x where x != 0, else 0 (zero rows stay zero)."""
    return torch.where(x != 0, 1 / x, torch.zeros_like(x))


def _real_positions(row_sums: Float[Tensor, "*batch query"], P: Tensor, key_mask: Tensor | None) -> Float[Tensor, "*batch key"]:
    """1.0 at real positions: from `key_mask`, else from the row sums of square patterns (pad rows sum to 0)."""
    if key_mask is None:
        return (row_sums != 0).to(P.dtype)
    return _checked_mask(key_mask, P)


def _real_keys_from_columns(P: Float[Tensor, "*batch query key"], key_mask: Tensor | None) -> Float[Tensor, "*batch key"]:
    """Real keys of patterns with a subset of query rows: those some row attends to (or `key_mask`)."""
    if key_mask is None:
        return (P.abs().sum(-2) > 0).to(P.dtype)
    return _checked_mask(key_mask, P)


def _checked_mask(key_mask: Tensor, P: Tensor) -> Tensor:
    expected = (*P.shape[:-2], P.shape[-1])
    if tuple(key_mask.shape) != expected:
        raise ShapeError(f"key_mask has shape {tuple(key_mask.shape)}, expected {expected} (*batch, key)")
    return (key_mask.to(P.device) != 0).to(P.dtype)


def _exclusion(exclude_keys: Exclude) -> tuple[int, ...] | Tensor:
    """Positions as a tuple of ints, or a key mask `[*batch, key]` as a bool tensor."""
    if isinstance(exclude_keys, Tensor):
        if exclude_keys.dtype != torch.bool and exclude_keys.is_floating_point():
            raise BadArgumentError("exclude_keys as a tensor is a key mask [*batch, key]: bool (True = exclude) or 0/1 integers")
        return exclude_keys != 0
    if isinstance(exclude_keys, (list, tuple, range)) and all(_checks.is_int(k) for k in exclude_keys):
        return tuple(int(k) for k in exclude_keys)
    raise BadArgumentError(
        f"exclude_keys={exclude_keys!r}; use a tuple of integer key positions like (0,) or a bool key mask [*batch, key]"
    )


def _any_excluded(exclude_keys: tuple[int, ...] | Tensor) -> bool:
    """Whether rows are renormalised after excluding keys (always for a mask: no host sync to look)."""
    return isinstance(exclude_keys, Tensor) or bool(exclude_keys)


def _excluded(real: Float[Tensor, "*batch key"], exclude_keys: tuple[int, ...] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(keep, positions, valid): `real` with the excluded keys zeroed, and where those keys are.

    Excluded positions count each example's real keys (negative ones from the
    end); `positions [*batch, k]` are padded key indices, `valid [*batch, k]` is 0
    where an example has no such key or an earlier entry already named it.  A key
    mask `[*batch, key]` gives `keep` only (no positions).
    """
    if isinstance(exclude_keys, Tensor):  # broadcast as torch does (maxflow treats layers as a batch dim)
        if exclude_keys.shape[-1:] != real.shape[-1:] or torch.broadcast_shapes(exclude_keys.shape, real.shape) != real.shape:
            raise ShapeError(f"exclude_keys mask has shape {tuple(exclude_keys.shape)}, expected {tuple(real.shape)} (*batch, key)")
        empty = real.new_zeros((*real.shape[:-1], 0))
        return real * ~exclude_keys.to(real.device), empty.long(), empty
    k, N = len(exclude_keys), real.shape[-1]
    bad = [key for key in exclude_keys if not -N <= key < N]
    if bad:
        raise BadArgumentError(f"exclude_keys {bad} are out of range for {N} keys; use positions in {-N}..{N - 1}")
    if not k:
        return real, real.new_zeros((*real.shape[:-1], 0), dtype=torch.long), real.new_zeros((*real.shape[:-1], 0))
    rank = torch.cumsum(real, -1) - 1  # index of each real key among the example's real keys
    n_real = real.sum(-1, keepdim=True)
    is_real = real > 0
    drop = torch.zeros_like(is_real)
    positions, valid = [], []
    for key in exclude_keys:
        target = n_real + key if key < 0 else torch.full_like(n_real, key)
        hit = (rank == target) & is_real  # [*batch, key]: at most one True
        positions.append(hit.to(torch.uint8).argmax(-1))
        valid.append(hit.any(-1) & ~(drop & hit).any(-1))
        drop |= hit
    return real * ~drop, torch.stack(positions, -1), torch.stack(valid, -1).to(real.dtype)


def _row_index(rows, batch_shape: torch.Size, N: int, device) -> Int[Tensor, "*batch rows"] | Int[Tensor, "rows"]:
    """Rows as a non-negative LongTensor, `[rows]` (shared) or `[*batch, rows]` (per example).

    A Python list is range-checked (on the host); so is a CPU tensor.  A GPU tensor is not,
    to keep the loop free of host synchronisation.
    """
    idx = _rows_form(rows)
    if idx.ndim == 0 or (idx.ndim > 1 and tuple(idx.shape[:-1]) != tuple(batch_shape)):
        raise ShapeError(f"rows has shape {tuple(idx.shape)}, expected (rows,) or {(*batch_shape, 'rows')}")
    if idx.numel() and idx.device.type == "cpu" and bool(((idx < -N) | (idx >= N)).any()):
        raise BadArgumentError(f"rows must lie in [-{N}, {N}) for {N} query rows")
    idx = idx.to(device)
    return idx % N


def _rows_form(rows: Rows) -> Int[Tensor, "*batch rows"] | None:
    """`rows` as a LongTensor (None stays None): a list of ints or an integer tensor, never floats or bools."""
    if rows is None:
        return None
    if isinstance(rows, Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise BadArgumentError(f"rows is a {rows.dtype} tensor; use integer query rows (a list or an integer tensor)")
        return rows.long()
    if isinstance(rows, (list, tuple, range)) and all(_checks.is_int(r) for r in rows):
        return torch.as_tensor([int(r) for r in rows], dtype=torch.long)
    raise BadArgumentError(f"rows={rows!r}; use a list of integer query rows or an integer tensor [*batch, rows]")


def check_alpha(alpha: float) -> float:
    """Rollout's mixing weight: a number in [0, 1], else BadArgumentError.

        >>> check_alpha(2)
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: alpha=2; use a number in [0, 1] (0.5 weighs attention and residual equally)
    """
    return _checks.number("alpha", alpha, 0.0, 1.0, hint="0.5 weighs attention and residual equally")


def _row_check(A_l: Float[Tensor, "*batch head query key"]) -> tuple[Tensor, Tensor, torch.Size]:
    """((worst distance of a row sum from 1 or 0, that row's sum, the smallest weight), the row's flat index,
    the rows' shape), on the device, no host synchronisation.

    Two reductions over the layer (a row sum in the compute dtype, a minimum), neither copies it;
    NaN or inf anywhere shows in the first.
    """
    sums = A_l.sum(-1, dtype=_compute_dtype(A_l))  # [*batch, head, query]
    dist = torch.minimum((sums - 1).abs(), sums.abs()).flatten()
    worst = dist.argmax()
    return torch.stack([dist[worst], sums.flatten()[worst], A_l.amin().to(sums.dtype)]), worst, sums.shape


def check_attention(A: Float[Tensor, "*batch layer head query key"]) -> None:
    """The `validate=True` check of whole patterns: rows sum to 1 or 0 (within ROW_TOL), no negative weight, finite.

        >>> check_attention(torch.tensor([[[[[1., 0.], [.5, .5]]]]]))
        >>> check_attention(torch.tensor([[[[[1., 0.], [1.5, -.5]]]]]))
        Traceback (most recent call last):
        attnflow.errors.DataError: patterns of layer 0 hold a negative weight (-0.5); attention weights are probabilities >= 0 (validate=False composes them anyway)
    """
    _check_patterns(A)
    L = A.shape[-4]
    _raise_invalid([_row_check(A[..., l, :, :, :]) for l in range(L)], list(range(L)))


def _raise_invalid(checks: list[tuple[Tensor, Tensor, torch.Size]], layers: list[int]) -> None:
    """DataError (or NonFiniteError) naming the first layer whose check failed; one host synchronisation."""
    values = torch.stack([c[0] for c in checks]).tolist()
    for (dist, total, low), (_, worst, shape), layer in zip(values, checks, layers):
        if not (math.isfinite(dist) and math.isfinite(low)):
            raise NonFiniteError(f"patterns hold NaN or inf in layer {layer} (index into the layer dim); re-record them in float32")
        if low < -ROW_TOL:
            raise DataError(
                f"patterns of layer {layer} hold a negative weight ({low:.4g}); attention weights are probabilities >= 0 "
                "(validate=False composes them anyway)"
            )
        if dist > ROW_TOL:
            at = tuple(int(i) for i in torch.unravel_index(worst.cpu(), shape))
            raise DataError(
                f"rows of layer {layer} sum to {total:.4g} (at [*batch, head, query] = {at}), not 1 (or 0 for padding); "
                "pass attention probabilities, or validate=False to compose them anyway"
            )


def _take(x: Float[Tensor, "*batch n"], idx: Tensor) -> Tensor:
    return x[..., idx] if idx.ndim == 1 else torch.gather(x, -1, idx)


def _take_rows(P: Float[Tensor, "*batch query key"], idx: Tensor) -> Float[Tensor, "*batch rows key"]:
    if idx.ndim == 1:
        return P[..., idx, :]
    return torch.gather(P, -2, idx[..., None].expand(*idx.shape, P.shape[-1]))

