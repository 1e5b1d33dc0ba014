"""The names users choose from, kept free of torch so the CLI can list them without importing it."""

BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v", "sample")
SAMPLERS = ("ddpm", "ddim", "dpmpp-2m")
SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("fixed_small", "fixed_large")
DTYPES = ("auto", "fp32", "fp16", "bf16")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
CONDITIONINGS = ("none", "class", "text")
TASKS = ("ddpm", "autoencoder", "superres")
