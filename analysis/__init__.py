"""The mathematics of the study as pure JAX functions (arrays in, arrays out).

jit- and vmap-able, no file or network I/O, independent of how checkpoints are loaded.
Modules: similarity (CKA), spectra (singular values, effective rank), circuits (OV and MLP
matrices from the stacked Flax params), gradients, sparsity, convergence, summary (one-call
per-checkpoint metrics for the sweep, and the component x metric table `metric_table`),
registry (METRICS: the spectral metrics the sweep runs). `__all__` is what a caller uses;
the modules hold their helpers too.
"""

from analysis.circuits import (
  fused_qkv_weight,
  mlp_singular_values,
  mlp_weight,
  ov_activations,
  ov_gradient_singular_values,
  ov_gradients,
  ov_head_activations,
  ov_head_features,
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
from analysis.cka_stream import (
  cka_stream_init,
  cka_stream_result,
  cka_stream_update,
  streaming_linear_cka,
)
from analysis.convergence import (
  area_under_log_step_curve,
  average_ranks,
  convergence_step,
  per_convergence_correlation,
  percentile_bands,
)
from analysis.gradients import (
  factored_inner_product,
  mean_consecutive_cosine,
  mean_gradient_norm,
  mean_singular_value_per,
)
from analysis.registry import METRICS, metrics_in_family, register_metric
from analysis.similarity import (
  cka_noise_floor,
  cka_to_reference,
  hsic,
  linear_cka,
  linear_cka_gram,
  pairwise_cka,
  per_head_cka_to_reference,
)
from analysis.sparsity import gini, hoyer
from analysis.spectra import (
  effective_rank,
  product_singular_values,
  proportional_effective_rank,
  singular_values,
  spectral_metrics,
)
from analysis.summary import (
  ACTIVATION_COMPONENTS,
  CKA_ESTIMATORS,
  COMPONENTS,
  MODEL_METRICS,
  first_gradient_carry,
  gradient_batch_terms,
  gradient_name,
  gradient_rank_bounds,
  gradient_spectra,
  gradient_summary,
  metric_table,
  noise_floor_name,
  weight_spectra,
)
from analysis.validation import check_finite

__all__ = [
  "ACTIVATION_COMPONENTS",
  "CKA_ESTIMATORS",
  "COMPONENTS",
  "METRICS",
  "MODEL_METRICS",
  "area_under_log_step_curve",
  "average_ranks",
  "check_finite",
  "cka_noise_floor",
  "cka_stream_init",
  "cka_stream_result",
  "cka_stream_update",
  "cka_to_reference",
  "convergence_step",
  "effective_rank",
  "factored_inner_product",
  "fused_qkv_weight",
  "gini",
  "gradient_name",
  "first_gradient_carry",
  "gradient_batch_terms",
  "gradient_rank_bounds",
  "gradient_spectra",
  "gradient_summary",
  "hoyer",
  "hsic",
  "linear_cka",
  "linear_cka_gram",
  "mean_consecutive_cosine",
  "mean_gradient_norm",
  "mean_singular_value_per",
  "metric_table",
  "metrics_in_family",
  "mlp_singular_values",
  "mlp_weight",
  "noise_floor_name",
  "ov_activations",
  "ov_gradient_singular_values",
  "ov_gradients",
  "ov_head_activations",
  "ov_head_features",
  "ov_head_gradient_singular_values",
  "ov_head_gradients",
  "ov_head_singular_values",
  "ov_head_weights",
  "ov_singular_values",
  "ov_weights",
  "pairwise_cka",
  "per_convergence_correlation",
  "per_head_cka_to_reference",
  "percentile_bands",
  "product_singular_values",
  "proportional_effective_rank",
  "reference_value_activation",
  "reference_value_weight",
  "register_metric",
  "singular_values",
  "spectral_metrics",
  "streaming_linear_cka",
  "value_kernel",
  "value_vectors",
  "weight_spectra",
]
