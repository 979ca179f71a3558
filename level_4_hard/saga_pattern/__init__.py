"""saga_pattern."""
