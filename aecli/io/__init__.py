"""File formats: weights files, PNGs and grids, atomic writes."""
