"""ddpm-cli: denoising diffusion probabilistic models from the command line.

The engine (``ddpm_cli.engine``) is importable on its own; the CLI (``ddpm_cli.cli``) and the
training loop (``ddpm_cli.training``) are built on it.
"""

__version__ = "0.1.0"
