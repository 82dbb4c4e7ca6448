"""Versioned schema migrations, applied in order by :mod:`server.storage` at start.

``NNNN_name.sql``: the number is the version; a file, once released, is never edited.
"""
