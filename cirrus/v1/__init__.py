"""Python stubs of Cirrus's gRPC API (package ``cirrus.v1``).

The ``*_pb2.py`` and ``*_pb2_grpc.py`` modules here are generated from
``proto/cirrus/v1/*.proto`` by ``python -m cirrus.protogen`` (``make proto``)
and are not committed.
"""
