"""event_replay: a durable write-ahead event log, replay, upcasting and snapshots (Level 3).

Start with ``eventbus_replay.py`` (the bus), then ``account.py`` (an event-sourced account),
``snapshots.py`` and the demos ``demo_replay.py`` and ``demo_crash.py``; see README.md.
"""
