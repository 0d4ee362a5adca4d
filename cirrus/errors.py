"""Errors that cross service boundaries, each with the gRPC status it maps to.

Services raise these; Nameko sends them as RemoteError(exc_type=<class name>),
and the gateway turns the class name back into the status code.
"""


class CirrusError(Exception):
    grpc_status = "INTERNAL"


class InvalidArgument(CirrusError):
    grpc_status = "INVALID_ARGUMENT"


class NotFound(CirrusError):
    grpc_status = "NOT_FOUND"


class AlreadyExists(CirrusError):
    grpc_status = "ALREADY_EXISTS"


class FailedPrecondition(CirrusError):
    grpc_status = "FAILED_PRECONDITION"


class Unauthenticated(CirrusError):
    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(CirrusError):
    grpc_status = "PERMISSION_DENIED"


class ResourceExhausted(CirrusError):
    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(CirrusError):
    """A part Cirrus needs (the database, the broker) cannot be reached right
    now; the same call may succeed once it is back."""
    grpc_status = "UNAVAILABLE"


def by_name(exc_type):
    """The CirrusError class called ``exc_type``, looked up at call time so
    that subclasses defined elsewhere (TemplateError) are found too."""
    pending = [CirrusError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == exc_type:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def grpc_status_name(exc_type):
    """The gRPC status name for a RemoteError's exc_type ('INTERNAL' if unknown)."""
    cls = by_name(exc_type)
    return cls.grpc_status if cls else "INTERNAL"


def from_remote(exc):
    """The CirrusError behind a Nameko RemoteError, so an error passes through
    a chain of services unchanged; other remote errors are returned as they are."""
    cls = by_name(getattr(exc, "exc_type", None))
    return cls(exc.value) if cls else exc
