"""Alembic migration scripts (shipped as a package so an installed copy finds them)."""
