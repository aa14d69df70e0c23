"""Streaming: Kafka producers, the Bytewax feature dataflow and the streaming scorer."""
