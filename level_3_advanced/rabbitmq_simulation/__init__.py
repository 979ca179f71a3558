"""rabbitmq_simulation."""
