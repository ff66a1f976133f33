"""The mathematics of the study as pure JAX functions (arrays in, arrays out).

jit- and vmap-able, no file or network I/O, independent of how checkpoints are loaded.
Modules: similarity (CKA), spectra (singular values, effective rank), circuits (OV and MLP
matrices from the stacked Flax params), gradients, sparsity, convergence, summary (one-call
per-checkpoint metrics for the sweep), registry (METRICS: one name per metric).
"""

from analysis.circuits import (
  VALUE_SLICES,
  fused_qkv_weight,
  head_outputs,
  mlp_singular_values,
  mlp_weight,
  ov_activations,
  ov_gradient_singular_values,
  ov_gradients,
  ov_head_activations,
  ov_head_features,
  ov_head_gradient_factors,
  ov_head_gradient_singular_values,
  ov_head_gradients,
  ov_head_singular_values,
  ov_head_weights,
  ov_singular_values,
  ov_weights,
  reference_value_activation,
  reference_value_weight,
  value_kernel,
  value_vectors,
)
from analysis.convergence import (
  PAPER_PERCENTILES,
  area_under_log_step_curve,
  average_ranks,
  convergence_step,
  log_step_axis,
  pearson,
  per_convergence_correlation,
  percentile_bands,
  spearman,
)
from analysis.gradients import (
  cosine_similarity,
  factored_inner_product,
  gradient_norms,
  mean_consecutive_cosine,
  mean_gradient_norm,
  mean_singular_value_per,
  mean_singular_values,
)
from analysis.registry import FAMILIES, METRICS, Metric, metrics_in_family, register_metric
from analysis.similarity import (
  CKAAccumulator,
  cka_noise_floor,
  cka_stream_init,
  cka_stream_result,
  cka_stream_update,
  cka_to_reference,
  hsic,
  linear_cka,
  linear_cka_debiased,
  linear_cka_gram,
  minimum_samples,
  pairwise_cka,
  per_head_cka_to_reference,
  streaming_linear_cka,
)
from analysis.sparsity import gini, hoyer
from analysis.spectra import (
  condition_number,
  effective_rank,
  frobenius_norm,
  product_singular_values,
  proportional_effective_rank,
  singular_values,
  spectral_metrics,
  spectral_norm,
  stable_rank,
  top_k,
)
from analysis.summary import (
  COMPONENTS,
  gradient_spectra,
  weight_singular_values,
  weight_spectra,
)
from analysis.validation import check_finite

__all__ = [
  'CKAAccumulator', 'COMPONENTS', 'FAMILIES', 'METRICS', 'Metric', 'PAPER_PERCENTILES',
  'VALUE_SLICES', 'area_under_log_step_curve', 'average_ranks', 'check_finite',
  'cka_noise_floor', 'cka_stream_init', 'cka_stream_result', 'cka_stream_update',
  'cka_to_reference', 'condition_number', 'convergence_step', 'cosine_similarity',
  'effective_rank', 'factored_inner_product', 'frobenius_norm', 'fused_qkv_weight', 'gini',
  'gradient_norms', 'gradient_spectra', 'head_outputs', 'hoyer', 'hsic', 'linear_cka',
  'linear_cka_debiased', 'linear_cka_gram', 'log_step_axis', 'mean_consecutive_cosine',
  'mean_gradient_norm', 'mean_singular_value_per', 'mean_singular_values', 'metrics_in_family',
  'minimum_samples', 'mlp_singular_values', 'mlp_weight', 'ov_activations',
  'ov_gradient_singular_values', 'ov_gradients', 'ov_head_activations', 'ov_head_features',
  'ov_head_gradient_factors', 'ov_head_gradient_singular_values', 'ov_head_gradients',
  'ov_head_singular_values', 'ov_head_weights', 'ov_singular_values', 'ov_weights',
  'pairwise_cka', 'pearson', 'per_convergence_correlation', 'per_head_cka_to_reference',
  'percentile_bands', 'product_singular_values', 'proportional_effective_rank',
  'reference_value_activation', 'reference_value_weight', 'register_metric',
  'singular_values', 'spearman', 'spectral_metrics', 'spectral_norm', 'stable_rank',
  'streaming_linear_cka', 'top_k', 'value_kernel', 'value_vectors', 'weight_singular_values',
  'weight_spectra',
]
