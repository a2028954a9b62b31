"""The west_fast policy (ScalingAttention): WEST per-head masks, FAST per-step densities."""
