"""The supervisor process: binds listeners, runs workers, serves the admin endpoint."""
