"""Charon's configuration: the TOML loader and the validated model it produces."""

from charon.config.loader import ConfigError, default_config, load_config, load_config_text
from charon.config.model import (
    AdminConfig,
    Config,
    IPNetwork,
    Limits,
    ListenAddress,
    Location,
    ProxyHost,
    ServerConfig,
    Timeouts,
    Upstream,
    WebSocketSettings,
)

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "IPNetwork",
    "Limits",
    "ListenAddress",
    "Location",
    "ProxyHost",
    "ServerConfig",
    "Timeouts",
    "Upstream",
    "WebSocketSettings",
    "default_config",
    "load_config",
    "load_config_text",
]
