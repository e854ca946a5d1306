"""The engine's own tests against a sanitized build of the extension: gcc builds the engine's
.c files with -fsanitize=address,undefined into a copy of the package, and the engine's test
files run from that copy in a subprocess with libasan preloaded and Python's plain allocator
(PYTHONMALLOC=malloc, so ASan sees every object). Every process they start (Charon's
supervisor and workers, the backends) inherits both; any ASan or UBSan report is written to a
log file and fails the test. Leaks are not checked (CPython keeps memory to the end by design)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "charon" / "worker" / "websocket" / "engine"
# The in-process walker properties, the engine's edge cases, the front door; the tunnel suite
# in part (close codes, rule breaks, limits, pings), to stay within the CI time budget.
SUBSET = [
    "tests/test_engine_walk_properties.py",
    "tests/test_websocket_engine.py",
    "tests/test_front_door.py",
    # (its own Charon; accepting is Python's policy, the engine's part is one accept4 error)
    "--deselect", "tests/test_front_door.py::test_out_of_fds_accepting_pauses_then_resumes",
    "tests/test_front_door_101.py",
    "tests/test_shared_tables.py",  # the limits table's atomics (atomics.c)
    "tests/test_websocket_tunnel.py::test_backend_killed_mid_stream_raw",
    "tests/test_websocket_tunnel.py::test_unmasked_client_frame_closed_1002",
    "tests/test_websocket_tunnel.py::test_frame_over_the_limit_closed_1009",
    "tests/test_websocket_tunnel.py::test_pong_to_proxy_ping_not_forwarded",
    "tests/test_websocket_tunnel.py::test_ping_waits_for_a_frame_boundary",
    "tests/test_websocket_tunnel.py::test_many_concurrent_tunnels",
    # TLS in the engine (tls.c): handshakes, SNI, tickets, deadlines, garbage; pumps; wss
    # (a subset, for CI time: SNI choices and alerts, tickets, the pump both ways)
    "tests/test_tls_listener.py::test_certificate_chosen_by_sni",
    "tests/test_tls_listener.py::test_unknown_sni_without_default_is_unrecognized_name",
    "tests/test_tls_listener.py::test_session_resumption",
    "tests/test_tls_listener.py::test_large_download_and_chunked_upload",
    "tests/test_tls_deadline.py",
    "tests/test_tls_websocket.py::test_wss_many_messages_in_flight",
    "tests/test_tls_websocket.py::test_wss_large_messages",
]


def libasan() -> str | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    path = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True,
                          timeout=30).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


LIBASAN = libasan()


def build_copy(tmp: Path) -> Path:
    """A copy of the package and the tests whose engine is the ASan build."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "out", ".hypothesis")
    shutil.copytree(REPO / "charon", tmp / "charon", ignore=ignore)
    shutil.copytree(REPO / "tests", tmp / "tests", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = tmp / "charon" / "worker" / "websocket" / f"_engine{suffix}"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined",
         "-Wall", f"-I{sysconfig.get_paths()['include']}", *map(str, sorted(ENGINE.glob("*.c"))),
         "-lssl", "-lcrypto", "-o", str(so)],
        check=True, capture_output=True, timeout=300)
    return tmp


@pytest.mark.timeout(900)
@pytest.mark.skipif(LIBASAN is None, reason="gcc's libasan is not installed")
def test_engine_tests_pass_under_asan(tmp_path: Path) -> None:
    copy = build_copy(tmp_path / "repo")
    logs = tmp_path / "asan"
    logs.mkdir()
    env = {
        **os.environ,
        "LD_PRELOAD": str(LIBASAN),
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={logs}/asan:halt_on_error=1",
        "UBSAN_OPTIONS": f"log_path={logs}/ubsan:print_stacktrace=1",
        "CHARON_WALK_EXAMPLES": "20",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUBSET],
        cwd=copy, env=env, capture_output=True, text=True, timeout=840)
    reports = {p.name: p.read_text(errors="replace")[:4000] for p in logs.iterdir()}
    assert not reports, reports
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # The copy really ran the ASan build (a plain build would pass without checking anything).
    probe = subprocess.run(
        [sys.executable, "-c", "import charon.worker.websocket._engine as e; print(e.__file__)"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().startswith(str(copy)), probe
    symbols = subprocess.run(["nm", "-D", probe.stdout.strip()], capture_output=True, text=True,
                             timeout=60).stdout
    assert "__asan_init" in symbols and "__ubsan_handle_" in symbols
