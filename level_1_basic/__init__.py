"""Level 1: a synchronous EventBus with wildcard subscriptions and an event log."""
