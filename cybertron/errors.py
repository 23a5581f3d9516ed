"""Errors a user can cause. The CLI prints their message in one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, files, flags): reported without a traceback, exit code 2."""


class ConfigError(UserError):
    """A config key or value is invalid; the message names the key and what would be valid."""


class DataError(UserError):
    """A data source is missing, empty or unreadable; the message names the file."""


class CheckpointError(UserError):
    """A checkpoint is missing, partial or corrupted; the message names the directory."""


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite (or kept spiking): the run stops without writing a
    checkpoint of them; the message names the step and the newest good checkpoint."""
