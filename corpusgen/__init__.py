"""corpusgen: offline batch LLM jobs over whole corpora (FlexGen-style offloading engine)."""

__version__ = "0.1.0"
