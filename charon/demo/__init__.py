"""The built-in demo backend that `charon demo` runs behind the proxy."""
