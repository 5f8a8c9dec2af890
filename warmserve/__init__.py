"""WarmServe: serve many LLMs on one shared accelerator pool with forecast-driven prewarming."""

__version__ = "0.1.0"
