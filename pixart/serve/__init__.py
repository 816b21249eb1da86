"""HTTP serving: `pixart serve` (OpenAI Images API, AUTOMATIC1111 subset, web page, health, metrics)."""
from .app import Limits, create_app, serve

__all__ = ["Limits", "create_app", "serve"]
