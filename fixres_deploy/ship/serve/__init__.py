"""``fixres-deploy serve``: an HTTP server that picks the FixRes resolution per batch under load.

Torch-free (numpy, PIL, the engine runtime, Starlette + Uvicorn):
:mod:`.model` runs a batch of decoded images at one resolution of a multires bundle,
:mod:`.policy` chooses that resolution from the bundle's latency table and the queue,
:mod:`.batcher` forms the batches and refuses what cannot be served in time,
:mod:`.metrics` renders Prometheus text, :mod:`.app` is the HTTP layer.
"""
