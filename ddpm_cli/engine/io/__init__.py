"""Files: safe image loading, atomic output, PNG metadata."""
