"""The web layer: pages, the REST API and the WebSocket route."""
