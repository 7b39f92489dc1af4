"""Looking at runs: training curves and attention maps (the viz extra)."""
