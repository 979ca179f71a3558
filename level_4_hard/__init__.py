"""level_4_hard."""
