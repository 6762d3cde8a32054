"""The ``log`` connector: ``log.write`` puts a rendered line in the worker's log.

For trying a recipe out, or for a trace of a run, without any outside service.
"""

from __future__ import annotations

from connectors.base import ActionCall, ActionInput, Connector, ConnectorConfig, action


class LogConfig(ConnectorConfig):
    """``connectors.log``: nothing to set; the section exists so every connector has one."""


class WriteInput(ActionInput):
    message: str


class LogConnector(Connector):
    """Writes to the ``vivoflow.connectors.log`` logger, so the worker's log settings apply."""

    name = "log"
    config_model = LogConfig
    # Logging cannot fail in a way that trying again would fix.
    default_max_attempts = 1

    @action("write", input=WriteInput)
    def write(self, inputs: WriteInput, call: ActionCall) -> None:
        """Log a message at INFO."""
        # The message as written: no prefix, so a recipe's line reads the same in the log.
        # The engine's log context adds the delivery, run and step ids to the line.
        self.log.info("%s", inputs.message)
