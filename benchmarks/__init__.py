"""rabbitq's benchmark suite: rabbitq against a minimal aio-pika floor, in one run.

Run it from the repository root with `python -m benchmarks.run` (see benchmarks/README.md).
Nothing here is imported by rabbitq, and nothing in the test suite asserts a time.
"""
