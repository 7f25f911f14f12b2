"""Edge-side errors that end a command with one clear line."""

from splitkd.errors import SplitKDError


class EdgeError(SplitKDError):
    """A problem on the edge: unreachable cloud, refused call, bad download."""


class CloudRefused(EdgeError):
    """The cloud answered a call with an error status."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"the cloud refused {method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details
