"""filmless-pacs core: settings, the index, the one ingest path, and the CLI."""

__version__ = "0.1.0"
