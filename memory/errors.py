"""The store's exception root. Messages are one line, fit to show an operator."""


class StoreError(Exception):
    """The database cannot be used as asked (wrong file, read-only, locked, newer schema)."""


class IntegrityViolation(StoreError):
    """A write broke a constraint (a unique key, a foreign key)."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer version of this program."""
