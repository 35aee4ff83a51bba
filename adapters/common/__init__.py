"""Helpers shared by platform adapters (message splitting, send rate limits); no platform
library is imported here."""
