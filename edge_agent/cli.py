"""``splitkd-edge``: split training against a splitkd cloud, and ONNX inference.

``serve``, ``predict``, ``generate`` and ``pull`` need only the base install (onnxruntime,
no torch); ``train`` needs the ``[train]`` extra. Each command's options are one
settings class in :mod:`edge_agent.settings` (flags, SPLITKD_* variables and a
config file; see :mod:`splitkd.settings`); this module only runs the commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from edge_agent import security
from edge_agent.settings import (
    GenerateSettings,
    PredictSettings,
    PullSettings,
    ServeSettings,
    TrainSettings,
)
from splitkd.errors import SplitKDError
from splitkd.settings import Command, Program

log = logging.getLogger("splitkd-edge")


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)"
    )


def _train(args: TrainSettings) -> int:
    try:
        import torch
    except ImportError:
        raise SplitKDError(
            "training needs the [train] extra: pip install 'splitkd[train]'"
        ) from None
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.run import train
    from splitkd import energy

    # Check the profiles before any work: a typo should not cost a training run.
    energy.device_profile(args.device_profile)
    energy.link_profile(args.link_profile)
    torch.set_num_threads(1)  # small heads: threads cost more than they give
    metrics = None
    if args.metrics_port:
        from splitkd.energy_counter import EnergyCounter

        metrics = EdgeMetrics(inference=False, measured_energy=EnergyCounter().available)
        metrics.serve(args.metrics_port, args.metrics_host)
    report = train(_train_options(args, metrics))
    print(_summary(args, report))
    if metrics is not None and args.metrics_linger > 0:
        import time

        time.sleep(args.metrics_linger)
    return 0


def _train_options(args: TrainSettings, metrics: Any) -> Any:
    """run.TrainOptions: every field named like a setting is copied, the others derived here."""
    import dataclasses

    from edge_agent.model_store import default_checkpoint_dir
    from edge_agent.run import TrainOptions
    from splitkd.data.partition import parse_shard

    derived = {
        "shard": parse_shard(args.shard) if args.shard else None,
        "progress": not args.no_progress,
        "plots": not args.no_plots,
        "metrics": metrics,
        "checkpoint_dir": args.checkpoint_dir or default_checkpoint_dir(args.device_id),
        "security": security.EdgeSecurity.from_options(args),
    }
    same = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainOptions)
        if f.name in TrainSettings.model_fields and f.name not in derived
    }
    return TrainOptions(**same, **derived)


def _summary(args: TrainSettings, report: dict[str, Any]) -> str:
    student, traffic, energy = report["student"], report["traffic"], report["energy"]
    data = report["data"]
    recall = student.get("macro_recall")
    macro = f", macro recall {recall:.4f}" if recall is not None else ""
    line = (
        f"{args.device_id}: student {student['name']} v{student['version']} accuracy {student['accuracy']:.4f}"
        f"{macro} (onnxruntime, {data['heldout_samples']} held-out samples), {report['steps']} steps, "
        f"{traffic['bytes_up'] / 1e6:.2f} MB up / {traffic['bytes_down'] / 1e6:.2f} MB down, "
        f"{report['wall_seconds']:.1f} s, est. {energy['estimate_joules']['total']:.1f} J "
        f"({energy['device_profile']}, {energy['link_profile']}); report: {args.report}"
    )
    if "set_aside_samples" in data:
        line += (
            f"\n{args.device_id}: data {data['spec']}: {data['train_samples']} training, "
            f"{data['heldout_samples']} held-out samples, {data['set_aside_samples']} set aside for "
            f"the cloud, {data['other_shard_samples']} in other shards; classes seen "
            f"{data['classes_seen']} of {data['signature']}"
        )
    return line


def _serve(args: ServeSettings) -> int:
    import uvicorn

    from edge_agent.http_api import create_app
    from edge_agent.metrics import EdgeMetrics
    from edge_agent.model_store import ModelStore

    metrics = EdgeMetrics(training=False)
    metrics.describe_device(args.device_id, args.device_profile, args.link_profile)
    token = security.http_token(args)
    if args.max_body_bytes < 0:
        raise SplitKDError("--max-body-bytes must be 0 (sized from the model) or more")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "/v1/predict answers anyone who reaches %s:%d: set SPLITKD_HTTP_TOKEN_FILE to "
            "require a token (docs/SECURITY.md)",
            args.host,
            args.http_port,
        )
    app = create_app(
        ModelStore(args.model_dir), metrics, token=token, max_body_bytes=args.max_body_bytes
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.http_port,
        log_level="warning",
        access_log=False,
        **security.https_options(args),
    )
    return 0


def _load_inputs(args: PredictSettings) -> Any:
    import numpy as np

    if args.json_array is not None:
        try:
            return np.asarray(json.loads(args.json_array), dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise SplitKDError(f"--json is not a numeric JSON array: {exc}") from None
    path = args.input
    assert path is not None  # PredictSettings requires --input or --json
    if not path.is_file():
        raise SplitKDError(f"input file {path} does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32)
        return np.asarray(json.loads(path.read_text()), dtype=np.float32)
    except (ValueError, TypeError, OSError) as exc:
        raise SplitKDError(f"{path}: cannot read numeric inputs ({exc})") from None


def _predict(args: PredictSettings) -> int:
    from edge_agent.inference import Predictor
    from edge_agent.model_store import ModelStore

    model = ModelStore(args.model_dir).current()
    predictor = Predictor(model.path, tuple(model.metadata["input_shape"]))
    result = predictor.predict(_load_inputs(args))
    out = {
        "model": {"name": model.name, "version": model.version},
        "predictions": [
            {"class": int(c), "probabilities": [round(float(p), 6) for p in probs]}
            for c, probs in zip(result.classes, result.probabilities, strict=True)
        ],
    }
    print(json.dumps(out))
    return 0


def _generate(args: GenerateSettings) -> int:
    """Stream the continuation to stdout as it is decoded; speed to stderr."""
    from edge_agent.generate import Generator
    from edge_agent.model_store import ModelStore

    path = args.onnx_model or ModelStore(args.model_dir).current().path
    if not path.is_file():
        raise SplitKDError(f"model file {path} does not exist")
    generator = Generator(path)
    generator.check(args.prompt, args.max_tokens)  # before any output
    for piece in generator.text(args.prompt, args.max_tokens, args.temperature, args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    stats = generator.stats
    sys.stdout.write("\n")
    print(
        f"{stats.tokens} tokens, {stats.tokens_per_second:.0f} tokens/s, first token after "
        f"{stats.first_token_seconds * 1000:.1f} ms",
        file=sys.stderr,
    )
    return 0


def _pull(args: PullSettings) -> int:
    from edge_agent.model_store import ModelStore
    from edge_agent.pull import pull

    edge_security = security.EdgeSecurity.from_options(args)
    model = pull(
        args.cloud_http,
        args.model,
        args.version,
        ModelStore(args.model_dir),
        headers=dict(edge_security.call_metadata(args.device_id)),
        context=edge_security.tls.ssl_context() if edge_security.tls is not None else None,
    )
    print(
        f"installed {model.name} v{model.version} ({model.metadata['size_bytes']} bytes, "
        f"SHA-256 {model.metadata['sha256'][:12]}…) in {model.path.parent}"
    )
    return 0


PROGRAM = Program(
    prog="splitkd-edge",
    description="The splitkd edge agent: trains a small student with a cloud teacher by split "
    "knowledge distillation (raw data never leaves this device), then serves it with onnxruntime.",
    global_options=_global_options,
    commands=(
        Command(
            "train",
            TrainSettings,
            _train,
            help="split-train a student, then download and verify it",
            description="Split-train with the cloud: this device runs the student's head and the "
            "teacher's frozen head on its data and sends only activations; the cloud sends back "
            "gradients. At the end the ONNX student is downloaded, verified and evaluated here.",
        ),
        Command("serve", ServeSettings, _serve, help="HTTP inference API over the current student"),
        Command(
            "predict",
            PredictSettings,
            _predict,
            help="classify once from the command line",
            description="Classify samples from a .npy or .json file (one sample or a batch) "
            "or from --json, with the current student.",
        ),
        Command(
            "generate",
            GenerateSettings,
            _generate,
            help="continue a text with the current language-model student (no torch needed)",
            description="Stream the student's continuation of --prompt, byte by byte, with "
            "onnxruntime and the key/value cache of the exported decoder.",
        ),
        Command("pull", PullSettings, _pull, help="download a student over HTTP (no torch needed)"),
    ),
)


def main(argv: list[str] | None = None) -> int:
    from splitkd.logs import configure

    try:
        args, command, options = PROGRAM.parse(argv)
        configure(args.verbose)
        return command.handler(options)
    except SplitKDError as exc:
        print(f"splitkd-edge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"splitkd-edge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
