"""`lsnet ablation` (being written)."""
