"""`serve`: the model service, HTTP on uvicorn and gRPC on grpcio, in one event loop.
Web and gRPC libraries are imported inside the command."""
from __future__ import annotations

import logging

import click

API_KEY_ENV = "UNIREP_API_KEY"


def _checked_specs(model_dirs, repository, probe_specs, name) -> list:
    """The models to serve, each with its probes checked against it (UsageError if not)."""
    from runtime.service.model import load_probes, model_description
    from runtime.service.repository import model_specs

    try:
        specs = model_specs(list(model_dirs), repository, list(probe_specs), name)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for spec in specs:
        try:
            description = model_description(spec.model_dir)
            load_probes(spec.probes, description)  # refuse a wrong probe now, not after loading
        except (OSError, ValueError) as e:  # ProbeMismatch is a ValueError
            raise click.UsageError(str(e)) from None
    return specs


@click.command("serve")
@click.argument("model_dirs", nargs=-1, metavar="MODEL_DIR [MODEL_DIR ...]")
@click.option("--repository", metavar="DIR", default=None,
              help="A folder of model folders, each served under its folder name with the "
                   "probes in its probes/NAME/ subfolders and the similarity index in its "
                   "index/ subfolder (instead of, or beside, MODEL_DIRs).")
@click.option("--probe", "probe_specs", multiple=True, metavar="[MODEL:]NAME=PROBE_DIR",
              help="Serve a probe beside the embedding (outputs NAME_label, NAME_score, "
                   "NAME_topk_*); repeat for several; MODEL: says which model when there are "
                   "several. Refused at start if it was fitted on another backbone.")
@click.option("--index", "index_specs", multiple=True, metavar="[MODEL=]INDEX_DIR",
              help="Serve POST /v2/models/MODEL/search (and the infer outputs neighbour_id, "
                   "neighbour_score) over this similarity index (`cli.py index build`; an embed "
                   "output with an index works too); MODEL= says which model when there are "
                   "several. Refused if another model made it. A --repository model's "
                   "index/ subfolder is attached without it.")
@click.option("--name", default=None,
              help="Model name in the URLs (/v2/models/NAME) when one MODEL_DIR is served; "
                   "default: the folder name.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (HTTP and gRPC); 0.0.0.0 exposes the service.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="gRPC port (KServe v2 / Triton GRPCInferenceService); 0: no gRPC.")
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True,
              help="Require `authorization: Bearer KEY` (HTTP header or gRPC metadata) on "
                   "every endpoint but liveness and readiness.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read the API key from this file (its first line).")
@click.option("--public-metrics", is_flag=True,
              help="Serve /metrics without the API key (for a scraper without credentials).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM certificate: HTTPS and gRPC over TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM private key of --tls-cert.")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]))
@click.option("--max-batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Most images run in one model batch (1: no dynamic batching).")
@click.option("--max-delay-ms", type=click.FloatRange(0, 10_000), default=2.0,
              show_default=True,
              help="Longest a request waits for others to share its batch.")
@click.option("--max-queue", type=click.IntRange(1, 1_000_000), default=256, show_default=True,
              help="Requests allowed to wait, per model; beyond, 503 with Retry-After.")
@click.option("--timeout-s", type=click.FloatRange(0.01, 3600), default=30.0,
              show_default=True, help="Per-request limit, queue included; beyond, 504.")
@click.option("--max-body-mb", type=click.FloatRange(0.001, 4096), default=64.0,
              show_default=True, help="Largest request body or gRPC message; beyond, 413 "
                                      "(before reading it) or RESOURCE_EXHAUSTED.")
@click.option("--max-buffered-mb", type=click.FloatRange(0.001, 65536), default=256.0,
              show_default=True, help="All request bodies held at once (being read or "
                                      "parsed); beyond, 503 with Retry-After.")
@click.option("--max-json-mb", type=click.FloatRange(0.001, 4096), default=16.0,
              show_default=True, help="Largest JSON part of an infer request; beyond, 413 (send "
                                      "big tensors as binary data: parsed far faster).")
@click.option("--header-timeout-s", type=click.FloatRange(0.1, 3600), default=10.0,
              show_default=True, help="A connection must send its request headers within "
                                      "this; each body chunk may take 3x as long.")
@click.option("--max-connections", type=click.IntRange(1, 1_000_000), default=1000,
              show_default=True, help="Open HTTP connections; beyond, new ones are closed.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Batches in flight at once per model: one decodes while another runs the "
                   "model, each with cores/WORKERS onnxruntime threads.")
@click.option("--top-k", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Classes in each probe's top-k outputs.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(model_dirs, repository, probe_specs, index_specs, name, host, port, grpc_port, api_key,
          api_key_file, public_metrics, tls_cert, tls_key, device, max_batch, max_delay_ms,
          max_queue, timeout_s, max_body_mb, max_buffered_mb, max_json_mb, header_timeout_s,
          max_connections, workers, top_k, log_level):
    """Serve models over HTTP and gRPC: the Open Inference Protocol (KServe v2, what Triton
    and tritonclient speak), with dynamic batching and Prometheus metrics.

    \b
    HTTP endpoints (NAME: a model; each has its own batcher):
      GET  /v2/health/live, /v2/health/ready (ready once every model is loaded and warm)
      GET  /v2, /v2/models/NAME, /v2/models/NAME/ready, /v2/models/NAME/config
      GET  /v2/models/NAME/stats, /v2/models/stats   counts, queue and compute times
      POST /v2/repository/index                      the models and their state
      POST /v2/models/NAME/infer   JSON or binary tensors: input `image` (BYTES, encoded
                                   images) or `pixels` (UINT8 [N,H,W,3]); outputs `embedding`,
                                   `error` (per item) and per probe label/score/top-k
      POST /v2/models/NAME/search  {"image": [base64], "k": 10} -> nearest indexed ids and
                                   cosine scores (with --index)
      POST /v1/embed[?model=NAME]  multipart upload for curl users, JSON back
      GET  /metrics                Prometheus
    gRPC (--grpc-port): the same, as inference.GRPCInferenceService (tritonclient.grpc).

    \b
    Examples:
      python cli.py serve models/spe --probe mnist=probes/mnist --port 8000
      python cli.py serve models/spe models/gen --probe spe:mnist=probes/mnist
      python cli.py serve --repository models --api-key-file key.txt \\
          --tls-cert cert.pem --tls-key key.pem
      curl -F image=@photo.jpg http://127.0.0.1:8000/v1/embed

    SIGTERM (or Ctrl-C) stops taking connections, answers the requests in flight, then exits
    within --timeout-s + 5 s.
    """
    specs = _checked_specs(model_dirs, repository, probe_specs, name)
    if api_key_file:
        with open(api_key_file) as f:
            api_key = f.readline().strip()
        if not api_key:
            raise click.BadParameter(f"{api_key_file} is empty", param_hint="--api-key-file")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")

    from runtime.service.dataplane import DataPlane, ModelEndpoint
    from runtime.service.model import ServedModel

    endpoints = [ModelEndpoint(ServedModel(s.model_dir, name=s.name, probes=s.probes,
                                           device=device, workers=workers,
                                           batch_size=max_batch, top_k=top_k),
                               max_batch=max_batch, max_delay_ms=max_delay_ms,
                               max_queue=max_queue, timeout_s=timeout_s) for s in specs]
    _attach_indexes(endpoints, index_specs, {s.name: s.index for s in specs if s.index})
    try:
        plane = DataPlane(endpoints, api_key=api_key, metrics_public=public_metrics)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    scheme = "https" if tls_cert else "http"
    click.echo(f"serving {', '.join(e.name for e in endpoints)} on {scheme}://{host}:{port}"
               + (f" and gRPC {host}:{grpc_port}" if grpc_port else "")
               + f" (max batch {max_batch}, max delay {max_delay_ms:g} ms, queue {max_queue}"
               + (", API key required" if api_key else "") + ")", err=True)
    from runtime.service.limits import Limits
    from runtime.service.runner import run_servers
    limits = Limits(max_body=int(max_body_mb * 2**20),
                    max_buffered=int(max(max_buffered_mb, max_body_mb) * 2**20),
                    max_json=int(max_json_mb * 2**20),
                    header_timeout_s=header_timeout_s, body_timeout_s=3 * header_timeout_s,
                    max_connections=max_connections)
    try:
        failure = run_servers(plane, host=host, port=port, grpc_port=grpc_port,
                              max_body_mb=max_body_mb, timeout_s=timeout_s,
                              log_level=log_level, tls=(tls_cert, tls_key) if tls_cert else None,
                              limits=limits)
    except OSError as e:  # a port in use, an unreadable certificate
        raise click.ClickException(str(e)) from None
    if failure:
        raise click.ClickException(failure)


def _attach_indexes(endpoints, index_specs, found: dict[str, str]) -> None:
    """Load each --index [MODEL=]DIR and each index found in a repository's model folder
    (`found`, by model; an --index for the same model wins), check that it holds that model's
    vectors, attach it."""
    by_name = {e.name: e for e in endpoints}
    chosen = dict(found)
    for spec in index_specs:
        model, sep, path = spec.rpartition("=")
        if not sep:
            if len(endpoints) != 1:
                raise click.UsageError(f"--index {spec}: several models are served; write "
                                       f"MODEL=INDEX_DIR with MODEL one of {', '.join(by_name)}")
            model = endpoints[0].name
        if model not in by_name:
            raise click.UsageError(f"--index {spec}: no served model is named {model!r}")
        chosen[model] = path
    if not chosen:
        return
    from runtime.search import check_model, load_index
    from runtime.service.model import model_description
    for model, path in chosen.items():
        endpoint = by_name[model]
        index = load_index(path)
        check_model(index, model_description(endpoint.model.model_dir), endpoint.model.model_dir)
        endpoint.search_index = index
        click.echo(f"{model}: similarity index {path}", err=True)
