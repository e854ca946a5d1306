"""The worker process: accepts client connections and proxies them to backends."""
