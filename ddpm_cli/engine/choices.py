"""The names users choose from, kept free of torch so the CLI can list them without importing it."""

from ddpm_cli.engine.diffusion.registry import SAMPLERS  # noqa: F401 - the registry's names, in its order

BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v", "sample")
SPACINGS = ("leading", "trailing", "linspace")
SIGMAS = ("default", "karras", "exponential")  # noise levels of the sigma samplers (diffusion/sigmas.py)
CLIP_X0 = ("on", "off")
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")
LEARNED_VARIANCES = ("learned_range", "learned")
LOSSES = ("simple", "vlb", "hybrid")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
CONDITIONINGS = ("none", "class", "text")
TASKS = ("ddpm", "autoencoder", "superres")
OBJECTIVES = ("ddpm", "edm")  # --objective of --task ddpm (training/objectives/__init__.py)
TEXT_EMBEDDINGS = ("tokens", "sentence")
MEMORY_LAYOUTS = ("contiguous", "channels_last", "compiler_channels_last")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
PRIORS = ("nearest", "none")  # txt2img --prior: the nearest training caption, or the prompt as written
