"""Repository tooling (the demo runner)."""
