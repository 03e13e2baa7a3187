"""Message-broker sources for :func:`reqscope.asyncio.consume`: each message its own request.

- :mod:`reqscope.brokers.rabbitmq`: RabbitMQ through aio-pika (``reqscope[rabbitmq]``).
- :mod:`reqscope.brokers.redis_streams`: Redis streams with consumer groups
  (``reqscope[redis]``).

The producer puts its context in the message's headers (``ctx.to_headers()``); the worker
rebuilds it, runs the handler in it with a session of its own (committed when the handler
returns), and then acknowledges the message, or dead-letters it when it failed, exactly
once. Delivery is at least once: a worker that dies after committing and before
acknowledging sees that message again, so make handlers idempotent (a unique message id in
the table they write is the usual way).
"""
