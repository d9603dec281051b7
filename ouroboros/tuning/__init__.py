"""Hardware-aware defaults: size the token trees from measured forward-pass costs.

Speculative decoding trades target passes for bigger target passes. What a bigger pass
costs depends on the hardware: on a GPU a forward over 64 new tokens after a 200-token
prefix costs about what one token costs (the weights are read once either way); on a CPU it
costs several times more. So the best draft length γ, number of suffixes K, n-gram level N
and Jacobi window differ by device, and the presets of `OuroborosConfig` cannot be right
everywhere. In parts:

* `ouroboros.tuning.measurement`: the cost curves and the draft's agreement α measured
  once per device and model pair, the device description and fingerprints, the JSON
  cache, `tuned_config` and `choose_num_threads`;
* `ouroboros.tuning.cost_model`: `CostCurve`, `ThroughputModel` (expected tokens per
  second of a step) and the choice (`choose_config`, `choose_from`); pure, no torch;
* `ouroboros.geometry`: how many tokens a target and a draft pass feed for a `TreeShape`
  (shared with the KV-cache sizing of `OuroborosConfig`);
* CPU prepacking (`prepack_linear_weights`, `PrepackedLinear`) lives in
  `ouroboros.models` beside the model classes it prepacks; re-exported here.
"""

from ouroboros.geometry import TreeShape
from ouroboros.models import (
    PrepackedLinear,
    PrepackedSubsetLMHead,
    prepack_linear_weights,
    prepacking_available,
)
from ouroboros.tuning.cost_model import (
    CostCurve,
    ThroughputModel,
    choose_config,
    choose_from,
)
from ouroboros.tuning.measurement import (
    CALIBRATION_PROMPTS,
    DRAFT_SIZES,
    PREFIX_LEN,
    TARGET_SIZES,
    Measurements,
    choose_num_threads,
    device_description,
    measure,
    measure_agreement,
    measure_cost_curve,
    model_fingerprint,
    tuned_config,
    tuning_enabled,
)

__all__ = [
    "CALIBRATION_PROMPTS",
    "DRAFT_SIZES",
    "PREFIX_LEN",
    "TARGET_SIZES",
    "CostCurve",
    "Measurements",
    "PrepackedLinear",
    "PrepackedSubsetLMHead",
    "ThroughputModel",
    "TreeShape",
    "choose_config",
    "choose_from",
    "choose_num_threads",
    "device_description",
    "measure",
    "measure_agreement",
    "measure_cost_curve",
    "model_fingerprint",
    "prepack_linear_weights",
    "prepacking_available",
    "tuned_config",
    "tuning_enabled",
]
