"""level_2_intermediate."""
