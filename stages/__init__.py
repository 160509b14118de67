"""The pipeline's stages: plain callables of a message (or a batch) to zero or more messages.

Stages never touch a transport: no nats, faststream, aiomqtt or prometheus imports here
(enforced by a test). Acks, batching, retries and metrics live in `pipeline/`. Stages that do
I/O receive an asyncpg pool; stages that hold state are small classes with `__call__`.
"""
