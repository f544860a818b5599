"""Errors every verb raises; the CLI turns each into one line on stderr and its exit code."""


class WorkbenchError(Exception):
    """Base class. ``exit_code`` follows the README: 1 artifact failed, 2 bad input, 3 environment."""

    exit_code = 2


class BadInput(WorkbenchError):
    """The user's input (paths, files, options) cannot be used."""

    exit_code = 2


class ArtifactFailed(WorkbenchError):
    """The artifact was produced or found, but failed a check."""

    exit_code = 1


class EnvironmentProblem(WorkbenchError):
    """An engine or tool the command needs is missing or broken."""

    exit_code = 3
