"""OV circuits and the MLP matrix from the stacked Flax parameters, in the paper's terms.

Parameter layout: the model-family seam's per-layer study factors (models/family.py), the
same in every family (kernels (in, out), layer axis first; '...' below is any leading
axes, typically [L] for weights and [G, L] for G gradient batches):
  attn['value']['kernel'] [..., d, H_kv, dh], attn['out']['kernel'] [..., H, dh, d]
  (query [..., d, H, dh], key like value), mlp['fc_out']['kernel'] [..., f, d].
H_kv divides H; with grouped-query attention (H_kv < H) query head h reads key/value head
kv(h) = h // (H / H_kv). Torch (Hugging Face, out x in) names used in docs/method.md:
  W_V[g, :] = value.kernel[:, g, :].T   (dh x d), g a key/value head
  W_O[:, h] = out.kernel[h].T           (d x dh)
  W_OV,h    = W_O[:, h] @ W_V[kv(h), :] (d x d, rank <= dh)
  W_OV      = sum_h W_OV,h              (d x d)
  MLP output matrix = fc_out.kernel.T   (d x f: dense_4h_to_h, or down_proj)
Matrices returned here are in the torch (out x in) convention; singular values do not
depend on the convention.

value_slice: 'per_head' (default) uses the true per-head values. 'reference' reproduces the
reference code's defect (docs/method.md: the value-slice defect): it rebuilds the fused
`query_key_value` output/weight, whose rows are laid out per head (row h*3*dh + j*dh + i,
j in q, k, v), and takes its last third (`out[..., 2d:]`, `W[-d:, :]`) as "the value",
which mixes q, k and v of the last heads. Use it only to reproduce published numbers and
measure the difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from analysis.spectra import product_singular_values, singular_values

_HIGHEST = jax.lax.Precision.HIGHEST
VALUE_SLICES = ("per_head", "reference")


def _check_slice(value_slice: str) -> None:
  if value_slice not in VALUE_SLICES:
    raise ValueError(f"value_slice must be one of {VALUE_SLICES}, got {value_slice!r}")


def _fuse_heads(q, k, v, head_axis: int):
  """Per-head q, k, v [..., H, dh, ...] -> fused per-head layout [..., 3*H*dh, ...]."""
  fused = jnp.stack([q, k, v], axis=head_axis + 1 if head_axis >= 0 else head_axis)
  # After stacking, axes (H, 3, dh) sit together; merging them gives index h*3dh + j*dh + i.
  axis = head_axis if head_axis >= 0 else fused.ndim + head_axis - 1
  shape = fused.shape[:axis] + (-1,) + fused.shape[axis + 3 :]
  return fused.reshape(shape)


def fused_qkv_weight(attn: dict) -> jax.Array:
  """The Hugging Face fused `query_key_value` weight, torch layout.

  Args:
    attn: {'query'|'key'|'value': {'kernel': [..., d, H, dh]}, ...}.
  Returns:
    [..., 3*H*dh, d], row index h*3*dh + j*dh + i with j in (q, k, v).
  """
  kernels = [attn[name]["kernel"] for name in ("query", "key", "value")]
  fused = _fuse_heads(*kernels, head_axis=-2)  # [..., d, 3*H*dh] (in, out)
  return jnp.swapaxes(fused, -1, -2)


def value_kernel(attn: dict, value_slice: str = "per_head") -> jax.Array:
  """The value kernel [..., d, H, dh] (Flax layout), true or as the reference slices it.

  'reference': the last third of the fused weight's rows (torch `W[-d:, :]`), regrouped
  as the reference does: its "head h" is rows h*dh..(h+1)*dh of that slice.
  Works on gradient dicts too (the slice of the fused gradient).
  """
  _check_slice(value_slice)
  kernel = attn["value"]["kernel"]
  if value_slice == "per_head":
    return kernel
  *lead, d_in, heads, head_dim = kernel.shape
  fused_t = fused_qkv_weight(attn)  # [..., 3D, d]
  width = heads * head_dim
  sliced = fused_t[..., -width:, :]  # [..., D, d]: the reference's W[-d:, :]
  return jnp.swapaxes(sliced, -1, -2).reshape(*lead, d_in, heads, head_dim)


def reference_value_weight(attn: dict) -> jax.Array:
  """The reference's "value" weight, torch layout: fused W[-d:, :]. [..., d, d]."""
  kernel = attn["value"]["kernel"]
  return fused_qkv_weight(attn)[..., -kernel.shape[-2] * kernel.shape[-1] :, :]


def reference_value_activation(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The reference's "value" activation: fused qkv output sliced `out[..., 2d:]`.

  Args:
    q, k, v: [..., H, dh] per-head projections (hook_q, hook_k, hook_v, pre-rotary, as the
      fused Linear outputs them).
  Returns:
    [..., H*dh] (read as [..., H, dh] it is what the reference calls head h's value).
  """
  if not (q.shape == k.shape == v.shape):
    raise ValueError(f"q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")
  fused = _fuse_heads(q, k, v, head_axis=-2)  # [..., 3*H*dh]
  return fused[..., -q.shape[-2] * q.shape[-1] :]


def value_vectors(
  q: jax.Array | None, k: jax.Array | None, v: jax.Array, value_slice: str = "per_head"
) -> jax.Array:
  """Value vectors [..., H, dh]: v itself, or the reference's slice regrouped into heads.

  q and k are only needed (and checked) for value_slice='reference'.
  """
  _check_slice(value_slice)
  if value_slice == "per_head":
    return v
  if q is None or k is None:
    raise ValueError("value_slice='reference' needs q and k (hook_q, hook_k)")
  return reference_value_activation(q, k, v).reshape(v.shape)


def kv_to_heads(x: jax.Array, heads: int, axis: int) -> jax.Array:
  """Key/value heads on `axis` [..., H_kv, ...] -> query heads [..., H, ...]: query head h
  gets key/value head h // (H / H_kv). A no-op without grouping (H_kv = H)."""
  kv = x.shape[axis]
  if kv == heads:
    return x
  if heads % kv:
    raise ValueError(f"{kv} key/value heads do not divide {heads} query heads")
  return jnp.repeat(x, heads // kv, axis=axis)


def _ov_factors(attn: dict, value_slice: str):
  """Per-head W_O[:, h] [..., H, d, dh] and W_V[kv(h), :] [..., H, dh, d] (torch)."""
  w_v = jnp.moveaxis(value_kernel(attn, value_slice), -2, -3)  # [..., H_kv, d, dh]
  w_v = jnp.swapaxes(w_v, -1, -2)  # [..., H_kv, dh, d]
  w_o = jnp.swapaxes(attn["out"]["kernel"], -1, -2)  # [..., H, d, dh]
  return w_o, kv_to_heads(w_v, w_o.shape[-3], axis=-3)


def _whole_factors(attn: dict, value_slice: str):
  """W_O [..., d, D] and W_V [..., D, d] (torch), D = H*dh."""
  w_o, w_v = _ov_factors(attn, value_slice)
  *lead, heads, d, head_dim = w_o.shape
  w_o_full = jnp.moveaxis(w_o, -3, -2).reshape(*lead, d, heads * head_dim)
  w_v_full = w_v.reshape(*lead, heads * head_dim, w_v.shape[-1])
  return w_o_full, w_v_full


def ov_head_weights(attn: dict, value_slice: str = "per_head") -> jax.Array:
  """Per-head OV matrices W_OV,h = W_O[:, h] @ W_V[h, :] (torch). [..., H, d, d]."""
  w_o, w_v = _ov_factors(attn, value_slice)
  return jnp.matmul(w_o, w_v, precision=_HIGHEST)


def ov_weights(attn: dict, value_slice: str = "per_head") -> jax.Array:
  """Whole-layer OV matrix W_O @ W_V (torch). [..., d, d]."""
  w_o, w_v = _whole_factors(attn, value_slice)
  return jnp.matmul(w_o, w_v, precision=_HIGHEST)


def ov_head_singular_values(
  attn: dict, value_slice: str = "per_head", method: str = "auto"
) -> jax.Array:
  """Singular values of every head's OV matrix from its dh x dh QR core. [..., H, dh].

  method: see `product_singular_values` ('auto' = core, 'direct' = d x d SVD for checks).
  """
  w_o, w_v = _ov_factors(attn, value_slice)
  return product_singular_values(w_o, w_v, method)


def ov_singular_values(
  attn: dict, value_slice: str = "per_head", method: str = "auto"
) -> jax.Array:
  """Singular values of the whole-layer OV matrix. [..., d].

  The factors are d x D and D x d with D = d, so the QR core is itself d x d and saves
  nothing; 'auto' forms the product and takes one d x d SVD (rank bound d).
  """
  w_o, w_v = _whole_factors(attn, value_slice)
  return product_singular_values(w_o, w_v, method)


def ov_head_gradient_factors(attn, grads_attn, value_slice):
  """dW_OV,h = [dW_O_h, W_O_h] @ [W_V_h; dW_V_h]: left [..., H, d, 2dh], right [..., H, 2dh, d].

  Gradients may carry extra leading axes (e.g. [G, L, ...] against params [L, ...]);
  params are broadcast to them.
  """
  w_o, w_v = _ov_factors(attn, value_slice)
  dw_o, dw_v = _ov_factors(grads_attn, value_slice)
  w_o = jnp.broadcast_to(w_o, dw_o.shape)
  w_v = jnp.broadcast_to(w_v, dw_v.shape)
  left = jnp.concatenate([dw_o, w_o], axis=-1)
  right = jnp.concatenate([w_v, dw_v], axis=-2)
  return left, right


def ov_head_gradients(attn: dict, grads_attn: dict, value_slice: str = "per_head") -> jax.Array:
  """Chain rule dW_OV,h = dW_O[:, h] @ W_V[h, :] + W_O[:, h] @ dW_V[h, :]. [..., H, d, d].

  Args:
    attn: params, leaves [..., ...]. grads_attn: gradients of the same leaves, possibly
      with extra leading axes (e.g. [G, L, ...]).
  """
  left, right = ov_head_gradient_factors(attn, grads_attn, value_slice)
  return jnp.matmul(left, right, precision=_HIGHEST)


def ov_gradients(attn: dict, grads_attn: dict, value_slice: str = "per_head") -> jax.Array:
  """Whole-layer OV gradient dW_O @ W_V + W_O @ dW_V (torch). [..., d, d]."""
  w_o, w_v = _whole_factors(attn, value_slice)
  dw_o, dw_v = _whole_factors(grads_attn, value_slice)
  return jnp.matmul(dw_o, w_v, precision=_HIGHEST) + jnp.matmul(w_o, dw_v, precision=_HIGHEST)


def ov_head_gradient_singular_values(
  attn: dict, grads_attn: dict, value_slice: str = "per_head", method: str = "auto"
) -> jax.Array:
  """Singular values of each head's OV gradient from a 2dh x 2dh QR core. [..., H, 2dh].

  dW_OV,h is a sum of two rank-dh products, i.e. one product of rank <= 2dh.
  """
  left, right = ov_head_gradient_factors(attn, grads_attn, value_slice)
  return product_singular_values(left, right, method)


def ov_gradient_singular_values(
  attn: dict, grads_attn: dict, value_slice: str = "per_head"
) -> jax.Array:
  """Singular values of the whole-layer OV gradient (d x d SVD). [..., d]."""
  return singular_values(ov_gradients(attn, grads_attn, value_slice))


def mlp_weight(mlp: dict) -> jax.Array:
  """The study's MLP matrix dense_4h_to_h (torch, d x 4d) = fc_out.kernel^T. [..., d, f]."""
  return jnp.swapaxes(mlp["fc_out"]["kernel"], -1, -2)


def mlp_singular_values(mlp: dict) -> jax.Array:
  """Singular values of dense_4h_to_h. [..., d] (the Flax kernel [.., f, d] has the same)."""
  return singular_values(mlp["fc_out"]["kernel"])


def ov_head_activations(values: jax.Array, out_kernel: jax.Array) -> jax.Array:
  """Per-head OV activation v_h(x) @ W_O[:, h]^T: a token's own value, no attention mixing.

  Args:
    values: [..., n, H or H_kv, dh] (hook_v, or `value_vectors(..., 'reference')`); key/value
      head kv(h) serves query head h.
    out_kernel: [..., H, dh, d] (same leading axes as values minus n, e.g. [L]).
  Returns:
    [..., n, H, d]. No output bias (the paper's v(x) @ W_O^T).
  """
  values = _check_head_dims(values, out_kernel)
  return jnp.einsum("...nhi,...hid->...nhd", values, out_kernel, precision=_HIGHEST)


def ov_activations(values: jax.Array, out_kernel: jax.Array) -> jax.Array:
  """Whole-layer OV activation v(x) @ W_O^T = sum over heads. [..., n, H, dh] -> [..., n, d]."""
  values = _check_head_dims(values, out_kernel)
  return jnp.einsum("...nhi,...hid->...nd", values, out_kernel, precision=_HIGHEST)


def ov_head_features(values: jax.Array, out_kernel: jax.Array) -> jax.Array:
  """Per-head OV activations v_h @ W_O[h] in a d_head-dim orthonormal basis.

  With W_O[h]^T = Q_h R_h (QR, Q_h [d, dh] orthonormal columns), v_h W_O[h] = v_h R_h^T
  Q_h^T and Q_h^T preserves inner products, so every Gram matrix, hence every (debiased)
  CKA, of the [n, d] activations equals that of the [n, dh] features v_h R_h^T: d/dh
  times less to store and to multiply.

  Args:
    values: [L, n, H or H_kv, dh]. out_kernel: [L, H, dh, d].
  Returns:
    [L, H, n, dh].
  """
  values = _check_head_dims(values, out_kernel)
  r = jnp.linalg.qr(jnp.swapaxes(out_kernel, -1, -2), mode="r")  # [L, H, dh, dh]
  return jnp.einsum("lnhi,lhji->lhnj", values, r, precision=_HIGHEST)


def _check_head_dims(values, out_kernel):
  """values with its key/value heads spread to out_kernel's query heads (kv_to_heads)."""
  if values.ndim < 3 or out_kernel.ndim < 3:
    raise ValueError(
      f"expected values [..., n, H, dh] and out_kernel [..., H, dh, d], got "
      f"{values.shape} and {out_kernel.shape}"
    )
  heads = out_kernel.shape[-3]
  if values.shape[-1] != out_kernel.shape[-2] or heads % values.shape[-2]:
    raise ValueError(
      f"head dims differ: values {values.shape} (.., n, H, dh) vs out_kernel "
      f"{out_kernel.shape} (.., H, dh, d)"
    )
  return kv_to_heads(values, heads, axis=-2)
