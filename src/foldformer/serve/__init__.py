"""The HTTP session server: `foldformer serve` (FastAPI app in `app`, SQLite store in `store`)."""
