"""event_replay."""
