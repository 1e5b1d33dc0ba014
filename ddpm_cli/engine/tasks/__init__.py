"""Generation tasks built on the samplers: plain generation, inpainting, super-resolution, and the model wrappers they use."""
