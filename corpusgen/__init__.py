"""corpusgen: offline batch LLM jobs over whole corpora (FlexGen-style offloading engine)."""

__version__ = "0.2.0"
