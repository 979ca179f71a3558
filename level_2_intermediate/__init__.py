"""Level 2: the shop simulation and the queue-backed buses (threads, processes, asyncio)."""
