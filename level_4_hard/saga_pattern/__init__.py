"""saga_pattern: the order saga, orchestrated and choreographed, persisted and crash-recoverable.

Start with ``saga_orchestrator.py`` (the general orchestrator, then the order saga built with
it), ``choreography.py`` (the same process with no coordinator) and ``README.md``. Nothing here
does I/O or starts a thread at import.
"""
