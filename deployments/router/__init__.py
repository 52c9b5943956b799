"""The router process: OpenAI HTTP and gRPC front ends over the Redis global queue, and
the scheduler leader."""
