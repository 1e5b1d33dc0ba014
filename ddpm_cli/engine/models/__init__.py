"""Models: one resolver (local folder, built-in, Hub), weight safety checks, loading, the Pipeline, text encoders and VAEs."""
