"""level_3_advanced."""
