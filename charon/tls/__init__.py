"""TLS: certificate files, the ACME client and the layout of its state directory."""
