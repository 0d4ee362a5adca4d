from nameko.exceptions import RemoteError

from cirrus import errors
from cirrus.template import TemplateError


def test_every_error_kind_maps_to_its_grpc_status_even_subclasses_defined_elsewhere():
    assert errors.grpc_status_name("InvalidArgument") == "INVALID_ARGUMENT"
    assert errors.grpc_status_name("TemplateError") == "INVALID_ARGUMENT"
    assert errors.grpc_status_name("KeyError") == "INTERNAL"


def test_a_remote_error_comes_back_as_its_own_kind():
    exc = errors.from_remote(RemoteError("NotFound", "VM 3 does not exist"))
    assert isinstance(exc, errors.NotFound) and str(exc) == "VM 3 does not exist"
    assert isinstance(errors.from_remote(RemoteError("TemplateError", "line 1")), TemplateError)
    other = RemoteError("ZeroDivisionError", "boom")
    assert errors.from_remote(other) is other
