"""Backend connections and their keep-alive pools."""
