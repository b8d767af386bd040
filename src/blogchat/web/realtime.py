"""The WebSocket endpoint: every connection is handed to the hub."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

router = APIRouter()


@router.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    """Speak the blogchat protocol (docs/protocol.md) on this connection."""
    await websocket.app.state.hub.serve(websocket)
