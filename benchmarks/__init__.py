"""The performance suite: every result is a ratio to a peer or a floor measured in the same run."""
