"""Connectors: one module per service, each a config model plus typed actions.

Built-ins register through the ``vivoflow.connectors`` entry point group, the
same way a third-party package would.
"""
