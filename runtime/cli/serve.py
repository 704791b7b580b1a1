"""`serve`: the model service on uvicorn. Web libraries are imported inside the command."""
from __future__ import annotations

import logging

import click


@click.command("serve")
@click.argument("model_dir", metavar="MODEL_DIR")
@click.option("--probe", "probe_specs", multiple=True, metavar="NAME=PROBE_DIR",
              help="Serve a probe beside the embedding (outputs NAME_label, NAME_score, "
                   "NAME_topk_*); repeat for several. Refused at start if it was fitted on "
                   "another backbone.")
@click.option("--name", default=None,
              help="Model name in the URLs (/v2/models/NAME); default: MODEL_DIR's folder name.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the service to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]))
@click.option("--max-batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Most images run in one model batch (1: no dynamic batching).")
@click.option("--max-delay-ms", type=click.FloatRange(0, 10_000), default=2.0,
              show_default=True,
              help="Longest a request waits for others to share its batch.")
@click.option("--max-queue", type=click.IntRange(1, 1_000_000), default=256, show_default=True,
              help="Requests allowed to wait; beyond, 503 with Retry-After.")
@click.option("--timeout-s", type=click.FloatRange(0.01, 3600), default=30.0,
              show_default=True, help="Per-request limit, queue included; beyond, 504.")
@click.option("--max-body-mb", type=click.FloatRange(0.001, 4096), default=64.0,
              show_default=True, help="Largest request body; beyond, 413 (before reading it).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Batches in flight at once: one decodes while another runs the model, each "
                   "with cores/WORKERS onnxruntime threads.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Classes in each probe's top-k outputs.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(model_dir, probe_specs, name, host, port, device, max_batch, max_delay_ms, max_queue,
          timeout_s, max_body_mb, workers, top_k, log_level):
    """Serve MODEL_DIR over HTTP: the Open Inference Protocol (KServe v2, what Triton and
    tritonclient speak), with dynamic batching and Prometheus metrics.

    \b
    Endpoints:
      GET  /v2/health/live, /v2/health/ready (ready once loaded and warmed up)
      GET  /v2, /v2/models/NAME, /v2/models/NAME/ready
      POST /v2/models/NAME/infer   JSON or binary tensors: input `image` (BYTES, encoded
                                   images) or `pixels` (UINT8 [N,H,W,3]); outputs `embedding`,
                                   `error` (per item) and per probe label/score/top-k
      POST /v1/embed               multipart upload for curl users, JSON back
      GET  /metrics                Prometheus

    \b
    Examples:
      python cli.py serve models/spe --probe mnist=probes/mnist --port 8000
      curl -F image=@photo.jpg http://127.0.0.1:8000/v1/embed

    SIGTERM (or Ctrl-C) stops taking connections, answers the requests in flight, then exits.
    """
    from runtime.service.model import ProbeMismatch, ServedModel, load_probes, model_description, parse_probe_specs

    try:
        probes = parse_probe_specs(list(probe_specs))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--probe") from None
    try:
        description = model_description(model_dir)
    except (OSError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    try:  # refuse a wrong probe now, not after the model has loaded
        load_probes(probes, description)
    except ProbeMismatch as e:
        raise click.UsageError(str(e)) from None

    import uvicorn

    from runtime.service.app import Service, build_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    server: uvicorn.Server | None = None

    def fatal(reason: str) -> None:
        if server is not None:
            server.should_exit = True

    model = ServedModel(model_dir, name=name, probes=probes, device=device, workers=workers,
                        batch_size=max_batch, top_k=top_k)
    service = Service(model, max_batch=max_batch, max_delay_ms=max_delay_ms,
                      max_queue=max_queue, timeout_s=timeout_s, max_body_mb=max_body_mb,
                      on_fatal=fatal)
    config = uvicorn.Config(build_app(service), host=host, port=port, log_level=log_level,
                            proxy_headers=False,  # no proxy in front by default: one layer less
                            timeout_graceful_shutdown=int(timeout_s) + 5, access_log=False)
    server = uvicorn.Server(config)
    click.echo(f"serving {model.name} from {model_dir} on http://{host}:{port} "
               f"(max batch {max_batch}, max delay {max_delay_ms:g} ms, queue {max_queue})",
               err=True)
    server.run()
    if service.failure_:
        raise click.ClickException(service.failure_)
