"""The Open Inference Protocol (KServe v2): `core` (its semantics over `service.inference`),
`tensors` (its tensors as NumPy arrays), `rest` (FastAPI routes on the HTTP port) and
`grpc_service` (grpc.aio on `FOCAL_GRPC_PORT`)."""
