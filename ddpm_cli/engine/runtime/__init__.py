"""Where and how the networks run: device and dtype, torch.distributed, compilation and memory layout, attention backends."""
