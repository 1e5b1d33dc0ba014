"""Data sources every layer may read: image folders, the built-in data sets, captions. The
subfolders hold the shipped assets (built-in models, the Fashion-MNIST subset)."""
