"""Level 3: RabbitMQ for real (pika) and simulated, behind one interface; Redis variants.

Start with README.md; ``broker.connect()`` is the entry point, ``main.py`` the demo.
"""
