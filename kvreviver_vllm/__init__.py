"""KVReviver: reversible KV-cache compression as a vLLM attention-backend plugin."""

__version__ = "0.1.0"
