"""The operator surface: an opt-in HTTP server inside ``vtuber-bot run`` with the OBS overlay,
the dashboard, Prometheus metrics and health/readiness probes (``bot/operator/server.py``)."""

from bot.operator.server import binding_problems, operator_server
from bot.operator.status import RuntimeView

__all__ = ["RuntimeView", "binding_problems", "operator_server"]
