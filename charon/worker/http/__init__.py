"""HTTP/1.1 data path: client protocol, request/response head rules, one exchange per request."""
