"""Integrations with other libraries, each imported on its own (the core never
imports them): :mod:`.transformers` for Hugging Face models."""
