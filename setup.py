"""The C part of Charon: the WebSocket tunnel engine (plain CPython C API and OpenSSL).

Everything else about the package is in pyproject.toml; setuptools builds this extension with
`pip install -e .` or `pip install .`, which need a C compiler and the Python headers.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "charon.worker.websocket._engine",
            sources=[
                f"charon/worker/websocket/engine/{name}.c"
                for name in (
                    "sockets", "walk", "door", "head", "dial", "tls", "engine_type", "tunnel_type",
                    "atomics",
                )
            ],
            # The engine terminates TLS itself (tls.c): OpenSSL, as Python's ssl module uses.
            libraries=["ssl", "crypto"],
            depends=["charon/worker/websocket/engine/engine.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
        )
    ]
)
