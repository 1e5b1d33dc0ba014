"""The diffusion process itself: noise schedules, samplers and their registry, the denoiser call, seeded noise, the variational bound."""
