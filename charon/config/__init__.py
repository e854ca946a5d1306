"""Charon's configuration: the TOML loader and the validated model it produces."""

from charon.config.loader import ConfigError, default_config, load_config, load_config_text
from charon.config.model import (
    AdminConfig,
    CertificateFiles,
    Config,
    HostTls,
    IPNetwork,
    Limits,
    ListenAddress,
    Location,
    ProxyHost,
    ServerConfig,
    Timeouts,
    TlsConfig,
    Upstream,
    WebSocketSettings,
)

__all__ = [
    "AdminConfig",
    "CertificateFiles",
    "Config",
    "ConfigError",
    "HostTls",
    "IPNetwork",
    "Limits",
    "ListenAddress",
    "Location",
    "ProxyHost",
    "ServerConfig",
    "Timeouts",
    "TlsConfig",
    "Upstream",
    "WebSocketSettings",
    "default_config",
    "load_config",
    "load_config_text",
]
