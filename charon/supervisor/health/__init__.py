"""Health of the targets, decided once in the supervisor and shared with every worker (issue 13).

`monitor.py` runs the active checks and relays passive mark-downs, `probe.py` is one check,
`store.py` the interface a shared store (several machines) would implement.
"""

from charon.supervisor.health.monitor import HealthMonitor, configured_targets

__all__ = ["HealthMonitor", "configured_targets"]
