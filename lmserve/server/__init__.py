"""The OpenAI-compatible HTTP server: `build_app` makes the FastAPI app, `serve` runs it."""

from lmserve.server.app import build_app, serve

__all__ = ["build_app", "serve"]
