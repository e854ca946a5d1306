"""WebSocket: handshake checks, frame-header walking, the byte-copying tunnel."""
